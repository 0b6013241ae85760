"""A MONAI :class:`~monai.inferers.Inferer` over a bundle's sampler, so servers that drive bundles through
``preprocessing`` -> ``inferer(inputs, network)`` -> ``postprocessing`` (MONAI Label's ``BundleInferTask``, MONAI
Deploy's bundle operator) run the diffusion bundles without knowing they sample.

The bundles' ``inference.json`` wire it as ``"inferer": {"_target_": "ctsynth.inferers.SynthesisInferer",
"synthesiser": "@interpolator", ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

__all__ = ["Synthesiser", "SynthesisInferer", "gaussian_blend_weights"]


def gaussian_blend_weights(roi_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Gaussian blending weights for ``sliding_window_inference(..., roi_weight_map=...)``: MONAI's separable
    Gaussian (sigma = ``sigma_scale`` x the window per axis) without its floor.

    MONAI's ``compute_importance_map`` clamps the 3D map at 1e-3 of its peak, which is reached 3.7 sigmas
    off-centre along one axis, 2.6 along two or 2.1 along all three (58 % of a 32³ window). There every
    covering window weighs the same, so a window's border artefacts (the zero padding of its convolutions) come
    through at full weight: measured 6x the usual voxel step on the window borders of a VQ-GAN reconstruction.
    These weights are scaled so that the smallest is 1 instead (only ratios matter; nothing is clamped).

    Returns:
        (1, 1, *roi_size) float32.
    """
    w = torch.ones((), dtype=torch.float64)
    for r in roi_size:
        t = torch.arange(int(r), dtype=torch.float64) - (int(r) - 1) / 2.0
        w = w[..., None] * torch.exp(-0.5 * (t / (sigma_scale * int(r))) ** 2)
    return (w / w.min()).float()[None, None]


class Synthesiser(Protocol):
    """What :class:`SynthesisInferer` drives: ``scripts.inference.SliceInterpolator`` (slice_interp_ldm),
    ``scripts.generate.CTPAGenerator`` (xray2ctpa_vqgan)."""

    network: nn.Module
    sampler: Any

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> tuple[MetaTensor, MetaTensor | None]: ...


class SynthesisInferer(Inferer):
    """``inferer(inputs, network)`` -> the synthesised volumes, one per batch item.

    Args:
        synthesiser: the bundle's sampler object (see :class:`Synthesiser`).
        kwargs: passed to the synthesiser per item (e.g. ``spacing_mm``, ``samples``, ``seed``).

    ``inputs`` is (B, C, ...) as servers batch one preprocessed image (MetaTensor with its affine where the
    synthesiser needs one: slice interpolation reads the slice spacing from it). ``network``, when given, is used
    for this call instead of the synthesiser's own copy (servers load and place their own; same weights).

    Returns:
        (B, 1, X, Y, Z) MetaTensor in HU (the mean over ``samples``), each item with its own affine.
    """

    def __init__(self, synthesiser: Synthesiser, **kwargs: Any) -> None:
        super().__init__()
        self.synthesiser = synthesiser
        self.kwargs = kwargs

    def __call__(self, inputs: torch.Tensor, network: nn.Module | None = None, *args: Any, **kwargs: Any) -> MetaTensor:
        if inputs.ndim < 3:
            raise ValueError(f"expected batched inputs (B, C, ...), got {tuple(inputs.shape)}")
        synth = self.synthesiser
        own = synth.sampler.network
        if network is not None:
            synth.sampler.network = network
        try:
            outs = [synth(inputs[i], **{**self.kwargs, **kwargs})[0] for i in range(inputs.shape[0])]
        finally:
            synth.sampler.network = own
        if len({tuple(o.shape) for o in outs}) > 1:
            raise ValueError(f"batch items gave different output shapes {[tuple(o.shape) for o in outs]}; run them "
                             "one at a time")
        batch = MetaTensor(torch.stack([o.as_tensor() for o in outs]))
        batch.affine = torch.stack([torch.as_tensor(o.affine) for o in outs])
        batch.is_batch = True
        return batch
