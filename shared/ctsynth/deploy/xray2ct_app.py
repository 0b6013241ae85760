"""``python -m ctsynth.deploy.xray2ct_app -i RADIOGRAPHS -o OUT [-m MODELS]``: the X-ray -> CT MONAI Deploy
application (settings from the ``CTSYNTH_*`` variables of :data:`ctsynth.deploy.apps.XRAY_ENV`)."""

from __future__ import annotations

import logging


def main() -> None:
    from ctsynth.deploy.apps import XRAY_ENV, XrayToCTApp, settings_from_env

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    XrayToCTApp(**settings_from_env(XRAY_ENV)).run()


if __name__ == "__main__":
    main()
