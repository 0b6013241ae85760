"""The MAISI CT autoencoder: the released architecture, weight loading, normalisation, and whole-volume
encoding/decoding with bounded memory.

The released autoencoder (MONAI ``AutoencoderKlMaisi`` with :data:`MAISI_AUTOENCODER_ARGS`: 20,944,897
parameters in 130 tensors) compresses 4x along every axis into 4 latent channels, and expects HU clipped
to [-1000, 1000] and scaled to [0, 1] (:func:`ct_to_unit`). No weights are downloaded: pass the file.
An autoencoder built with other ``num_channels`` compresses ``2 ** (len(num_channels) - 1)`` times per axis
(its ``downsample`` attribute, :func:`autoencoder_downsample`).

:class:`LatentCodec` encodes and decodes volumes of any depth in overlapping chunks along depth, so peak
memory depends on the chunk, not on the number of slices; sizes are padded to multiples of the compression
and cropped back, never truncated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiDownsample
from torch import nn

from ctsynth.meta_schema import check_plain_value
from ctsynth.transforms import pad_to_multiple, scale_hu, unscale_hu

__all__ = ["MAISI_AUTOENCODER_ARGS", "MAISI_WINDOW", "MAISI_DOWNSAMPLE", "build_maisi_autoencoder",
           "load_maisi_autoencoder", "autoencoder_downsample", "ct_to_unit", "unit_to_ct", "LatentCodec"]

logger = logging.getLogger(__name__)

#: constructor arguments of the released MAISI CT autoencoder (MONAI model zoo ``maisi_ct_generative``)
MAISI_AUTOENCODER_ARGS: dict[str, Any] = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4,
    "num_channels": [64, 128, 256], "num_res_blocks": [2, 2, 2], "norm_num_groups": 32, "norm_eps": 1e-6,
    "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
    "with_decoder_nonlocal_attn": False, "use_checkpointing": False, "use_convtranspose": False,
    "norm_float16": True, "num_splits": 8, "dim_split": 1,
}
#: HU window MAISI normalises to [0, 1]
MAISI_WINDOW = (-1000.0, 1000.0)
#: spatial compression per axis of the released autoencoder
MAISI_DOWNSAMPLE = 4


def autoencoder_downsample(autoencoder: nn.Module) -> int:
    """Spatial compression per axis of an autoencoder: its ``downsample`` attribute (set by
    :func:`build_maisi_autoencoder`), else 2 to the number of stride-2 ``MaisiDownsample`` blocks of its encoder.

    Raises:
        ValueError: neither is there (say it: set ``autoencoder.downsample``).
    """
    recorded = getattr(autoencoder, "downsample", None)
    if recorded is not None:
        return int(recorded)
    encoder = getattr(autoencoder, "encoder", None)
    halvings = sum(isinstance(m, MaisiDownsample) for m in encoder.modules()) if isinstance(encoder, nn.Module) else 0
    if not halvings:
        raise ValueError(f"cannot tell the compression of {type(autoencoder).__name__} (no `downsample` attribute, no "
                         "MaisiDownsample blocks in its encoder): set `autoencoder.downsample` to its compression per axis")
    return 2 ** halvings


def ct_to_unit(hu: torch.Tensor) -> torch.Tensor:
    """HU -> [0, 1] as MAISI expects ([-1000, 1000] clipped)."""
    return scale_hu(hu, MAISI_WINDOW, clip=True)


def unit_to_ct(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> HU (inverse of :func:`ct_to_unit` inside the window)."""
    return unscale_hu(x.clamp(0.0, 1.0), MAISI_WINDOW)


def build_maisi_autoencoder(**overrides: Any) -> nn.Module:
    """``AutoencoderKlMaisi`` with the released arguments, ``overrides`` applied (e.g. smaller widths for tests
    and demos; the state-dict key layout depends only on the block counts, not on the widths).

    A ``num_channels`` of another length (another number of levels, so another compression) gets the release's
    per-level ``num_res_blocks`` and ``attention_levels`` repeated to its length unless those are given too.
    ``norm_float16`` is turned off on CPU, where it fails in float32.

    Raises:
        ValueError: unknown arguments, or per-level lists whose length differs from ``num_channels``.
    """
    unknown = sorted(set(overrides) - set(MAISI_AUTOENCODER_ARGS))
    if unknown:
        raise ValueError(f"unknown MAISI autoencoder arguments {unknown}; known: {sorted(MAISI_AUTOENCODER_ARGS)}")
    args = {**MAISI_AUTOENCODER_ARGS, **overrides}
    levels = len(args["num_channels"])
    for key in ("num_res_blocks", "attention_levels"):
        if len(args[key]) != levels:
            if key in overrides:
                raise ValueError(f"{key} {list(args[key])} has {len(args[key])} levels but num_channels "
                                 f"{list(args['num_channels'])} has {levels}: give one entry per level")
            args[key] = [MAISI_AUTOENCODER_ARGS[key][0]] * levels
    if args["norm_float16"] and not torch.cuda.is_available():
        args["norm_float16"] = False
    net = AutoencoderKlMaisi(**args)
    net.config = dict(overrides)  # what differs from the release: enough to rebuild it (checkpoint meta)
    net.downsample = 2 ** (levels - 1)  # one halving between consecutive levels
    return net


def load_maisi_autoencoder(path: str | Path, strict: bool = True, device: str | torch.device = "cpu",
                           args: Mapping[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Builds the autoencoder and loads weights from ``path`` (``.pt``/``.pth`` state dict, possibly nested under
    ``state_dict``/``model``/``network``, or ``.safetensors``), frozen and in eval mode. ``args`` (a dict, for
    configs) and ``overrides`` change constructor arguments.

    Files written by ctsynth's training (``train_autoencoder.json``) record their constructor arguments; those
    are used unless ``overrides`` says otherwise. Logs how many tensors were loaded out of how many.

    Raises:
        FileNotFoundError: no such file (with where the weights come from).
        ValueError: missing or unexpected keys (listed), or mismatching shapes.
    """
    from ctsynth.losses import load_state_dict_and_meta

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MAISI autoencoder weights not found: {path}. Download `autoencoder_epoch273.pt` from the MONAI model "
            "zoo bundle maisi_ct_generative on a machine with internet access and pass its path, or train one with "
            "the bundle's train_autoencoder.json"
        )
    state, meta = load_state_dict_and_meta(path)  # unwraps state_dict / model / network containers
    recorded = check_plain_value(meta.get("network_config") or {}, str(path), "network_config", -8192, 8192)
    overrides = {**recorded, **dict(args or {}), **overrides}
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    net = build_maisi_autoencoder(**overrides)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: not a MAISI autoencoder state dict with the released layout: {len(missing)} missing keys "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; use the released autoencoder_epoch273.pt or a file "
            "written by slice_interp_ldm's train_autoencoder.json (pass its constructor arguments if they differ)"
        )
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise ValueError(f"{path}: {len(bad)} tensors differ in shape, e.g. {k}: file {tuple(state[k].shape)}, "
                         f"network {tuple(expected[k].shape)}; the constructor arguments differ from the file's")
    net.load_state_dict(state, strict=strict)
    loaded = sum(1 for k in expected if k in state)
    logger.info("MAISI autoencoder: loaded %d/%d tensors from %s", loaded, len(expected), path)
    net.loaded_tensors = (loaded, len(expected))
    return net.to(device).eval().requires_grad_(False)


class LatentCodec:
    """Encodes (B, 1, X, Y, Z) volumes in [0, 1] to (B, C, X/f, Y/f, Z/f) latents and back, window by window,
    where f is the autoencoder's compression per axis (:attr:`downsample`: 4 for the released MAISI one).

    Both directions run MONAI's sliding-window inference with windows of ``chunk`` slices along depth (and
    ``tile`` voxels in-plane when given) overlapping by ``overlap`` and blended with Gaussian weights, so peak
    memory is that of one window whatever the depth. Sizes are padded to multiples of f (replicating the
    edge) and decoded volumes cropped back to the input size. As in MAISI's own inference, each window's
    group-norm statistics are its own: results approach a whole-volume pass as windows and overlap grow
    (identical when one window covers the volume).

    Args:
        autoencoder: a MAISI-architecture autoencoder (``encode`` -> (mu, sigma), ``decode``).
        chunk: slices per window (multiple of the compression).
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        tile: in-plane window side (multiple of the compression); None: the whole slice.
        scale_factor: latents are multiplied by it after encoding and divided before decoding (diffusion
            models want unit-variance latents; estimate it with :meth:`estimate_scale_factor`).
        downsample: the compression per axis; None: :func:`autoencoder_downsample` of ``autoencoder``.
    """

    def __init__(self, autoencoder: nn.Module, chunk: int = 64, overlap: float = 0.25, tile: int | None = None,
                 scale_factor: float = 1.0, downsample: int | None = None) -> None:
        f = self.downsample = int(downsample or autoencoder_downsample(autoencoder))
        if chunk <= 0 or chunk % f or (tile is not None and (tile <= 0 or tile % f)):
            raise ValueError(f"chunk ({chunk}) and tile ({tile}) must be positive multiples of {f} (the autoencoder's "
                             "compression per axis)")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap is a fraction in [0, 1), got {overlap}")
        self.ae, self.chunk, self.overlap, self.tile = autoencoder, int(chunk), float(overlap), tile
        self.scale_factor = float(scale_factor)

    def _roi(self, shape: Sequence[int], factor: int = 1) -> tuple[int, int, int]:
        x, y, z = shape
        t = x if self.tile is None else min(x, self.tile // factor)
        u = y if self.tile is None else min(y, self.tile // factor)
        return (t, u, min(z, self.chunk // factor))

    def _sliding(self, x: torch.Tensor, roi: Sequence[int], fn) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        from ctsynth.inferers import gaussian_blend_weights

        try:
            return sliding_window_inference(x, roi_size=tuple(roi), sw_batch_size=1, predictor=fn, overlap=self.overlap,
                                            mode="gaussian", padding_mode="replicate", progress=False,
                                            roi_weight_map=gaussian_blend_weights(roi))
        except RuntimeError as e:
            if "Kernel size can't be greater" in str(e):
                splits = getattr(getattr(self.ae, "encoder", None), "num_splits", "?")
                raise ValueError(f"windows {tuple(roi)} are too small for the autoencoder's tensor splitting "
                                 f"(num_splits={splits}): build it with num_splits=1 (load_maisi_autoencoder(path, "
                                 "num_splits=1)) or use larger windows (chunk / tile)") from None
            raise

    @torch.no_grad()
    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) in [0, 1] -> (B, C, ceil(X/f), ceil(Y/f), ceil(Z/f)) posterior means x scale_factor."""
        if volume.ndim != 5 or volume.shape[1] != 1:
            raise ValueError(f"expected a (B, 1, X, Y, Z) volume, got {tuple(volume.shape)}")
        x = pad_to_multiple(torch.as_tensor(volume).float(), self.downsample)
        z = self._sliding(x, self._roi(x.shape[-3:]), lambda t: self.ae.encode(t)[0])
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        """(B, C, x, y, z) latents -> (B, 1, fx, fy, fz) volumes, cropped to ``size`` (X, Y, Z) when given."""
        if latent.ndim != 5:
            raise ValueError(f"expected (B, C, x, y, z) latents, got {tuple(latent.shape)}")
        z = torch.as_tensor(latent).float() / self.scale_factor
        out = self._sliding(z, self._roi(z.shape[-3:], self.downsample), self.ae.decode)
        if size is not None:
            sx, sy, sz = (int(s) for s in size)
            if sx > out.shape[-3] or sy > out.shape[-2] or sz > out.shape[-1]:
                raise ValueError(f"cannot crop {tuple(out.shape[-3:])} to the larger {tuple(size)}")
            out = out[..., :sx, :sy, :sz]
        return out

    def reconstruct(self, volume: torch.Tensor) -> torch.Tensor:
        """Encode then decode (the autoencoder's ceiling for anything working in its latent space)."""
        return self.decode(self.encode(volume), volume.shape[-3:])

    @torch.no_grad()
    def estimate_scale_factor(self, volumes: Sequence[torch.Tensor]) -> float:
        """``1 / std`` of the (unscaled) latents of ``volumes``; sets and returns it."""
        old, self.scale_factor = self.scale_factor, 1.0
        try:
            latents = torch.cat([self.encode(v).flatten() for v in volumes])
        finally:
            self.scale_factor = old
        std = float(latents.std())
        if not math.isfinite(std) or std <= 0:
            raise ValueError(f"latent standard deviation is {std}; cannot scale (are the volumes constant?)")
        self.scale_factor = 1.0 / std
        return self.scale_factor
