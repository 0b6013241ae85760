"""MONAI Deploy applications for the ctsynth bundles (optional extra: ``pip install -e ".[deploy]"``).

Two applications, each runnable locally or packaged with ``monai-deploy package``:

* :class:`~ctsynth.deploy.apps.SliceInterpolationApp` -- a thick-slice CT study (DICOM folder, zip of studies or
  NIfTI) in, a thin-slice CT series out (DICOM series in the same study + NIfTI + JSON report)::

      python -m ctsynth.deploy.slice_interp_app -i thick_study/ -o out/ [-m models/]

* :class:`~ctsynth.deploy.apps.XrayToCTApp` -- a folder of radiographs (PNG/TIFF, DICOM or NIfTI, one per view,
  file names sorting in the geometry's view order) with its ``geometry.json`` in, a CT out (NIfTI + DICOM series
  + JSON report)::

      python -m ctsynth.deploy.xray2ct_app -i study/ -o out/ -m models/

``-i/-o/-m`` (or ``HOLOSCAN_INPUT_PATH`` / ``HOLOSCAN_OUTPUT_PATH`` / ``HOLOSCAN_MODEL_PATH``) are the SDK's
own; the application settings the SDK's parser has no flag for come from environment variables
(:data:`~ctsynth.deploy.apps.SLICE_ENV`, :data:`~ctsynth.deploy.apps.XRAY_ENV`) or the constructors.

The operators call the same code as ``ctsynth interpolate`` / ``ctsynth reconstruct`` and the bundles'
``inference.json``, so an application prints the numbers the command line prints.
"""

from __future__ import annotations

__all__ = ["require_sdk"]

INSTALL_HINT = ('the MONAI Deploy App SDK is not installed: pip install -e ".[deploy]" (monai-deploy-app-sdk, '
                "highdicom; it must share the environment, and so the site-packages folder, of monai itself)")


def require_sdk() -> None:
    """Raises ImportError with the install command when ``monai.deploy`` cannot be imported."""
    try:
        import monai.deploy.core  # noqa: F401
    except Exception as e:  # noqa: BLE001 - monai re-raises submodule import failures with its own text
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
