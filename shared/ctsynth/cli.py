"""The ``ctsynth`` command line (python-fire).

Options that take several numbers accept them space-separated (``--shape 64 64 64``,
``--window -1000 1000``) or comma-separated (``--shape 64,64,64``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

__all__ = ["CLI", "Bench", "main", "normalise_argv"]

logger = logging.getLogger("ctsynth")
_MULTI_VALUE_FLAGS = ("--shape", "--spacing", "--window", "--sizes", "--views-angles", "--stages", "--batch", "--depths",
                      "--train-shape", "--volume", "--roi", "--latent-shape", "--patch")
#: the range of every number an option of that name takes (checked before a command runs: no ZeroDivisionError
#: from --size 0, no 360 GB allocation from --spacing 1e-6)
OPTION_LIMITS: dict[str, tuple[float, float]] = {
    "repeats": (1, 1000), "n": (1, 100000), "size": (1, 8192), "xray_size": (8, 4096), "steps": (1, 100000),
    "inference_steps": (1, 1000), "samples": (1, 1000), "sid": (1, 1e5), "sdd": (1, 1e5), "energy": (10, 500),
    "spacing": (0.05, 100), "pixel_spacing": (1e-3, 100), "shape": (4, 2048), "sizes": (8, 1024),
    "guidance": (0, 100), "factor": (2, 32), "fov_mm": (1, 2000), "emboli": (0, 1), "detail": (0, 10),
    "noise": (0, 1000), "realism": (0, 10), "batch": (1, 1024), "latent_shape": (1, 1024), "train_shape": (4, 2048),
    "volume": (4, 4096), "roi": (4, 2048), "patch": (4, 2048), "depths": (1, 4096), "window": (-10000, 100000),
    "plane_chunk": (1, 8192), "in_plane": (8, 2048), "chunk": (1, 4096), "overlap": (0, 0.95), "latent_window": (1, 1024),
    "num_splits": (1, 64), "latent_channels": (1, 1024), "stages": (1, 8), "seed": (0, 2**63 - 1), "views": (1, 64),
}
_NUMBER = re.compile(r"^-?\d+(\.\d*)?([eE]-?\d+)?$")


def normalise_argv(argv: list[str]) -> list[str]:
    """Joins space-separated numbers after multi-value flags into one comma-separated value for fire."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in _MULTI_VALUE_FLAGS:
            j = i + 1
            vals = []
            while j < len(argv) and _NUMBER.match(argv[j]):
                vals.append(argv[j])
                j += 1
            if vals:
                out.append(f"{tok}=" + ",".join(vals) + ("," if len(vals) == 1 else ""))
                i = j
                continue
        out.append(tok)
        i += 1
    return out


#: where results go while a command runs (stdout itself is pointed at stderr then)
_result_stream: Any = None


def _emit_text(text: str) -> None:
    """Writes a command's result (JSON text) to stdout, the only thing a command writes there."""
    out = _result_stream if _result_stream is not None else sys.stdout
    out.write(text.rstrip("\n") + "\n")
    out.flush()


def _emit(obj: Any) -> None:
    _emit_text(json.dumps(obj, indent=2))


def _tuple(x: Any, n: int | None = None, name: str = "value") -> tuple:
    t = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    if n is not None and len(t) not in (1, n):
        raise ValueError(f"--{name} takes 1 or {n} numbers, got {len(t)}")
    return t if n is None or len(t) == n else t * n


def _sizes(x: Any, name: str) -> list[int]:
    """``--name X,Y,Z`` (or one number for all three) as 3 positive voxel counts."""
    try:
        sizes = [int(v) for v in _tuple(x, 3, name)]
    except (TypeError, ValueError):
        raise ValueError(f"--{name} takes 3 positive integers (X,Y,Z voxels), got {str(x)[:40]!r}") from None
    if min(sizes) < 1:
        raise ValueError(f"--{name} takes 3 positive integers (X,Y,Z voxels), got {sizes}")
    return sizes


def _one_int(x: Any) -> int:
    """``--batch 2`` arrives as 2 or, through the multi-value flags, as (2,)."""
    return int(x[0]) if isinstance(x, (tuple, list)) else int(x)


def _network_args(overrides: dict[str, Any]) -> dict[str, Any]:
    """A demo's ``network_def#key`` config overrides as the network's keyword arguments."""
    return {k.split("#", 1)[1]: v for k, v in overrides.items()}


class Bench:
    """Benchmarks; each prints JSON and writes it to ``--out`` when given."""

    def drr(self, size: int = 256, shape: Any = (512, 512, 133), spacing: Any = (0.7, 0.7, 2.5),
            pixel_spacing: float = 2.0, sid: float = 850.0, sdd: float = 1020.0, views: str = "ap,lateral",
            backend: str = "joseph", input_kind: str = "hu", plane_chunk: int = 128, repeats: int = 3,
            device: str = "cpu", dtype: str = "float32", out: str | None = None, plot: str | None = None) -> None:
        """Seconds per cone-beam DRR, forward and forward+backward (targets 0.3 s / 1.0 s on 2 CPU cores)."""
        from ctsynth.bench import bench_drr, write_json

        res = bench_drr(_tuple(shape, 3, "shape"), _tuple(spacing, 3, "spacing"), size, pixel_spacing, sid, sdd,
                        views, backend, input_kind, plane_chunk, repeats, device, dtype)
        _emit_text(write_json(res, out, plot))


    def cascade(self, sizes: Any = (64, 128, 256), stages: Any = None, batch: Any = 2, xray_size: int = 512,
                views: int = 2, repeats: int = 3, device: str = "cpu", amp: bool = False, small: bool = False,
                out: str | None = None, plot: str | None = None) -> None:
        """Training-step time and peak memory per cascade stage (the bundle's network and stage losses).

        ``--small`` uses the demo's widths (for CPU smoke runs); the default is the bundle's full network.
        On a GPU: ``ctsynth bench cascade --device cuda --amp --stages 3 --batch 2`` (target: <= 24 GB).
        """
        from ctsynth.bench import bench_cascade, write_json

        network = None
        if small:
            from ctsynth.demo import CASCADE_DEMO_NETWORK

            network = _network_args(CASCADE_DEMO_NETWORK)
        res = bench_cascade(_tuple(sizes), None if stages is None else _tuple(stages), batch if isinstance(batch, int)
                            else _tuple(batch), xray_size, views, repeats, device, amp, network)
        _emit_text(write_json(res, out, plot))


    def maisi(self, depths: Any = (32, 64, 128), in_plane: int = 64, chunk: int = 32, overlap: float = 0.25,
              device: str = "cpu", small: bool = False, num_splits: int = 1, out: str | None = None,
              plot: str | None = None) -> None:
        """Windowed MAISI encode + decode: time and peak memory per depth (flat memory as the depth grows)."""
        from ctsynth.bench import bench_maisi, write_json

        res = bench_maisi(_tuple(depths), in_plane, chunk, overlap, device, small, num_splits)
        _emit_text(write_json(res, out, plot))

    def vqgan(self, train_shape: Any = (256, 256, 64), batch: Any = 2, volume: Any = (512, 512, 128), roi: Any = (256, 256, 128),
              repeats: int = 3, device: str = "cpu", amp: bool = False, small: bool = False, out: str | None = None,
              plot: str | None = None) -> None:
        """xray2ctpa_vqgan VQ-GAN: training-step time and peak memory at ``--train-shape``, and the patch-wise path's
        throughput on a ``--volume`` in ``--roi`` windows (``--volume none`` skips it). ``--small`` uses the
        demo's widths; ``--plot PNG`` draws the timings."""
        from ctsynth.bench import bench_vqgan, write_json

        network = None
        if small:
            from ctsynth.demo import CTPA_DEMO_VQGAN

            network = _network_args(CTPA_DEMO_VQGAN)
        vol = None if volume in (None, "none", "None") else _tuple(volume, 3, "volume")
        b = _one_int(batch)
        res = bench_vqgan(_tuple(train_shape, 3, "train-shape"), b, vol, _tuple(roi, 3, "roi"), repeats, device, amp, network)
        _emit_text(write_json(res, out, plot))


    def diffusion(self, bundle: str = "slice_interp_ldm", latent_shape: Any = (64, 64, 32), batch: Any = 2,
                  repeats: int = 3, device: str = "cpu", amp: bool = False, small: bool = False, latent_channels: int = 64,
                  xray_size: int = 256, phases: str = "train,sample", out: str | None = None,
                  plot: str | None = None) -> None:
        """A bundle's denoiser (``--bundle slice_interp_ldm`` or ``xray2ctpa_vqgan``): training-step and sampling-step
        time and peak memory at ``--latent-shape``; ``--small`` uses the demo's widths; ``--phases sample`` times
        the sampling step alone (the peak memory is then inference's)."""
        from ctsynth.bench import bench_diffusion, write_json

        network = None
        if small:
            from ctsynth.demo import CTPA_DEMO_DENOISER, SLICE_DEMO_DENOISER

            demo = CTPA_DEMO_DENOISER if bundle == "xray2ctpa_vqgan" else SLICE_DEMO_DENOISER
            network = _network_args(demo)
        b = _one_int(batch)
        res = bench_diffusion(bundle, _tuple(latent_shape, 3, "latent-shape"), b, repeats, device, amp, network,
                              latent_channels, xray_size, phases=[p.strip() for p in str(phases).split(",") if p.strip()])
        _emit_text(write_json(res, out, plot))

    def generate(self, sizes: Any = ((512, 512, 64), (512, 512, 128)), train_shape: Any = (256, 256, 128),
                 spacing: Any = (0.7, 0.7, 2.5), steps: int = 2, guidance: float = 1.0, overlap: float = 0.25,
                 xray_size: int = 256, small: bool = False, device: str = "cpu", out: str | None = None,
                 plot: str | None = None) -> None:
        """Full-resolution X-ray -> CTPA generation (xray2ctpa_vqgan) at each of ``--sizes`` (X,Y,Z volumes; default
        512x512x64 and 512x512x128) by a denoiser trained on ``--train-shape`` volumes, whose latent grid is the
        sampling window: seconds, windows, peak memory and the output's size per volume, and the seam ratio.
        ``--small`` uses the demo's network widths."""
        from ctsynth.bench import write_json
        from ctsynth.bundles import bundle_module

        network = vqgan = None
        if small:
            from ctsynth.demo import CTPA_DEMO_DENOISER, CTPA_DEMO_VQGAN

            network, vqgan = _network_args(CTPA_DEMO_DENOISER), _network_args(CTPA_DEMO_VQGAN)
        flat = _tuple(sizes)
        shapes = [_sizes(s, "sizes") for s in flat] if flat and isinstance(flat[0], (list, tuple)) else [
            _sizes(flat, "sizes")]
        res = bundle_module("xray2ctpa_vqgan", "bench").bench_generate(
            shapes, _sizes(train_shape, "train-shape"), [float(v) for v in _tuple(spacing, 3, "spacing")], int(steps),
            float(guidance), float(overlap), int(xray_size), network, vqgan, device)
        _emit_text(write_json(res, out, plot))

    def interpolate(self, shape: Any = (512, 512, 26), spacing: Any = (0.7, 0.7, 12.5), factor: int = 5,
                    method: str = "self-supervised", steps: int = 400, seed: int = 0, realism: float = 1.0,
                    out: str | None = None, plot: str | None = None) -> None:
        """``ctsynth interpolate`` on a phantom's thick series of ``--shape`` voxels at ``--spacing`` mm (its
        ``--factor``-slice slab averages) back to thin slices: seconds and peak memory per phase (interpolate, fit,
        refine) and the gain over cubic against the phantom's thin series."""
        from ctsynth.bench import bench_interpolate, write_json

        res = bench_interpolate(_tuple(shape, 3, "shape"), _tuple(spacing, 3, "spacing"), factor, method, steps, seed,
                                realism)
        _emit_text(write_json(res, out, plot))

    def autoencoder(self, patch: Any = (64, 64, 64), batch: Any = 1, repeats: int = 3, device: str = "cpu",
                    small: bool = False, num_splits: int = 1, out: str | None = None, plot: str | None = None) -> None:
        """slice_interp_ldm's MAISI-architecture autoencoder: training-step time and peak memory on ``--patch``
        crops (released widths; ``--small`` the demo's). ``--num-splits``: the released model splits its
        convolutions 8 ways for 512-pixel slices; patches need fewer."""
        from ctsynth.bench import bench_autoencoder, write_json

        overrides: dict[str, Any] = {"num_splits": int(num_splits)}
        if small:
            from ctsynth.demo import SLICE_DEMO_AUTOENCODER

            overrides = dict(SLICE_DEMO_AUTOENCODER)
        b = _one_int(batch)
        _emit_text(write_json(bench_autoencoder(_tuple(patch, 3, "patch"), b, repeats, device, overrides), out, plot))

    def classifier(self, volume: Any = (256, 256, 64), batch: Any = 4, repeats: int = 3, device: str = "cpu",
                   small: bool = False, out: str | None = None, plot: str | None = None) -> None:
        """xray2ctpa_vqgan's PE classifier: training-step time and peak memory on ``--volume`` inputs (the bundle's
        ResNet; ``--small`` the demo's widths)."""
        from ctsynth.bench import bench_classifier, write_json

        overrides = None
        if small:
            from ctsynth.demo import CTPA_DEMO_CLASSIFIER

            overrides = _network_args(CTPA_DEMO_CLASSIFIER)
        b = _one_int(batch)
        _emit_text(write_json(bench_classifier(_tuple(volume, 3, "volume"), b, repeats, device, overrides), out, plot))


class Prepare:
    """Dataset preparation per bundle; each writes a MONAI datalist and a report of skipped inputs."""

    def xray2ct(self, ct: Any, out: str, views: Any = 2, sizes: Any = (64, 128, 256), xray_size: int = 512,
                sid: float = 1000.0, sdd: float = 1200.0, seed: int = 0, remove_table: bool = False) -> None:
        """CTs (NIfTI, DICOM folders or zips; paths or globs) -> cubes per stage size, radiographs, geometry, datalist.

        ``--remove-table`` sets everything outside the body (table, cushions) to air first.
        """
        from ctsynth.prepare import prepare_xray2ct

        ct_list = list(ct) if isinstance(ct, (list, tuple)) else [str(ct)]
        _emit(prepare_xray2ct(ct_list, out, views, _tuple(sizes), xray_size, sid_mm=sid, sdd_mm=sdd, seed=seed,
                              table_removal=remove_table))


    def slice_interp(self, studies: str, out: str, seed: int = 0) -> None:
        """STUDIES/<category>/<patient>(.zip) with thick and thin DICOM series -> aligned NIfTI pairs, datalist
        (75/15/10 split stratified by category) and a report of skipped studies."""
        from ctsynth.prepare import prepare_slice_interp

        _emit(prepare_slice_interp(studies, out, seed=seed))

    def ctpa(self, studies: str, out: str, xrays: str | None = None, labels: str | None = None,
             shape: Any = (256, 256, 64), native: bool = False, window: Any = (-1024.0, 3071.0), xray_size: int = 256,
             seed: int = 0) -> None:
        """STUDIES/<patient> (DICOM folder, zip or NIfTI) -> CTPA NIfTI at --shape (or --native grid), the paired
        X-ray from --xrays DIR (<id>.png/.dcm/...) or an AP DRR, PE labels from --labels CSV (id,label), datalist
        with kVp / kernel / spacing per case and a deterministic split, and a report of skipped studies."""
        from ctsynth.prepare import prepare_ctpa

        _emit(prepare_ctpa(studies, out, None if native else _tuple(shape, 3, "shape"), _tuple(window, 2, "window"),
                           xrays, labels, xray_size, seed=seed))

    def phantom_ctpa(self, out: str, n: int = 8, shape: Any = (64, 64, 48), spacing: float = 5.0,
                     emboli: float = 0.5, seed: int = 0) -> None:
        """CTPA-like phantoms (contrast, emboli in a fraction) as OUT/studies/*.nii.gz + OUT/labels.csv, ready for
        `ctsynth prepare ctpa --studies OUT/studies --labels OUT/labels.csv`."""
        from ctsynth.prepare import write_phantom_ctpa_studies

        spacing = float(spacing[0] if isinstance(spacing, (tuple, list)) else spacing)
        root = write_phantom_ctpa_studies(out, n, _tuple(shape, 3, "shape"), spacing, emboli, seed)
        _emit({"studies": str(root / "studies"), "labels": str(root / "labels.csv")})

    def phantom_pairs(self, out: str, n: int = 12, shape: Any = (64, 64, 84), spacing: float = 2.0, factor: int = 5,
                      seed: int = 0, detail: float = 0.0, keep_proportions: bool = True, realism: float = 0.0) -> None:
        """Thin phantoms and their FACTOR-times thicker slab averages -> the slice_interp_ldm dataset layout (try
        the bundle without data); --detail 1 adds fine anatomy without a preferred direction; the anatomy keeps its
        proportions unless --keep_proportions false (then z is stretched to fill the depth); --realism 1 adds a
        routine chest CT's partial volume, texture and noise (correlated, CT's noise power spectrum)."""
        from ctsynth.prepare import prepare_phantom_pairs

        spacing = float(spacing[0] if isinstance(spacing, (tuple, list)) else spacing)
        _emit(prepare_phantom_pairs(out, n, _tuple(shape, 3, "shape"), spacing, factor, seed=seed, detail=detail,
                                    keep_proportions=keep_proportions, realism=realism))


class BundleCommands:
    """Bundle packaging and MONAI's checks: ``ctsynth bundle pack NAME --out DIR``, ``ctsynth bundle verify NAME``."""

    def pack(self, name: str, out: str = "dist", weights: bool = False, weights_url: str | None = None) -> None:
        """Zips bundle NAME as ``OUT/NAME_v<version>.zip`` (the model zoo's layout), fit for
        ``python -m monai.bundle download --name NAME --url file:///abs/OUT/NAME_v<version>.zip --bundle_dir D``.
        ``--weights`` also packs models/ weights (left out by default: large_files.yml points at them);
        ``--weights-url URL`` copies them to ``OUT/NAME_v<version>_files/`` for upload to URL and lists them, with
        their sha256, in the packed large_files.yml."""
        from ctsynth.bundles import pack_bundle

        path = pack_bundle(name, out, weights=weights, weights_url=weights_url)
        _emit({"written": str(path), "bytes": path.stat().st_size, "url": path.resolve().as_uri()})


    def verify(self, name: str, schema: str | None = None, export: str | None = None, models_dir: str | None = None,
               device: str = "cpu", geometry: str | None = None) -> None:
        """MONAI's bundle checks of NAME: ``verify_metadata`` against ``--schema`` (a local copy of MONAI's metadata
        schema), ``verify_net_in_out`` of each exportable network and, with ``--export DIR``, their ``ckpt_export``
        to TorchScript (metadata and configs embedded) from the weights in ``--models-dir`` (default the bundle's
        models/). ``--geometry G.json`` (cascade_xray2ct) fixes the acquisition geometry the cascade is checked and
        exported for. Prints what was checked and which networks are not exported, with the reason."""
        from ctsynth.bundles import verify_bundle

        _emit(verify_bundle(name, schema=schema, export_dir=export, models_dir=models_dir, device=device,
                            settings={"geometry": geometry}))


class CLI:
    """ctsynth: synthesise CT where a full scan is missing."""

    def __init__(self) -> None:
        self.bench = Bench()
        self.prepare = Prepare()
        self.bundle = BundleCommands()

    def demo(self, out: str = "demo_out", bundle: str = "all", n: int = 3, seed: int = 0, realism: float = 0.0,
             conditioning: str | None = None, views: int = 2, baseline: bool = True) -> None:
        """Runs the built-in demos on generated phantoms; writes OUT/<demo>/metrics.json. ``--realism 1``: the slice
        interpolation demo's phantoms carry a routine chest CT's partial volume, texture and noise;
        ``--conditioning aligned|tokens|aligned+tokens``: how the xray2ctpa demo's denoiser sees the X-ray;
        ``--views 4``: the cascade demo's radiographs per case (use another --out than a 2-view run's);
        ``--nobaseline``: the cascade demo skips training its U-Net baseline."""
        from ctsynth.demo import run_demo

        res = run_demo(out, bundle, n=n, seed=seed, realism=realism, conditioning=conditioning, views=views,
                       baseline=baseline)
        _emit({name: str(Path(out) / name / "metrics.json") for name in res})

    def reconstruct(self, *xrays: str, geometry: str, out: str, checkpoint: str | None = None,
                    ground_truth: str | None = None, save_stages: bool = False, fov_mm: float | None = None,
                    preview: bool = True, device: str | None = None) -> None:
        """Radiographs (one per view, in the geometry's order; NIfTI, PNG/TIFF 8/16-bit or DICOM) -> CT NIfTI.

        Runs the cascade_xray2ct bundle's inference with the network stored in ``--checkpoint`` (default:
        the bundle's models/model.pt). Writes OUT, OUT's .png preview and .json report (re-projection PSNR,
        and metrics against ``--ground-truth`` when given); ``--save-stages`` writes every stage's output.
        """
        from ctsynth.bundles import bundle_models, checkpoint_settings, run_bundle

        if not xrays:
            raise ValueError("give the radiographs: ctsynth reconstruct AP LATERAL [...] --geometry G.json --out CT.nii.gz")
        ckpt = checkpoint or str(bundle_models("cascade_xray2ct") / "model.pt")
        overrides = {"xrays": [str(x) for x in xrays], "geometry": geometry, "output": out,
                     "ground_truth": ground_truth, "save_stages": save_stages, "fov_mm": fov_mm, "preview": preview,
                     **checkpoint_settings("cascade_xray2ct", ckpt)}
        _emit(run_bundle("cascade_xray2ct", ["inference.json"], "inference", overrides, device=device)[0])

    def interpolate(self, thick: str, out: str, spacing: float = 1.0, method: str = "cubic",
                    model: str | None = None, save_model: str | None = None, steps: int = 400,
                    dicom_out: str | None = None, series_uid: str | None = None, seed: int = 0,
                    samples: int = 1, checkpoint: str | None = None, autoencoder: str | None = None,
                    inference_steps: int = 50, self_supervised: bool = False, device: str | None = None,
                    flips: bool | None = None, consistency: bool = False) -> None:
        """Thick-slice CT (NIfTI, DICOM folder or zip) -> thin slices at ``--spacing`` mm, as NIfTI (and DICOM).

        Methods: ``cubic`` / ``linear`` interpolation; ``self-supervised`` (or ``--self-supervised``: learns from
        the volume's own in-plane detail, SMORE-style, in a few minutes on CPU; ``--save-model`` keeps it);
        ``refiner`` (a model trained by ``--save-model`` or on paired data, ``--model PATH``); ``ldm`` (the
        slice_interp_ldm bundle's latent diffusion model, ``--checkpoint`` and ``--autoencoder``, default the
        bundle's models/; ``--samples K`` > 1 also writes the per-voxel standard deviation, OUT_std.nii.gz).
        The refiners refine the cubic interpolation onto the ``--spacing`` grid: a self-supervised one learns that
        spacing's slice profile from the in-plane detail, a saved one warns when it learnt another spacing. A
        self-supervised refiner averages its output over the volume's mirror images (``--flips false``: one pass, 4x
        faster, 0.08-0.17 dB less on phantoms; ``--flips true`` for a paired refiner). ``--consistency``: the
        result keeps only what is finer than a thick slice and takes the rest from the thick series (any method).
        """
        from ctsynth.io import check_outputs, load_volume, save_dicom_series, save_nifti
        from ctsynth.slices import SLICE_METHODS, interpolate_study

        spacing = float(spacing[0] if isinstance(spacing, (tuple, list)) else spacing)  # --spacing is multi-valued elsewhere
        method = "self-supervised" if self_supervised else method
        if method not in SLICE_METHODS:
            raise ValueError(f"--method must be one of {SLICE_METHODS}, got {method!r}")
        if method == "refiner" and not model:
            raise ValueError("--method refiner needs --model PATH (a refiner saved with --save-model)")
        if int(samples) > 1 and method != "ldm":
            raise ValueError(f"--samples {samples} needs --method ldm (the other methods are deterministic)")
        check_outputs([out], dicom_out, [save_model])
        if method == "ldm":
            from ctsynth.bundles import bundle_models, checkpoint_settings, run_bundle

            models = bundle_models("slice_interp_ldm")
            overrides = {"input": thick, "output": out, "spacing": spacing, "samples": int(samples), "seed": seed,
                         "dicom_out": dicom_out, "inference_steps": int(inference_steps),
                         "consistency": bool(consistency),
                         "autoencoder_path": autoencoder or str(models / "autoencoder.pt"),
                         **checkpoint_settings("slice_interp_ldm", checkpoint or str(models / "model.pt"))}
            _emit(run_bundle("slice_interp_ldm", ["inference.json"], "inference", overrides, device=device)[0])
            return
        vol = load_volume(thick, series_uid=series_uid)
        phases: dict[str, dict[str, float]] = {}
        result = interpolate_study(vol, spacing, method, model=model, steps=steps, seed=seed, save_model=save_model,
                                   flips=flips, consistency=consistency, phases=phases)
        save_nifti(result, out)
        report = {"written": out, "method": method, "slices": int(result.shape[3]), "spacing_mm": spacing,
                  "input_slices": int(vol.shape[3]), "consistency": bool(consistency), "phases": phases,
                  **_warnings(vol)}
        if dicom_out:
            report["dicom_files"] = len(save_dicom_series(result, dicom_out, reference=thick if Path(thick).is_dir() else None,
                                                          series_description=f"ctsynth {method} {spacing:g} mm"))
        _emit(report)

    def generate(self, xray: str, out: str, steps: int = 50, guidance: float = 1.0, samples: int = 1, seed: int = 0,
                 models_dir: str | None = None, checkpoint: str | None = None, vqgan: str | None = None,
                 dicom_out: str | None = None, preview: str | None = None, device: str | None = None,
                 shape: Any = None, latent_window: Any = None, overlap: float = 0.25) -> None:
        """Chest X-ray (PNG/JPEG/TIFF, DICOM or NIfTI) -> CT pulmonary angiography NIfTI (xray2ctpa_vqgan).

        Samples ``--samples`` volumes with ``--steps`` guided DDIM steps (classifier-free guidance ``--guidance``;
        1 = conditional model only) and writes their mean as OUT (with OUT_std.nii.gz when K > 1), a JSON report
        beside it, a tri-planar ``--preview`` PNG and a ``--dicom-out`` series on request. ``--shape X,Y,Z``: the
        grid generated at the training voxel size (default the training grid; e.g. 512,512,N for full resolution),
        sampled in overlapping latent windows (``--latent-window x,y,z``, default the training latent grid; neighbours
        share ``--overlap``) and decoded patch-wise. Weights: ``--checkpoint`` (stage 2, default MODELS/ldm.pt) and
        ``--vqgan`` (stage 1, default MODELS/vqgan.pt), MODELS being ``--models-dir`` or the bundle's models/.
        """
        from ctsynth.bundles import bundle_models, checkpoint_settings, run_bundle

        models = bundle_models("xray2ctpa_vqgan", models_dir)
        overrides = {"input": xray, "output": out, "steps": int(steps), "guidance": float(guidance),
                     "samples": int(samples), "seed": int(seed), "dicom_out": dicom_out, "preview": preview,
                     "shape": None if shape is None else _sizes(shape, "shape"),
                     "latent_window": None if latent_window is None else _sizes(latent_window, "latent-window"),
                     "overlap": float(overlap), "vqgan_path": vqgan or str(models / "vqgan.pt"),
                     **checkpoint_settings("xray2ctpa_vqgan", checkpoint or str(models / "ldm.pt"), role="ldm")}
        _emit(run_bundle("xray2ctpa_vqgan", ["inference.json"], "inference", overrides, device=device)[0])

    def phantom(self, out_dir: str, n: int = 1, shape: Any = (128, 128, 128), spacing: Any = 3.0,
                contrast: bool = False, emboli: float = 0.0, format: str = "nifti", seed: int = 0,
                noise: float = 0.0, detail: float = 0.0, keep_proportions: bool = False, realism: float = 0.0) -> None:
        """Writes N thorax phantoms (HU) as NIfTI files or DICOM series, with a phantoms.json manifest (--detail 1:
        fine anatomy without a preferred direction: peripheral vessel trees, nodules, tissue texture;
        --keep_proportions: z scaled like x and y instead of stretched to fill the depth; --realism 1: a routine
        chest CT's partial volume, tissue texture and noise with CT's noise power spectrum)."""
        from tqdm.auto import tqdm

        from ctsynth.atomic import atomic_write_json
        from ctsynth.io import check_outputs, save_dicom_series, save_nifti
        from ctsynth.phantoms import thorax_phantom

        if format not in ("nifti", "dicom"):
            raise ValueError(f"--format must be 'nifti' or 'dicom', got {format!r}")
        out = Path(out_dir)
        check_outputs(files=[out / "phantoms.json"])
        out.mkdir(parents=True, exist_ok=True)
        manifest = []
        for i in tqdm(range(n), desc="phantoms", unit="vol"):
            vol, info = thorax_phantom(_tuple(shape, 3, "shape"), _tuple(spacing, 3, "spacing"), seed=seed + i,
                                       contrast=contrast, emboli=emboli, noise_hu=noise, detail=detail,
                                       keep_proportions=keep_proportions, realism=realism)
            name = f"phantom_{seed + i:04d}"
            path = save_nifti(vol, out / f"{name}.nii.gz") if format == "nifti" else save_dicom_series(
                vol, out / name, series_description=f"ctsynth phantom seed {seed + i}")[0].parent
            manifest.append({"path": str(path.relative_to(out)), "seed": info.seed, "contrast": info.contrast,
                             "emboli": info.emboli, "pe": int(info.emboli > 0)})
        atomic_write_json(manifest, out / "phantoms.json")
        _emit({"written": len(manifest), "out_dir": str(out)})

    def drr(self, volume: str, out: str, views: str = "ap,lateral", size: int = 256, pixel_spacing: float | None = None,
            sid: float = 1000.0, sdd: float = 1200.0, parallel: bool = False, energy: float = 70.0,
            series_uid: str | None = None) -> None:
        """Renders DRRs of a CT: one NIfTI (line integral of mu) and one PNG per view, plus geometry.json."""
        import torch

        from ctsynth.drr import DRRProjector, display_image
        from ctsynth.geometry import ProjectionGeometry, volume_extent_mm
        from ctsynth.io import check_outputs, load_volume, save_projection_nifti
        from ctsynth.plots import save_image_png

        check_outputs(files=[Path(out) / "geometry.json"])
        vol = load_volume(volume, series_uid=series_uid)
        shape = vol.shape[1:]
        if pixel_spacing is None:  # cover the volume's largest extent with 10% margin, magnified
            extent = max(volume_extent_mm(vol.affine, shape))
            pixel_spacing = extent * 1.1 * (1.0 if parallel else sdd / sid) / size
        geom = ProjectionGeometry.for_volume(vol.affine, shape, views=views, detector_shape=(size, size),
                                             pixel_spacing_mm=pixel_spacing, sid_mm=sid, sdd_mm=sdd,
                                             kind="parallel" if parallel else "cone")
        with torch.no_grad():
            li = DRRProjector(geom, energy_kev=energy)(vol[None], vol.affine)[0]
        outp = Path(out)
        names = [v.strip() for v in views.split(",")] if isinstance(views, str) else [str(v) for v in views]
        if len(names) != geom.num_views:
            names = [f"view{i}_{float(a):g}deg" for i, a in enumerate(geom.angles_deg)]
        files = []
        for i, name in enumerate(names):
            files.append(str(save_projection_nifti(li[i], outp / f"drr_{name}.nii.gz", geom.pixel_spacing_mm.tolist())))
            save_image_png(display_image(li[i]), outp / f"drr_{name}.png", 0.0, 1.0)
        geom.save_json(outp / "geometry.json")
        _emit({"views": files, "geometry": str(outp / "geometry.json"), "energy_kev": energy})

    def metrics(self, pred: str, target: str, window: Any = (-1000.0, 1000.0), mode: str = "3d",
                mask: str | None = None, resample: bool = False) -> None:
        """PSNR / SSIM / MAE (HU) between two CT volumes on a window, and the HU bias by tissue with the LAA-950
        difference (``hu_fidelity``, by TARGET's HU, unclipped); prints JSON.

        Both must lie on the same voxel grid in space (shape and affine: an x-flipped copy or one 300 mm away is
        refused); ``--resample`` resamples PRED (linear) onto TARGET's grid instead. ``--mask`` (non-zero voxels,
        on TARGET's grid) must select at least one voxel.
        """
        from ctsynth.io import load_volume
        from ctsynth.metrics import compute_image_metrics, hu_fidelity, same_grid

        p, t = load_volume(pred), load_volume(target)
        if resample and not same_grid(p, t):
            from monai.transforms import ResampleToMatch

            p = ResampleToMatch(mode="bilinear", padding_mode="border")(p, t)
        if not same_grid(p, t):
            raise ValueError(f"{pred} and {target} lie on different voxel grids ({same_grid(p, t, explain=True)}); "
                             "compare volumes on one grid, or pass --resample to resample PRED onto TARGET's grid")
        m = None
        if mask:
            mv = load_volume(mask)
            if not same_grid(mv, t):
                raise ValueError(f"mask {mask} is not on {target}'s voxel grid ({same_grid(mv, t, explain=True)}); "
                                 "resample the mask onto the target first")
            m = mv > 0
            if not bool(m.any()):
                raise ValueError(f"mask {mask} selects no voxel (all zero); pass a mask with the region to score")
        result = compute_image_metrics(p, t, window=_tuple(window, 2, "window"), mode=mode, mask=m)
        pv, tv = (p.as_tensor(), t.as_tensor()) if m is None else (p.as_tensor()[m], t.as_tensor()[m])
        _emit({**result, "hu_fidelity": hu_fidelity(pv, tv)})

    def convert(self, input: str, output: str, series_uid: str | None = None, series_description: str | None = None,
                resample: bool = False, reference: str | None = None) -> None:
        """DICOM folder/zip -> NIfTI, or NIfTI -> DICOM series folder (reference: copy patient/study tags)."""
        from ctsynth.io import check_outputs, is_nifti, load_volume, save_dicom_series, save_nifti

        to_nifti = is_nifti(output)
        check_outputs([output] if to_nifti else [], None if to_nifti else output)
        vol = load_volume(input, series_uid=series_uid, series_description=series_description, resample_nonuniform=resample)
        if to_nifti:
            save_nifti(vol, output)
            _emit({"written": output, "shape": list(vol.shape[1:]), **_warnings(vol)})
        else:
            files = save_dicom_series(vol, output, reference=reference)
            _emit({"written": output, "files": len(files), **_warnings(vol)})


def _warnings(volume: Any) -> dict[str, Any]:
    """``{"warnings": [...]}`` for a report when reading ``volume`` raised any (e.g. a CT without rescale tags)."""
    found = list(getattr(volume, "meta", {}).get("warnings", []) or [])
    return {"warnings": found} if found else {}


#: errors that mean bad input (exit status 1): the message names the file or setting and the fix
_INPUT_ERRORS = (ValueError, KeyError, OSError, TypeError)


def main(argv: list[str] | None = None) -> int:
    """Runs a ``ctsynth`` command; returns its exit status (0 done, 1 bad input, 2 bad command line).

    The command line is checked before anything runs (:func:`ctsynth.cli_args.check_command_line`); stdout
    carries only the command's JSON result, logs and progress bars go to stderr; a refusal is one message on
    stderr (``CTSYNTH_DEBUG=1`` adds the traceback).
    """
    import fire

    from ctsynth.cli_args import UsageError, check_command_line, command_name, runs_a_command
    from ctsynth.runtime import tune_cpu_allocator

    global _result_stream
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = normalise_argv(list(sys.argv[1:] if argv is None else argv))
    command = command_name(CLI(), args)
    result, _result_stream = sys.stdout, sys.stdout
    if runs_a_command(CLI(), args):  # help stays on stdout; a command's stdout is its JSON result alone
        _redirect_stdout_handlers(result, sys.stderr)
        sys.stdout = sys.stderr  # anything a library prints is a log line, not the result
    try:
        checked = check_command_line(CLI(), args, OPTION_LIMITS)
        tune_cpu_allocator()
        fire.Fire(CLI, command=checked, name="ctsynth")
        return 0
    except UsageError as e:
        return _refuse(command, e, 2, f" (`{command} --help` lists the options)")
    except _INPUT_ERRORS as e:
        return _refuse(command, e, 1)
    except Exception as e:  # noqa: BLE001 - an unforeseen failure still ends in one message, not a traceback
        return _refuse(command, e, 1, "; this looks like a bug in ctsynth: re-run with CTSYNTH_DEBUG=1 and report "
                                      "the traceback")
    finally:
        sys.stdout, _result_stream = result, None


def _refuse(command: str, error: BaseException, status: int, hint: str = "") -> int:
    """Writes the one-line refusal of ``error`` (with its traceback under ``CTSYNTH_DEBUG=1``); returns ``status``."""
    if os.environ.get("CTSYNTH_DEBUG", "").strip().lower() in ("1", "true", "yes"):
        traceback.print_exception(error, file=sys.stderr)
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
        message = f"{error.filename}: {message}"
    kind = "" if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: "
    sys.stderr.write(f"{command}: error: {kind}{message}{hint}\n")
    return status


def _redirect_stdout_handlers(stdout: Any, stderr: Any) -> None:
    """Points logging handlers that write to ``stdout`` (MONAI's do) at ``stderr``."""
    loggers = [logging.getLogger(), *[lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)]]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stdout:
                h.setStream(stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
