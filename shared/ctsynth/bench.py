"""Benchmarks with JSON output (``ctsynth bench ...``). Targets live here, never in timed tests."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ctsynth.atomic import atomic_write, atomic_write_text
from ctsynth.drr import DRRProjector
from ctsynth.geometry import ProjectionGeometry
from ctsynth.runtime import peak_rss_mb

__all__ = ["machine_info", "time_call", "SavedTensorTally", "plain_network_args", "reset_peak_memory", "peak_memory_mb", "bench_drr", "bench_cascade", "bench_maisi", "bench_vqgan", "bench_diffusion",
           "bench_autoencoder", "bench_classifier", "bench_interpolate", "write_json", "plot_benchmark"]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Where a figure was measured."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, device: str = "cpu") -> dict[str, float]:
    """Wall-clock seconds of ``fn`` (median, min, max over ``repeats`` after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def bench_drr(
    shape: Sequence[int] = (512, 512, 133),
    spacing: Sequence[float] = (0.7, 0.7, 2.5),
    size: int = 256,
    pixel_spacing: float = 2.0,
    sid: float = 850.0,
    sdd: float = 1020.0,
    views: str = "ap,lateral",
    backend: str = "joseph",
    input_kind: str = "hu",
    plane_chunk: int = 128,
    repeats: int = 3,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict[str, Any]:
    """Seconds per cone-beam DRR, forward and forward+backward, one view at a time.

    Defaults are the reference job: a 256x256 view of a 512x512x133 CT (0.7x0.7x2.5 mm), source 850 mm
    from the isocentre, detector 1020 mm from the source, 2 mm pixels, float32.
    """
    torch.manual_seed(0)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    vol = torch.rand(1, 1, *shape, device=device) * 2000.0 - 1000.0
    if input_kind == "mu":
        vol = vol.clamp_min(-1000) * 0.0 + torch.rand_like(vol) * 0.04
    vol = vol.to(dt)
    results = {}
    for view in views.split(","):
        g = ProjectionGeometry.for_volume(affine, shape, views=view, detector_shape=(size, size),
                                          pixel_spacing_mm=pixel_spacing, sid_mm=sid, sdd_mm=sdd).to(device)
        proj = DRRProjector(g, backend=backend, input_kind=input_kind, plane_chunk=plane_chunk)

        def fwd() -> None:
            with torch.no_grad():
                proj(vol, affine)

        def fwd_bwd() -> None:
            v = vol.detach().requires_grad_(True)
            proj(v, affine).sum().backward()

        results[view] = {"forward": time_call(fwd, repeats, device=device),
                         "forward_backward": time_call(fwd_bwd, repeats, device=device)}
    fwd_s = statistics.mean(r["forward"]["median_s"] for r in results.values())
    fb_s = statistics.mean(r["forward_backward"]["median_s"] for r in results.values())
    return {
        "benchmark": "drr",
        "job": {"volume_shape": list(shape), "spacing_mm": list(spacing), "detector": [size, size],
                "pixel_spacing_mm": pixel_spacing, "sid_mm": sid, "sdd_mm": sdd, "kind": "cone",
                "backend": backend, "input_kind": input_kind, "dtype": dtype, "plane_chunk": plane_chunk},
        "seconds_per_drr": {"forward": fwd_s, "forward_backward": fb_s},
        "targets": {"forward_s": 0.3, "forward_backward_s": 1.0},
        "meets_target": {"forward": fwd_s <= 0.3, "forward_backward": fb_s <= 1.0},
        "per_view": results,
        "machine": machine_info(device),
    }


def write_json(result: dict[str, Any], out: str | Path | None, plot: str | Path | None = None) -> str:
    """The result as JSON text, also written to ``out`` and drawn as a bar chart of its timings to ``plot``."""
    text = json.dumps(result, indent=2)
    if out is not None:
        atomic_write_text(text + "\n", out)
    if plot is not None:
        plot_benchmark(result, plot)
    return text


#: loss weights per cascade stage (the bundle's train.json / stage2.json / stage3.json)
CASCADE_STAGE_LOSSES = (
    {"l1": 1.0, "ssim": 0.5},
    {"l1": 1.0, "ssim": 0.5, "vgg": 0.1},
    {"l1": 1.0, "ssim": 0.5, "vgg": 0.1, "grad": 0.2, "drr": 0.3},
)


def plain_network_args(config: dict[str, Any], key: str = "network_def") -> dict[str, Any]:
    """The arguments of a bundle config's ``key`` object that a benchmark can use as they are: plain values and
    ``@id`` references to plain top-level values (no ``_target_``, no ``$`` expressions, no references to
    objects)."""
    args = {}
    for k, v in config[key].items():
        if isinstance(v, str) and v.startswith("@") and not isinstance(config.get(v[1:]), (dict, list)):
            v = config.get(v[1:], v)
        if k != "_target_" and not (isinstance(v, str) and v[:1] in "$@"):
            args[k] = v
    return args


def reset_peak_memory(device: str) -> None:
    """Starts a new peak for :func:`peak_memory_mb` (CUDA; on the CPU the process's peak cannot be reset)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class SavedTensorTally:
    """While active, records every tensor autograd keeps for the backward pass (each storage once, the
    ``exclude`` tensors, e.g. the parameters, left out): the activation memory a training step holds between its
    forward and backward passes, by shape and dtype, on any device.

    Of a region that gradient checkpointing recomputes only the inputs are kept, so only they are counted (the
    region's intermediate tensors exist one region at a time during the backward pass).

    Args:
        exclude: tensors not to count (their storages), typically ``model.parameters()``.

    Example::

        with SavedTensorTally(model.parameters()) as tally:
            loss = model(x).sum()
        tally.summary()["total_mb"]
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[tuple[int, str], tuple[tuple[int, ...], str, int]] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), str(tensor.device))
        if key[0] not in self._exclude and key not in self._seen:
            self._seen[key] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""), storage.nbytes())
        return tensor

    def __enter__(self) -> SavedTensorTally:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def summary(self, largest: int = 8) -> dict[str, Any]:
        """``total_mb`` (MiB), ``tensors`` (count) and the ``largest`` groups of the same shape and dtype, biggest
        first: ``{"shape", "dtype", "count", "mb"}``."""
        groups: dict[tuple[tuple[int, ...], str], list[int]] = {}
        for shape, dtype, nbytes in self._seen.values():
            groups.setdefault((shape, dtype), []).append(nbytes)
        rows = sorted(({"shape": list(shape), "dtype": dtype, "count": len(sizes), "mb": sum(sizes) / 2**20}
                       for (shape, dtype), sizes in groups.items()), key=lambda r: -r["mb"])
        return {"total_mb": sum(n for *_, n in self._seen.values()) / 2**20, "tensors": len(self._seen),
                "largest": rows[:largest]}


def _optimiser_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: Any) -> None:
    """Backward and step, through the gradient scaler when float16 autocast uses one."""
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def peak_memory_mb(device: str) -> float:
    """Peak memory in MiB: CUDA's allocated peak since :func:`reset_peak_memory`, or the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()  # the process's peak resident memory


def bench_cascade(sizes: Sequence[int] = (64, 128, 256), stages: Sequence[int] | None = None, batch: int | Sequence[int] = 2,
                  xray_size: int = 512, views: int = 2, repeats: int = 3, device: str = "cpu", amp: bool = False,
                  network: dict[str, Any] | None = None) -> dict[str, Any]:
    """Training-step time and peak memory of each cascade stage (that stage's losses, earlier stages frozen).

    Uses the bundle's network (default widths of its train.json unless ``network`` overrides them), random
    radiographs, a phantom-sized field of view and the stage's loss (VGG randomly initialised).
    On GPU the peak is ``torch.cuda.max_memory_allocated``; on CPU the process peak RSS (an upper bound). Each
    stage also reports what its step keeps for the backward pass (:class:`SavedTensorTally`, from the warm-up
    step) and the parameter, gradient and AdamW-state memory, the parts a memory estimate for another device or
    batch size is made of.
    """
    import contextlib

    from ctsynth.bundles import bundle_root
    from ctsynth.engine import amp_settings, trainable_parameters
    from ctsynth.geometry import cube_affine
    from ctsynth.losses import CompositeLoss

    bundle_root("cascade_xray2ct")
    from scripts.network import ProgressiveCascade, rescale_affine  # the bundle's network

    sizes = [int(s) for s in sizes]
    stages = list(stages) if stages is not None else list(range(1, len(sizes) + 1))
    batches = [int(b) for b in batch] if isinstance(batch, (list, tuple)) else [int(batch)]
    if len(batches) == 1:
        batches = batches * len(stages)
    if len(batches) != len(stages):
        raise ValueError(f"give one batch size, or one per stage ({len(stages)}), got {batches}")
    kwargs = {"sizes": sizes, **(network or {})}
    torch.manual_seed(0)
    net = ProgressiveCascade(**kwargs).to(device)
    fov = 384.0
    geom = ProjectionGeometry(angles_deg=[180.0 * v / views for v in range(views)], sid_mm=1000.0, sdd_mm=1200.0,
                              detector_shape=(xray_size, xray_size), pixel_spacing_mm=fov * 1.15 * 1.2 / xray_size,
                              isocenter_mm=[0.0, 0.0, 0.0]).to(device)
    aff0 = cube_affine(sizes[0], fov, [0.0, 0.0, 0.0]).to(device)
    enabled, dtype, scaler = amp_settings(device, amp)
    result: dict[str, Any] = {"benchmark": "cascade", "sizes": sizes, "views": views, "xray_size": xray_size,
                              "amp": enabled, "amp_dtype": str(dtype), "machine": machine_info(device), "stages": []}
    for stage, b in zip(stages, batches):
        s = sizes[stage - 1]
        net.freeze_stages(stage - 1)
        net.train()
        loss_fn = CompositeLoss(CASCADE_STAGE_LOSSES[stage - 1], vgg_random_init=True).to(device)
        opt = torch.optim.AdamW(trainable_parameters(net), lr=1e-5)
        xr = torch.rand(b, views, xray_size, xray_size, device=device)
        target = torch.rand(b, 1, s, s, s, device=device)
        aff = rescale_affine(aff0, (sizes[0],) * 3, (s,) * 3).to(device)
        ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if enabled else contextlib.nullcontext

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with ctx():
                pred = net(xr, [geom] * b, aff0, up_to_stage=stage - 1)[-1].float()
            loss = loss_fn(pred, target, affine=aff, geometry=[geom] * b)
            _optimiser_step(loss, opt, scaler)

        reset_peak_memory(device)
        with SavedTensorTally([*net.parameters(), *loss_fn.parameters()]) as tally:
            step()  # the warm-up step, tallied
        timing = time_call(step, repeats=repeats, warmup=0, device=device)
        trainable = trainable_parameters(net)
        trainable_mb = sum(p.numel() * p.element_size() for p in trainable) / 2**20
        result["stages"].append({"stage": stage, "size": s, "batch": b, "losses": sorted(CASCADE_STAGE_LOSSES[stage - 1]),
                                 "step_s": timing, "peak_memory_mb": peak_memory_mb(device),
                                 "trainable_parameters": sum(p.numel() for p in trainable),
                                 "saved_for_backward": tally.summary(),
                                 "parameters_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20,
                                 "gradients_mb": trainable_mb, "adamw_state_mb": 2 * trainable_mb})
    return result


_MAISI_WORKER = """
import json, sys, time, torch
from ctsynth.maisi import LatentCodec, build_maisi_autoencoder
from ctsynth.runtime import peak_rss_mb
args = json.loads(sys.argv[1])
torch.manual_seed(0)
ae = build_maisi_autoencoder(**args["overrides"]).eval().to(args["device"])
codec = LatentCodec(ae, chunk=args["chunk"], overlap=args["overlap"])
x = torch.rand(1, 1, args["in_plane"], args["in_plane"], args["depth"], device=args["device"])
if args["device"].startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
z = codec.encode(x)
t1 = time.perf_counter()
y = codec.decode(z, x.shape[-3:])
t2 = time.perf_counter()
peak = (torch.cuda.max_memory_allocated() / 2**20 if args["device"].startswith("cuda")
        else peak_rss_mb())
print(json.dumps({"depth": args["depth"], "latent_shape": list(z.shape), "output_shape": list(y.shape),
                  "encode_s": t1 - t0, "decode_s": t2 - t1, "peak_memory_mb": peak}))
"""


def bench_maisi(depths: Sequence[int] = (32, 64, 128), in_plane: int = 64, chunk: int = 32, overlap: float = 0.25,
                device: str = "cpu", small: bool = False, num_splits: int = 1) -> dict[str, Any]:
    """Peak memory and time of windowed MAISI encode + decode as the number of slices grows.

    Each depth runs in a fresh process (the CPU peak is the process's maximum RSS, so runs must not share
    one); random weights of the released architecture (or ``small`` widths), random input.
    """
    import subprocess
    import sys

    overrides = {"num_channels": [8, 16, 32], "norm_num_groups": 4} if small else {}
    overrides["num_splits"] = int(num_splits)  # the release uses 8 for 512^2 slices; small slices need fewer
    rows = []
    for d in depths:
        args = {"depth": int(d), "in_plane": int(in_plane), "chunk": int(chunk), "overlap": float(overlap),
                "device": device, "overrides": overrides}
        res = subprocess.run([sys.executable, "-c", _MAISI_WORKER, json.dumps(args)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"MAISI benchmark at depth {d} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    peaks = [r["peak_memory_mb"] for r in rows]
    return {"benchmark": "maisi_codec", "architecture": "small" if small else "released (20.9 M parameters)",
            "in_plane": in_plane, "chunk": chunk, "overlap": overlap, "num_splits": num_splits,
            "machine": machine_info(device), "runs": rows,
            "peak_growth_ratio": max(peaks) / min(peaks)}


def bench_vqgan(size: Sequence[int] = (256, 256, 64), batch: int = 2, volume: Sequence[int] | None = (512, 512, 128),
                roi_size: Sequence[int] = (256, 256, 128), repeats: int = 3, device: str = "cpu", amp: bool = False,
                network: dict[str, Any] | None = None) -> dict[str, Any]:
    """xray2ctpa_vqgan stage 1: generator training-step time and peak memory at ``size`` (L1 + commitment;
    the perceptual and adversarial terms add their own networks' cost), and the patch-wise path's throughput
    on a ``volume`` reconstructed in ``roi_size`` windows (25 % overlap, Gaussian blending, stitched on CPU).

    ``network`` overrides the bundle's default widths (e.g. the demo's). ``amp``: bfloat16 autocast, on CPU too
    (as in training). On GPU the peak is
    ``torch.cuda.max_memory_allocated``; on CPU the process peak RSS (an upper bound).
    """
    from ctsynth.bundles import bundle_module
    from ctsynth.engine import amp_settings

    vqgan = bundle_module("xray2ctpa_vqgan", "vqgan")
    torch.manual_seed(0)
    net = vqgan.VQGAN3D(**(network or {})).to(device)
    cpu_bf16 = bundle_module("xray2ctpa_vqgan", "engine").VQGANIteration.cpu_bf16  # the precision training uses
    enabled, dtype, scaler = amp_settings(device, amp, cpu_bf16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    x = torch.rand(int(batch), 1, *[int(s) for s in size], device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled):
            rec, commitment, _ = net(x)
        loss = torch.nn.functional.l1_loss(rec.float(), x) + commitment.float()
        _optimiser_step(loss, opt, scaler)

    reset_peak_memory(device)
    result: dict[str, Any] = {
        "benchmark": "vqgan", "network": net.config, "parameters": sum(p.numel() for p in net.parameters()),
        "amp": enabled, "amp_dtype": str(dtype), "machine": machine_info(device),
        "train_step": {"size": [int(s) for s in size], "batch": int(batch),
                       "step_s": time_call(step, repeats=repeats, warmup=1, device=device),
                       "peak_memory_mb": peak_memory_mb(device)},
    }
    if volume is not None:
        net.eval()
        vol = torch.rand(1, 1, *[int(s) for s in volume])
        codec = vqgan.PatchwiseVQGAN.fitted(net, vol.shape[-3:], roi_size, device=device)
        timing = time_call(lambda: codec.reconstruct(vol), repeats=1, warmup=0, device=device)
        result["patchwise"] = {"volume": [int(s) for s in volume], "roi_size": list(codec.roi_size),
                               "windows": len(codec.windows(vol.shape[-3:])), "seconds": timing,
                               "voxels_per_s": vol.numel() / timing["median_s"], "peak_memory_mb": peak_memory_mb(device)}
    return result


def plot_benchmark(result: dict[str, Any], path: str | Path) -> Path:
    """A bar chart of every timing (median seconds, or a phase's seconds) in ``result``, each named by its path in
    the JSON."""
    bars: dict[str, float] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, dict):
            timing = obj.get("median_s", obj.get("seconds"))
            if isinstance(timing, (int, float)):
                bars[name] = float(timing)
                return
            for k, v in obj.items():
                walk(v, f"{name}/{k}" if name else str(k))
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    walk(result, "")
    if not bars:
        raise ValueError("no timings (entries with median_s or seconds) in the benchmark result to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(bars)))
    ax.barh(list(bars), list(bars.values()), color="#4477aa")
    ax.set_xlabel("seconds (median)")
    ax.set_title(f"ctsynth bench {result.get('benchmark', '')} on {result.get('machine', {}).get('device', '')}")
    fig.tight_layout()
    try:
        return atomic_write(lambda tmp: fig.savefig(tmp, dpi=100, format=Path(path).suffix.lstrip(".") or "png"), path)
    finally:
        plt.close(fig)


#: the denoiser of each bundle with a diffusion stage: (training config holding ``network_def``, module, class)
DIFFUSION_BENCHES = {"slice_interp_ldm": ("train.json", "sampling", "Denoiser"),
                     "xray2ctpa_vqgan": ("train_diffusion.json", "conditioning", "XrayConditionedDenoiser")}


def bench_diffusion(bundle: str = "slice_interp_ldm", latent_shape: Sequence[int] = (64, 64, 32), batch: int = 2,
                    repeats: int = 3, device: str = "cpu", amp: bool = False, network: dict[str, Any] | None = None,
                    latent_channels: int = 64, xray_size: int = 256, guidance: bool = True,
                    phases: Sequence[str] = ("train", "sample")) -> dict[str, Any]:
    """A bundle's denoiser (the ``network_def`` of its training config, ``network`` overriding arguments):
    training-step time (noisy latents -> MSE, AdamW) and one sampling step (the xray2ctpa_vqgan step runs the
    conditional and unconditional halves of classifier-free guidance together when ``guidance``), with peak
    memory. ``latent_channels`` applies to xray2ctpa_vqgan, whose latent width comes from its VQ-GAN.
    ``phases`` chooses the steps timed; on the CPU the peak is the process's, so ``("sample",)`` alone gives
    inference's peak."""
    from ctsynth.bundles import bundle_module, bundle_root
    from ctsynth.engine import amp_settings

    if bundle not in DIFFUSION_BENCHES:
        raise ValueError(f"bundle must be one of {sorted(DIFFUSION_BENCHES)}, got {bundle!r}")
    config, module, cls = DIFFUSION_BENCHES[bundle]
    args = plain_network_args(json.loads((Path(bundle_root(bundle)) / "configs" / config).read_text()))
    if bundle == "xray2ctpa_vqgan":
        args["latent_channels"] = int(latent_channels)
        # the generation grid only places the rays (not the cost): 4x the latent grid at 1 mm
        args["ray_grid"] = {"volume_shape": [4 * int(s) for s in latent_shape], "spacing_mm": [1.0, 1.0, 1.0],
                            "downsample": 4, "xray_size": int(xray_size)}
    args.update(network or {})
    torch.manual_seed(0)
    net = getattr(bundle_module(bundle, module), cls)(**args).to(device)
    c = int(args.get("latent_channels", 4))
    shape = (int(batch), c, *[int(s) for s in latent_shape])
    x, target = torch.randn(shape, device=device), torch.randn(shape, device=device)
    t = torch.randint(0, 1000, (int(batch),), device=device)
    xray = torch.rand(int(batch), 1, int(xray_size), int(xray_size), device=device)
    cond = torch.randn(shape, device=device)

    def forward(inp: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
        if bundle == "xray2ctpa_vqgan":
            return net(inp, steps, xray=xray[:n] if n <= xray.shape[0] else torch.cat([xray] * (n // xray.shape[0])))
        return net(torch.cat([inp, cond[:n] if n <= cond.shape[0] else torch.cat([cond] * (n // cond.shape[0]))], 1),
                   steps)

    enabled, dtype, scaler = amp_settings(device, amp)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def train_step() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled):
            out = forward(x, t, x.shape[0])
        loss = torch.nn.functional.mse_loss(out.float(), target)
        _optimiser_step(loss, opt, scaler)

    doubled = bundle == "xray2ctpa_vqgan" and guidance

    @torch.no_grad()
    def sample_step() -> None:
        net.eval()
        inp = torch.cat([x, x]) if doubled else x
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=enabled):
            forward(inp, torch.full((inp.shape[0],), 500, device=device), inp.shape[0])

    unknown = set(phases) - {"train", "sample"}
    if unknown or not phases:
        raise ValueError(f"phases must be train and/or sample, got {list(phases)}")
    reset_peak_memory(device)
    steps = {"train": train_step, "sample": sample_step}
    timed = {f"{ph}_step_s": time_call(steps[ph], repeats=repeats, warmup=1, device=device) for ph in phases}
    return {"benchmark": "diffusion", "bundle": bundle, "network": args, "latent_shape": list(shape),
            "parameters": sum(p.numel() for p in net.parameters()), "amp": enabled, "amp_dtype": str(dtype),
            "machine": machine_info(device), **timed, "phases": list(phases),
            "guided_sample_step": doubled, "peak_memory_mb": peak_memory_mb(device)}


def _network_step_benchmark(name: str, net: torch.nn.Module, loss_of: Callable[[], torch.Tensor], repeats: int,
                            device: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Step time (forward, ``loss_of``, backward, AdamW step) and peak memory of one network."""
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        net.train()
        opt.zero_grad(set_to_none=True)
        _optimiser_step(loss_of(), opt, None)

    reset_peak_memory(device)
    return {"benchmark": name, **extra, "parameters": sum(p.numel() for p in net.parameters()),
            "machine": machine_info(device), "step_s": time_call(step, repeats=repeats, warmup=1, device=device),
            "peak_memory_mb": peak_memory_mb(device)}


def bench_autoencoder(patch: Sequence[int] = (64, 64, 64), batch: int = 1, repeats: int = 3, device: str = "cpu",
                      overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """slice_interp_ldm's autoencoder training step (MAISI architecture, released widths unless ``overrides``):
    L1 + KL on random ``patch`` crops (the perceptual and adversarial terms add their own networks' cost)."""
    from ctsynth.bundles import bundle_module
    from ctsynth.maisi import build_maisi_autoencoder

    kl_divergence = bundle_module("slice_interp_ldm", "autoencoder").kl_divergence
    torch.manual_seed(0)
    net = build_maisi_autoencoder(**(overrides or {})).to(device)
    x = torch.rand(int(batch), 1, *[int(s) for s in patch], device=device)

    def loss() -> torch.Tensor:
        rec, mu, sigma = net(x)
        return torch.nn.functional.l1_loss(rec.float(), x) + 1e-7 * kl_divergence(mu, sigma)

    return _network_step_benchmark("maisi_autoencoder", net, loss, repeats, device,
                                   {"patch": [int(s) for s in patch], "batch": int(batch), "overrides": overrides or {}})


def bench_classifier(shape: Sequence[int] = (256, 256, 64), batch: int = 4, repeats: int = 3, device: str = "cpu",
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """xray2ctpa_vqgan's PE classifier training step (the ``classifier_def`` of train_classifier.json, ``overrides``
    applied): binary cross-entropy on random volumes of ``shape``."""
    from monai.networks.nets import ResNet

    from ctsynth.bundles import bundle_root

    spec = json.loads((Path(bundle_root("xray2ctpa_vqgan")) / "configs" / "train_classifier.json").read_text())
    args = {k: v for k, v in spec["classifier_def"].items() if k != "_target_"}
    args.update(overrides or {})
    torch.manual_seed(0)
    net = ResNet(**args).to(device)
    x = torch.rand(int(batch), 1, *[int(s) for s in shape], device=device)
    y = (torch.arange(int(batch), device=device) % 2).float()[:, None]
    return _network_step_benchmark("pe_classifier", net, lambda: torch.nn.functional.binary_cross_entropy_with_logits(
        net(x).float(), y), repeats, device, {"shape": [int(s) for s in shape], "batch": int(batch), "network": args})


def bench_interpolate(shape: Sequence[int] = (512, 512, 26), spacing: Sequence[float] = (0.7, 0.7, 12.5),
                      factor: int = 5, method: str = "self-supervised", steps: int = 400, seed: int = 0,
                      realism: float = 1.0) -> dict[str, Any]:
    """``ctsynth interpolate``'s work on a thick series of ``shape`` voxels at ``spacing`` mm (a phantom's
    ``factor``-slice slab averages, with ``realism``), back to ``spacing[2] / factor`` mm with ``method``: seconds
    and the process's peak resident memory during each phase (``interpolate``, ``fit``, ``refine``), and the PSNR
    gain over cubic against the phantom's thin series (3D, [-1000, 1000] HU). ``peak_memory_mb`` is the largest
    phase peak: the command's own, without the phantom's making (Linux; elsewhere the process's peak)."""
    from ctsynth.metrics import compute_image_metrics
    from ctsynth.phantoms import slab_average, thorax_phantom
    from ctsynth.slices import interpolate_study

    shape, spacing = [int(s) for s in shape], [float(s) for s in spacing]
    thin_mm = spacing[2] / int(factor)
    t0 = time.perf_counter()
    thin, _ = thorax_phantom((shape[0], shape[1], shape[2] * int(factor)), (spacing[0], spacing[1], thin_mm),
                             seed=seed, keep_proportions=True, realism=realism)
    thick = slab_average(thin, int(factor), axis=2)
    prepare_s = time.perf_counter() - t0
    phases: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    pred = interpolate_study(thick, thin_mm, method, steps=steps, seed=seed, phases=phases)
    total_s = time.perf_counter() - t0
    peak_mb = max(p["peak_rss_mb"] for p in phases.values())
    cubic = interpolate_study(thick, thin_mm, "cubic")
    scores = {m: compute_image_metrics(v, thin, window=(-1000, 1000))["psnr"] for m, v in (("method", pred),
                                                                                            ("cubic", cubic))}
    return {"benchmark": "interpolate", "method": method, "thick_shape": list(thick.shape[1:]),
            "thin_shape": list(pred.shape[1:]), "spacing_mm": spacing, "thin_spacing_mm": thin_mm, "steps": steps,
            "realism": realism, "prepare_s": prepare_s, "total_s": total_s, "phases": phases,
            "peak_memory_mb": peak_mb, "psnr_db": scores["method"], "cubic_psnr_db": scores["cubic"],
            "gain_over_cubic_db": scores["method"] - scores["cubic"],
            "metric": "3D PSNR on [-1000, 1000] HU against the phantom's thin series", "machine": machine_info("cpu")}
