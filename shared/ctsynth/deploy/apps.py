"""The MONAI Deploy applications (see :mod:`ctsynth.deploy`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctsynth.deploy import require_sdk

require_sdk()

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import Application  # noqa: E402

from ctsynth.deploy.operators import (CascadeReconstructionOperator, CTStudyLoaderOperator,  # noqa: E402
                                      CTWriterOperator, RadiographFolderOperator, SliceInterpolationOperator)

__all__ = ["SliceInterpolationApp", "XrayToCTApp", "SLICE_ENV", "XRAY_ENV", "settings_from_env"]

logger = logging.getLogger(__name__)

#: environment variable -> (setting of :class:`SliceInterpolationApp`, type)
SLICE_ENV: dict[str, tuple[str, type]] = {
    "CTSYNTH_SLICE_METHOD": ("method", str),
    "CTSYNTH_SPACING_MM": ("spacing_mm", float),
    "CTSYNTH_INFERENCE_STEPS": ("inference_steps", int),
    "CTSYNTH_SERIES_UID": ("series_uid", str),
    "CTSYNTH_DEVICE": ("device", str),
    "CTSYNTH_SEED": ("seed", int),
}
#: environment variable -> (setting of :class:`XrayToCTApp`, type)
XRAY_ENV: dict[str, tuple[str, type]] = {"CTSYNTH_DEVICE": ("device", str)}


def settings_from_env(table: Mapping[str, tuple[str, type]], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Application settings from the environment variables of ``table`` that are set.

    Raises:
        ValueError: a value that does not parse, naming the variable.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for var, (key, kind) in table.items():
        if environ.get(var) in (None, ""):
            continue
        try:
            out[key] = kind(environ[var])
        except ValueError:
            raise ValueError(f"{var}={environ[var]!r}: expected a {kind.__name__}") from None
    return out


class _CTApp(Application):
    """Shared set-up: the SDK's app context (-i/-o/-m or HOLOSCAN_* paths) and settings."""

    def __init__(self, *args: Any, **settings: Any) -> None:
        self.settings = settings
        super().__init__(*args)

    def _paths(self) -> tuple[Path, Path, Path | None]:
        ctx = Application.init_app_context(self.argv)
        models = Path(ctx.model_path) if ctx.model_path and Path(ctx.model_path).exists() else None
        return Path(ctx.input_path), Path(ctx.output_path), models


class SliceInterpolationApp(_CTApp):
    """Thick-slice CT study -> thin-slice CT series (DICOM in the same study, NIfTI, JSON report).

    Settings (keyword arguments, or :data:`SLICE_ENV` variables when run as a program): ``method`` (one of
    ``cubic``, ``linear``, ``self-supervised``, ``refiner``, ``ldm``; default ``cubic``), ``spacing_mm`` (1.0),
    ``inference_steps`` (DDIM steps for ``ldm``, 50), ``series_uid`` (which series of a multi-series input),
    ``device``, ``seed``. ``-m MODELS`` holds ``refiner.pt`` or ``model.pt`` + ``autoencoder.pt``.
    """

    def compose(self) -> None:
        input_path, output_path, models = self._paths()
        s = {"method": "cubic", "spacing_mm": 1.0, **self.settings}  # the operator checks them
        loader = CTStudyLoaderOperator(self, CountCondition(self, 1), input_path=input_path,
                                       series_uid=s.get("series_uid"), name="load_ct")
        interp = SliceInterpolationOperator(self, method=s["method"], spacing_mm=s["spacing_mm"], models_path=models,
                                            inference_steps=s.get("inference_steps", 50), seed=s.get("seed", 0),
                                            device=s.get("device"), name="interpolate_slices")
        writer = CTWriterOperator(self, output_path=output_path, stem="thin", name="write_ct",
                                  series_description=f"ctsynth {s['method']} {s['spacing_mm']:g} mm",
                                  extra={"input": str(input_path)})
        self.add_flow(loader, interp, {("volume", "volume")})
        self.add_flow(loader, writer, {("reference", "reference")})
        self.add_flow(interp, writer, {("volume", "volume"), ("report", "report")})


class XrayToCTApp(_CTApp):
    """Radiographs + geometry.json -> CT (NIfTI, DICOM series, JSON report with the re-projection PSNR per view).

    ``-m MODELS`` holds the cascade's ``model.pt`` (default: the bundle's models/). Settings: ``device``.
    """

    def compose(self) -> None:
        input_path, output_path, models = self._paths()
        reader = RadiographFolderOperator(self, CountCondition(self, 1), input_path=input_path, name="read_radiographs")
        recon = CascadeReconstructionOperator(self, models_path=models, device=self.settings.get("device"),
                                              name="reconstruct")
        writer = CTWriterOperator(self, output_path=output_path, stem="ct", name="write_ct",
                                  series_description="ctsynth X-ray to CT", extra={"input": str(input_path)})
        self.add_flow(reader, recon, {("study", "study")})
        self.add_flow(recon, writer, {("volume", "volume"), ("reference", "reference"), ("report", "report")})
