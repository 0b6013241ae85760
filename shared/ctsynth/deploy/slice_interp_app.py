"""``python -m ctsynth.deploy.slice_interp_app -i THICK_STUDY -o OUT [-m MODELS]``: the slice-interpolation MONAI
Deploy application (settings from the ``CTSYNTH_*`` variables of :data:`ctsynth.deploy.apps.SLICE_ENV`)."""

from __future__ import annotations

import logging


def main() -> None:
    from ctsynth.deploy.apps import SLICE_ENV, SliceInterpolationApp, settings_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    SliceInterpolationApp(**settings_from_env(SLICE_ENV)).run()


if __name__ == "__main__":
    main()
