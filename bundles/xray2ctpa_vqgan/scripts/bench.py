"""Benchmarks of the xray2ctpa_vqgan bundle (``ctsynth bench generate``).

:func:`bench_generate` times full-resolution generation (windowed DDIM sampling of the latent grid, patch-wise
decoding) for several output sizes with the bundle's networks at random weights (the cost does not depend on
the weights), and reports the process's peak memory after each size next to the size of the output volume, so
that memory flat in the number of slices shows as a peak that grows by the output arrays only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler

from ctsynth.bench import machine_info, peak_memory_mb, plain_network_args, reset_peak_memory
from ctsynth.metrics import seam_ratio

from .conditioning import XrayConditionedDenoiser, xray_ray_grid
from .diffusion import latent_shape_of
from .generate import CTPAGenerator
from .vqgan import VQGAN3D

__all__ = ["bench_generate"]

logger = logging.getLogger(__name__)
_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def bench_generate(sizes: Sequence[Sequence[int]] = ((512, 512, 64), (512, 512, 128)),
                   train_shape: Sequence[int] = (256, 256, 128), spacing_mm: Sequence[float] = (0.7, 0.7, 2.5),
                   steps: int = 2, guidance: float = 1.0, overlap: float = 0.25, xray_size: int = 256,
                   network: dict[str, Any] | None = None, vqgan: dict[str, Any] | None = None,
                   device: str = "cpu") -> dict[str, Any]:
    """Generation of each output ``sizes`` (X, Y, Z) at ``spacing_mm`` by a denoiser trained on ``train_shape``
    volumes (its latent grid is the window), ``steps`` DDIM steps; the networks are ``train_diffusion.json``'s
    denoiser and ``train.json``'s VQ-GAN, ``network`` / ``vqgan`` overriding their arguments.

    Returns:
        ``{"benchmark": "generate", "sizes": [{"shape", "latent_shape", "windows", "seconds", "peak_memory_mb",
        "output_mb", "seam_ratio"}, ...], ...}`` (on the CPU the peak is the process's, so sizes run smallest
        first).
    """
    inference = json.loads((_CONFIGS / "inference.json").read_text())
    vq_args = {**plain_network_args(json.loads((_CONFIGS / "train.json").read_text())), **(vqgan or {})}
    torch.manual_seed(0)
    vq = VQGAN3D(**vq_args).eval()
    vq.intensity_range = [-1000.0, 1000.0]
    grid = {"volume_shape": [int(s) for s in train_shape], "spacing_mm": [float(s) for s in spacing_mm]}
    net_args = {**plain_network_args(json.loads((_CONFIGS / "train_diffusion.json").read_text())),
                "latent_channels": int(vq_args["embedding_dim"]),
                **(network or {})}
    if "aligned" in net_args.get("conditioning", "tokens"):
        net_args.setdefault("ray_grid", xray_ray_grid(grid, vq.downsample, int(xray_size)))
    net = XrayConditionedDenoiser(**net_args).eval()
    latent = latent_shape_of(grid["volume_shape"], vq.downsample, net.multiple)
    meta = {"scale_factor": 1.0, "latent_shape": latent, "volume_shape": grid["volume_shape"],
            "spacing_mm": grid["spacing_mm"], "xray_size": int(xray_size), "intensity_range": [-1000.0, 1000.0]}
    scheduler = DDIMScheduler(int(inference["num_train_timesteps"]), schedule=inference["schedule"],
                              beta_start=inference["beta_start"], beta_end=inference["beta_end"], clip_sample=False,
                              prediction_type=inference["prediction_type"])
    gen = CTPAGenerator.from_networks(net, vq, scheduler, meta, num_inference_steps=int(steps), guidance=float(guidance),
                                      device=device, overlap=float(overlap))
    gen.sampler.progress = False
    xray = torch.rand(1, int(xray_size), int(xray_size), generator=torch.Generator().manual_seed(0))
    rows = []
    reset_peak_memory(device)
    for size in sorted(([int(s) for s in shape] for shape in sizes), key=lambda s: s[0] * s[1] * s[2]):
        t0 = time.perf_counter()
        mean, _ = gen(xray, samples=1, seed=0, shape=size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append({"shape": size, "latent_shape": gen.latent_shape(size), "windows": len(gen.windows(size)),
                     "seconds": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(device),
                     "output_mb": mean.numel() * mean.element_size() / 2**20,
                     "seam_ratio": seam_ratio(mean, gen.window_borders(size))})
        logger.info("generated %s in %.1f s (%d windows), peak %.0f MB", size, rows[-1]["seconds"], rows[-1]["windows"],
                    rows[-1]["peak_memory_mb"])
        del mean
    return {"benchmark": "generate", "bundle": "xray2ctpa_vqgan", "machine": machine_info(device),
            "train_shape": grid["volume_shape"], "spacing_mm": grid["spacing_mm"], "latent_window": gen.window,
            "overlap": float(overlap), "steps": int(steps), "guidance": float(guidance),
            "guided": float(guidance) != 1.0, "denoiser": net_args, "vqgan": vq_args,
            "parameters": {"denoiser": sum(p.numel() for p in net.parameters()),
                           "vqgan": sum(p.numel() for p in vq.parameters())}, "sizes": rows}
