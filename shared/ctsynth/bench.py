"""Benchmarks with JSON output (``ctsynth bench ...``). Targets live here, never in timed tests."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ctsynth.drr import DRRProjector
from ctsynth.geometry import ProjectionGeometry

__all__ = ["machine_info", "time_call", "bench_drr", "write_json"]


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


def write_json(result: dict[str, Any], out: str | Path | None) -> str:
    text = json.dumps(result, indent=2)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text
