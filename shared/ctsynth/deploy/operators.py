"""MONAI Deploy operators wrapping ctsynth's readers, the bundles' inference and ctsynth's writers.

Every operator runs once per application run (the SDK's scheduler) and passes plain Python objects:
``volume`` is a (1, X, Y, Z) float32 :class:`monai.data.MetaTensor` in HU with a RAS affine, ``reference`` the
DICOM series folder whose patient and study tags the output copies (``None`` for non-DICOM input).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctsynth.atomic import atomic_write_json
from ctsynth.deploy import require_sdk

require_sdk()

from monai.deploy.core import Fragment, Operator, OperatorSpec  # noqa: E402

from ctsynth.io import is_nifti, load_volume, save_dicom_series, save_nifti  # noqa: E402
from ctsynth.slices import SLICE_METHODS, interpolate_study  # noqa: E402

__all__ = ["CTStudyLoaderOperator", "SliceInterpolationOperator", "RadiographFolderOperator",
           "CascadeReconstructionOperator", "CTWriterOperator"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz", ".jpg", ".jpeg")


def _resolve_input(input_path: str | Path) -> tuple[Path, Path | None]:
    """(what to load, DICOM reference or None) for a CT input: a NIfTI file, a folder holding exactly one
    NIfTI, a DICOM folder or a zip of DICOM studies."""
    path = Path(input_path)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}; pass -i with a DICOM folder, zip or NIfTI file")
    if path.is_dir():
        niftis = sorted(p for p in path.iterdir() if is_nifti(p))
        others = [p for p in path.rglob("*") if p.is_file() and not is_nifti(p) and not p.name.startswith(".")]
        if niftis and not others:
            if len(niftis) > 1:
                raise ValueError(f"{path} holds {len(niftis)} NIfTI files ({[p.name for p in niftis[:4]]}); "
                                 "give one study per run (-i FILE or a folder with one volume)")
            return niftis[0], None
        return path, path
    return path, None  # a NIfTI file, or a zip (new study: the zip may hold several)


class CTStudyLoaderOperator(Operator):
    """Input folder -> ``volume`` and ``reference``.

    Reads with :func:`ctsynth.io.load_volume`, so a corrupt file, mixed series or a missing slice fails with the
    message the command line gives. ``series_uid`` picks one series when the input holds several.
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: str | Path, series_uid: str | None = None,
                 **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        self.series_uid = series_uid
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("volume")
        spec.output("reference")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        source, reference = _resolve_input(self.input_path)
        volume = load_volume(source, series_uid=self.series_uid)
        logger.info("loaded %s: %s voxels", source, tuple(volume.shape[1:]))
        op_output.emit(volume, "volume")
        op_output.emit(str(reference) if reference is not None else None, "reference")


class SliceInterpolationOperator(Operator):
    """``volume`` (thick slices) -> ``volume`` (thin slices at ``spacing_mm``).

    Args:
        method: one of :data:`ctsynth.slices.SLICE_METHODS`. ``refiner`` reads ``MODELS/refiner.pt``; ``ldm`` reads
            ``MODELS/model.pt`` and ``MODELS/autoencoder.pt`` (MODELS = ``models_path``, default the bundle's).
        spacing_mm: output slice spacing (mm).
        work_dir: where ``ldm`` stages its input and output NIfTI (a temporary folder by default).
    """

    def __init__(self, fragment: Fragment, *args: Any, method: str = "cubic", spacing_mm: float = 1.0,
                 models_path: str | Path | None = None, inference_steps: int = 50, steps: int = 400, seed: int = 0,
                 device: str | None = None, work_dir: str | Path | None = None, **kwargs: Any) -> None:
        if method not in SLICE_METHODS:
            raise ValueError(f"method must be one of {SLICE_METHODS}, got {method!r}")
        if float(spacing_mm) <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
        self.method, self.spacing_mm = method, float(spacing_mm)
        self.models_path = Path(models_path) if models_path else None
        self.inference_steps, self.steps, self.seed, self.device = int(inference_steps), int(steps), int(seed), device
        self.work_dir = work_dir
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.output("volume")
        spec.output("report")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        volume = op_input.receive("volume")
        if self.method == "ldm":
            result = self._ldm(volume)
        else:
            model = (self.models_path / "refiner.pt") if self.method == "refiner" and self.models_path else None
            if self.method == "refiner" and model is None:
                raise ValueError("method 'refiner' needs -m MODELS holding refiner.pt")
            result = interpolate_study(volume, self.spacing_mm, self.method, model=model, steps=self.steps,
                                       seed=self.seed)
        op_output.emit(result, "volume")
        op_output.emit({"method": self.method, "spacing_mm": self.spacing_mm, "input_slices": int(volume.shape[3]),
                        "slices": int(result.shape[3])}, "report")

    def _ldm(self, volume: Any) -> Any:
        from ctsynth.bundles import bundle_models, checkpoint_settings, run_bundle

        models = bundle_models("slice_interp_ldm", self.models_path)
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            src, out = Path(tmp) / "thick.nii.gz", Path(tmp) / "thin.nii.gz"
            save_nifti(volume, src)
            overrides = {"input": str(src), "output": str(out), "spacing": self.spacing_mm, "seed": self.seed,
                         "inference_steps": self.inference_steps, "autoencoder_path": str(models / "autoencoder.pt"),
                         **checkpoint_settings("slice_interp_ldm", models / "model.pt")}
            run_bundle("slice_interp_ldm", ["inference.json"], "inference", overrides, device=self.device)
            return load_volume(out)


class RadiographFolderOperator(Operator):
    """Input folder -> ``study``: ``{"xrays": [files], "geometry": path}``.

    The folder holds ``geometry.json`` (as ``ctsynth drr`` / ``ctsynth prepare`` write it) and one radiograph per
    view whose file names sort in the geometry's view order (e.g. ``0_ap.png``, ``1_lateral.png``).
    """

    def __init__(self, fragment: Fragment, *args: Any, input_path: str | Path, **kwargs: Any) -> None:
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("study")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from ctsynth.bundles import bundle_module

        folder = self.input_path
        geometry = folder / "geometry.json"
        if not folder.is_dir() or not geometry.is_file():
            raise FileNotFoundError(f"{folder}: expected a folder with geometry.json and one radiograph per view")
        xrays = sorted(str(p) for p in folder.iterdir()
                       if p.is_file() and p.name != "geometry.json" and p.name.lower().endswith(_IMAGE_SUFFIXES))
        bundle_module("cascade_xray2ct", "inference").check_views(xrays, geometry)  # counts agree, or a clear error
        op_output.emit({"xrays": xrays, "geometry": str(geometry)}, "study")


class CascadeReconstructionOperator(Operator):
    """``study`` -> ``volume`` (and ``report``: re-projection PSNR per view) with the cascade_xray2ct bundle's
    inference and the checkpoint ``MODELS/model.pt`` (MODELS = ``models_path``, default the bundle's)."""

    def __init__(self, fragment: Fragment, *args: Any, models_path: str | Path | None = None,
                 device: str | None = None, work_dir: str | Path | None = None, **kwargs: Any) -> None:
        self.models_path = Path(models_path) if models_path else None
        self.device, self.work_dir = device, work_dir
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study")
        spec.output("volume")
        spec.output("reference")
        spec.output("report")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        from ctsynth.bundles import bundle_models, checkpoint_settings, run_bundle

        study = op_input.receive("study")
        models = bundle_models("cascade_xray2ct", self.models_path)
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            out = Path(tmp) / "ct.nii.gz"
            overrides = {"xrays": study["xrays"], "geometry": study["geometry"], "output": str(out), "preview": False,
                         **checkpoint_settings("cascade_xray2ct", models / "model.pt")}
            report = run_bundle("cascade_xray2ct", ["inference.json"], "inference", overrides, device=self.device)[0]
            volume = load_volume(out)
        op_output.emit(volume, "volume")
        op_output.emit(None, "reference")
        op_output.emit({k: v for k, v in report.items() if k != "written"}, "report")


class CTWriterOperator(Operator):
    """``volume`` (+ ``reference``, ``report``) -> ``OUTPUT/<stem>.nii.gz``, a DICOM CT series in
    ``OUTPUT/dicom/`` (in the reference's study when there is one) and ``OUTPUT/<stem>.json``."""

    def __init__(self, fragment: Fragment, *args: Any, output_path: str | Path, stem: str = "ct",
                 series_description: str = "ctsynth synthetic CT", extra: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        # attributes must not shadow the SDK operator's own (name, spec, ...): setting those crashes holoscan
        self.output_path, self.stem = Path(output_path), stem
        self.series_description, self.extra = series_description, dict(extra or {})
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("volume")
        spec.input("reference")
        spec.input("report")

    def compute(self, op_input: Any, op_output: Any, context: Any) -> None:
        volume, reference = op_input.receive("volume"), op_input.receive("reference")
        report = dict(op_input.receive("report") or {})
        self.output_path.mkdir(parents=True, exist_ok=True)
        nifti = save_nifti(volume, self.output_path / f"{self.stem}.nii.gz")
        files = save_dicom_series(volume, self.output_path / "dicom", reference=reference,
                                  series_description=self.series_description, same_study=reference is not None)
        report.update({**self.extra, "nifti": str(nifti), "dicom_dir": str(self.output_path / "dicom"),
                       "dicom_files": len(files), "shape": list(volume.shape[1:]),
                       "reference": reference})
        atomic_write_json(report, self.output_path / f"{self.stem}.json")
        logger.info("wrote %s and %d DICOM files", nifti, len(files))
