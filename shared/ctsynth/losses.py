"""Training losses shared by the bundles.

One formula per concept: the SSIM losses wrap :mod:`ctsynth.metrics` (as MONAI's ``SSIMLoss`` wraps
``SSIMMetric``), the DRR loss wraps :class:`ctsynth.drr.DRRProjector`, and every stage of every bundle
uses one :class:`CompositeLoss` whose weights come from its config.

Volumes entering these losses are intensity-normalised (HU window mapped to [0, 1]) unless stated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from ctsynth.drr import DRRProjector
from ctsynth.geometry import ProjectionGeometry
from ctsynth.metrics import ms_ssim, ssim

__all__ = [
    "SSIMLoss",
    "MultiScaleSSIMLoss",
    "VGG19_LAYERS",
    "VGG19Features",
    "load_state_dict_file",
    "TriPlanarVGGLoss",
    "GradientMagnitudeLoss",
    "DRRReprojectionLoss",
    "LOSS_TERMS",
    "CompositeLoss",
]

logger = logging.getLogger(__name__)


class SSIMLoss(nn.Module):
    """``1 - SSIM`` averaged over the batch (Gaussian window, 2D or 3D).

    Args:
        data_range: the value range of the inputs (required; 1.0 for [0, 1]-normalised CT).
        spatial_dims: 2 or 3.
        win_size: window side (shrunk for small inputs).
    """

    def __init__(self, data_range: float, spatial_dims: int = 3, win_size: int = 11) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.data_range, self.spatial_dims, self.win_size = float(data_range), spatial_dims, win_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - ssim(pred, target, self.data_range, self.spatial_dims, self.win_size).mean()


class MultiScaleSSIMLoss(nn.Module):
    """``1 - MS-SSIM`` with as many scales as the input allows (see :func:`ctsynth.metrics.ms_ssim_weights`).

    Unlike MONAI's ``MultiScaleSSIMMetric`` (which needs more than 160 voxels per side for its five
    scales) this also works on 64^3 volumes (3 scales).
    """

    def __init__(self, data_range: float, spatial_dims: int = 3, win_size: int = 11, max_scales: int = 5) -> None:
        super().__init__()
        self.data_range, self.spatial_dims = float(data_range), spatial_dims
        self.win_size, self.max_scales = win_size, max_scales

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - ms_ssim(pred, target, self.data_range, self.spatial_dims, self.win_size, self.max_scales).mean()


# ------------------------------------------------------------------------------------------ VGG19
_VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


def _vgg19_layer_names() -> dict[str, int]:
    names, block, conv, idx = {}, 1, 0, 0
    for v in _VGG19_CFG:
        if v == "M":
            names[f"pool{block}"] = idx
            block, conv, idx = block + 1, 0, idx + 1
        else:
            conv += 1
            names[f"conv{block}_{conv}"] = idx
            names[f"relu{block}_{conv}"] = idx + 1
            idx += 2
    return names


#: Layer name -> index in torchvision's ``vgg19().features``.
VGG19_LAYERS: dict[str, int] = _vgg19_layer_names()
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Loads a state dict safely (``weights_only=True`` or safetensors), unwrapping common containers.

    Raises:
        FileNotFoundError / ValueError: naming the file and what was expected.
    """
    return load_state_dict_and_meta(path)[0]


def load_state_dict_and_meta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`load_state_dict_file` plus the ``meta`` entry ctsynth checkpoints carry beside the weights (empty
    when there is none), from one read of the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"{path}: cannot load as a weights-only PyTorch file ({type(e).__name__}: {e}); "
                "save plain tensors (torch.save(model.state_dict(), ...)) or use .safetensors"
            ) from None
    meta = dict(sd["meta"]) if isinstance(sd, Mapping) and isinstance(sd.get("meta"), Mapping) else {}
    for key in ("state_dict", "model", "model_state_dict", "network"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors (a state dict)")
    return dict(sd), meta


class VGG19Features(nn.Module):
    """VGG19 convolutional stack laid out exactly as torchvision's ``vgg19().features``.

    A torchvision ``vgg19`` state dict (keys ``features.<i>.weight``; ``classifier.*`` is ignored) loads
    into it unchanged. Only the layers up to ``last_layer`` are kept.

    Args:
        last_layer: deepest layer to keep (a key of :data:`VGG19_LAYERS`).
        weights_path: ``.pth``/``.safetensors`` torchvision VGG19 (or VGG19-features) state dict.
        random_init: use random weights on purpose (tests, smoke runs; ``weights_path`` is then ignored). Never
            silent.
    """

    def __init__(self, last_layer: str = "relu4_4", weights_path: str | Path | None = None, random_init: bool = False):
        super().__init__()
        if last_layer not in VGG19_LAYERS:
            raise ValueError(f"unknown VGG19 layer {last_layer!r}; choose from {sorted(VGG19_LAYERS)}")
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_ch = int(v)
        self.features = nn.Sequential(*layers[: VGG19_LAYERS[last_layer] + 1])
        if weights_path is not None and not random_init:
            self.load_torchvision_weights(weights_path)
        elif not random_init:
            raise ValueError(
                "VGG19 perceptual loss needs ImageNet weights: pass weights_path=<torchvision vgg19 state dict "
                "(.pth or .safetensors)>, or random_init=True to use random features on purpose"
            )
        else:
            logger.warning("VGG19Features: random weights (random_init=True); perceptual terms are not ImageNet features")
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def load_torchvision_weights(self, path: str | Path) -> tuple[int, int]:
        """Loads torchvision VGG19 weights with a strict key and shape check.

        Returns:
            (tensors loaded, tensors in this truncated stack).
        """
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"VGG19 weights not found: {path}. Save torchvision's vgg19 ImageNet state dict there (on a machine "
                "with internet: torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict(), PATH)), "
                "or set vgg_random_init to true for random features")
        sd = load_state_dict_file(path)
        if not any(k.startswith("features.") for k in sd):
            sd = {f"features.{k}": v for k, v in sd.items()}  # a bare features state dict
        full = {f"features.{VGG19_LAYERS[n]}.{w}" for n in VGG19_LAYERS if n.startswith("conv") for w in ("weight", "bias")}
        missing = sorted(full - set(sd))
        unexpected = sorted(k for k in sd if k not in full and not k.startswith("classifier."))
        if missing or unexpected:
            raise ValueError(
                f"{path}: not a torchvision vgg19 state dict; missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}; write one with "
                "torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict(), PATH)"
            )
        own = self.state_dict()
        wrong = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if sd[k].shape != v.shape]
        if wrong:
            raise ValueError(f"{path}: VGG19 tensor shapes do not match: {wrong[:4]}; use the torchvision vgg19 (ImageNet) "
                             "state dict, or vgg_random_init true")
        self.load_state_dict({k: sd[k] for k in own}, strict=True)
        logger.info("VGG19 weights: loaded %d/%d tensors from %s", len(own), len(own), path)
        return len(own), len(own)

    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        """Features at ``layers`` of (N, 3, H, W) ImageNet-normalised images."""
        wanted = {VGG19_LAYERS[n]: n for n in layers}
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in wanted:
                out.append(x)
            if len(out) == len(wanted):
                break
        return out


class TriPlanarVGGLoss(nn.Module):
    """Perceptual loss on axial, coronal and sagittal slices of 3D volumes through VGG19 features.

    For each of the three axes a fraction of slices is drawn (the same for prediction and target), each
    slice is repeated to 3 channels, ImageNet-normalised, and the L1 distance of VGG19 features is
    averaged over layers and planes.

    Args:
        weights_path: torchvision VGG19 weights (required unless ``random_init``).
        layers: VGG19 layer names.
        slice_fraction: fraction of slices drawn per axis (at least ``min_slices``).
        min_slices: minimum slices per axis.
        random_init: use random VGG weights on purpose.
        seed: seed of the slice draw (None: a fresh draw every call).
        slice_chunk: slices per VGG pass.
        checkpoint: recompute each chunk's VGG activations in the backward pass instead of keeping them
            (memory of one chunk; the same value and gradient).

    Shapes:
        pred, target: (B, 1, S0, S1, S2) in [0, 1].
    """

    def __init__(
        self,
        weights_path: str | Path | None = None,
        layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_4", "relu4_4"),
        slice_fraction: float = 0.2,
        min_slices: int = 1,
        random_init: bool = False,
        seed: int | None = None,
        slice_chunk: int = 8,
        checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if slice_chunk < 1:
            raise ValueError(f"slice_chunk must be >= 1, got {slice_chunk}")
        self.slice_chunk, self.checkpoint = int(slice_chunk), bool(checkpoint)
        if not 0 < slice_fraction <= 1:
            raise ValueError(f"slice_fraction must be in (0, 1], got {slice_fraction}")
        bad = [n for n in layers if n not in VGG19_LAYERS]
        if bad or not layers:
            raise ValueError(f"unknown VGG19 layers {bad}; choose from {sorted(VGG19_LAYERS)}")
        self.layers = tuple(layers)
        deepest = max(self.layers, key=lambda n: VGG19_LAYERS[n])
        self.vgg = VGG19Features(deepest, weights_path=weights_path, random_init=random_init)
        self.slice_fraction, self.min_slices = slice_fraction, min_slices
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TriPlanarVGGLoss:
        super().train(mode)
        self.vgg.eval()  # frozen feature extractor
        return self

    def _slices(self, vol: torch.Tensor, axis: int, idx: torch.Tensor) -> torch.Tensor:
        s = vol.index_select(2 + axis, idx.to(vol.device)).movedim(2 + axis, 1)  # B, k, 1, ., .
        s = s.flatten(0, 1)
        if s.shape[1] != 1:
            s = s.reshape(-1, 1, *s.shape[-2:])
        return (s.repeat(1, 3, 1, 1) - self.mean) / self.std

    def _chunk_loss(self, pred_slices: torch.Tensor, target_feats: list[torch.Tensor]) -> torch.Tensor:
        fp = self.vgg(pred_slices, self.layers)
        return sum(F.l1_loss(a, b) for a, b in zip(fp, target_feats)) / len(self.layers)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] != 1:
            raise ValueError(f"expected two (B, 1, S0, S1, S2) volumes, got {tuple(pred.shape)} and {tuple(target.shape)}")
        total = pred.new_zeros(())
        for axis in range(3):
            n = pred.shape[2 + axis]
            k = min(n, max(self.min_slices, int(round(n * self.slice_fraction))))
            idx = torch.randperm(n, generator=self.generator)[:k].sort().values
            axis_loss = pred.new_zeros(())
            # slices go through VGG a chunk at a time; with gradients, each chunk's activations are recomputed
            # in the backward pass instead of kept (memory of one chunk, same value and gradient)
            for part in idx.split(self.slice_chunk):
                sp, st = self._slices(pred, axis, part), self._slices(target, axis, part)
                with torch.no_grad():
                    ft = self.vgg(st, self.layers)
                if sp.requires_grad and self.checkpoint:
                    value = checkpoint(self._chunk_loss, sp, ft, use_reentrant=False)
                else:
                    value = self._chunk_loss(sp, ft)
                axis_loss = axis_loss + value * (len(part) / len(idx))
            total = total + axis_loss
        return total / 3.0


class GradientMagnitudeLoss(nn.Module):
    """L1 distance between 3D gradient magnitudes (central differences, spacing-aware).

    Args:
        spacing: voxel size (mm) along (S0, S1, S2); gradients are per mm. ``None``: per voxel.
    """

    def __init__(self, spacing: Sequence[float] | None = None) -> None:
        super().__init__()
        sp = torch.ones(3) if spacing is None else torch.as_tensor(spacing, dtype=torch.float32).reshape(-1)
        if sp.numel() != 3 or bool((sp <= 0).any()):
            raise ValueError(f"spacing must be three positive values (mm), got {spacing}")
        self.register_buffer("spacing", sp, persistent=False)

    def magnitude(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S0-2, S1-2, S2-2) gradient magnitude on the interior."""
        if x.ndim != 5:
            raise ValueError(f"expected (B, C, S0, S1, S2), got {tuple(x.shape)}")
        sp = self.spacing.to(x.dtype)
        g0 = (x[:, :, 2:, 1:-1, 1:-1] - x[:, :, :-2, 1:-1, 1:-1]) / (2 * sp[0])
        g1 = (x[:, :, 1:-1, 2:, 1:-1] - x[:, :, 1:-1, :-2, 1:-1]) / (2 * sp[1])
        g2 = (x[:, :, 1:-1, 1:-1, 2:] - x[:, :, 1:-1, 1:-1, :-2]) / (2 * sp[2])
        return torch.sqrt(g0**2 + g1**2 + g2**2 + 1e-12)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(self.magnitude(pred), self.magnitude(target))


class DRRReprojectionLoss(nn.Module):
    """Compares radiographs of the prediction with the acquisition's own radiographs.

    The prediction (intensity-normalised, ``[0, 1]`` <-> ``intensity_range`` HU) is mapped back to HU and
    projected with the data's geometry and affine; the L1 distance to the reference line integrals
    (given, or projected from the target) is divided by the mean reference line integral, so the term
    is relative and its weight does not depend on body size.

    Args:
        intensity_range: HU mapped to 0 and 1 by the data pipeline.
        projector: a :class:`DRRProjector` (HU input); a default one is built otherwise.
    """

    def __init__(self, intensity_range: Sequence[float] = (-1000.0, 1000.0), projector: DRRProjector | None = None):
        super().__init__()
        self.lo, self.hi = float(intensity_range[0]), float(intensity_range[1])
        self.projector = projector if projector is not None else DRRProjector(input_kind="hu")
        if self.projector.input_kind != "hu":
            raise ValueError("DRRReprojectionLoss needs a projector with input_kind='hu'")

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor | None = None,
        affine: torch.Tensor | None = None,
        geometry: ProjectionGeometry | Sequence[ProjectionGeometry] | None = None,
        projections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            pred: (B, 1, S0, S1, S2) normalised prediction.
            target: (B, 1, S0, S1, S2) normalised target (used when ``projections`` is None).
            affine: (4, 4) or (B, 4, 4); from a MetaTensor when omitted.
            geometry: the acquisition geometry (per batch or per sample).
            projections: (B, V, rows, cols) reference line integrals.
        """
        if affine is None:
            affine = getattr(pred, "affine", None) if target is None else getattr(target, "affine", getattr(pred, "affine", None))
        scale = self.hi - self.lo
        drr = self.projector(pred * scale + self.lo, affine, geometry)
        if projections is None:
            if target is None:
                raise ValueError("DRRReprojectionLoss needs the target volume or its projections")
            with torch.no_grad():
                projections = self.projector(target * scale + self.lo, affine, geometry)
        if projections.shape != drr.shape:
            raise ValueError(f"reference projections {tuple(projections.shape)} do not match DRRs {tuple(drr.shape)}")
        return (drr - projections).abs().mean() / projections.abs().mean().clamp_min(1e-6)


#: Terms a :class:`CompositeLoss` knows.
LOSS_TERMS = ("l1", "ssim", "ms_ssim", "vgg", "grad", "drr")


class CompositeLoss(nn.Module):
    """Weighted sum of the terms in :data:`LOSS_TERMS`; terms with weight 0 are never built.

    The stage presets of the cascade (L1+SSIM; +VGG; +gradient+DRR) are configs of this one class.

    Args:
        weights: term -> weight, e.g. ``{"l1": 1.0, "ssim": 0.5, "vgg": 0.1, "grad": 0.2, "drr": 0.3}``.
        data_range: value range of the (normalised) volumes.
        vgg_weights_path / vgg_random_init / vgg_slice_fraction: for the ``vgg`` term.
        spacing: voxel size (mm) for the ``grad`` term.
        intensity_range: HU window of the normalisation, for the ``drr`` term.
        projector: DRR projector for the ``drr`` term.

    ``forward`` returns the total; the last call's terms are kept in ``self.last_terms`` for logging.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        data_range: float = 1.0,
        vgg_weights_path: str | Path | None = None,
        vgg_random_init: bool = False,
        vgg_slice_fraction: float = 0.2,
        spacing: Sequence[float] | None = None,
        intensity_range: Sequence[float] = (-1000.0, 1000.0),
        projector: DRRProjector | None = None,
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; choose from {LOSS_TERMS}")
        self.weights = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
        if not self.weights:
            raise ValueError("all loss weights are zero")
        self.terms = nn.ModuleDict()
        if "ssim" in self.weights:
            self.terms["ssim"] = SSIMLoss(data_range)
        if "ms_ssim" in self.weights:
            self.terms["ms_ssim"] = MultiScaleSSIMLoss(data_range)
        if "vgg" in self.weights:
            self.terms["vgg"] = TriPlanarVGGLoss(
                vgg_weights_path, slice_fraction=vgg_slice_fraction, random_init=vgg_random_init
            )
        if "grad" in self.weights:
            self.terms["grad"] = GradientMagnitudeLoss(spacing)
        if "drr" in self.weights:
            self.terms["drr"] = DRRReprojectionLoss(intensity_range, projector)
        self.last_terms: dict[str, float] = {}

    @property
    def needs_geometry(self) -> bool:
        return "drr" in self.weights

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        affine: torch.Tensor | None = None,
        geometry: ProjectionGeometry | Sequence[ProjectionGeometry] | None = None,
        projections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Total weighted loss of (B, 1, S0, S1, S2) prediction and target."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        total = pred.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for name, w in self.weights.items():
            if name == "l1":
                value = F.l1_loss(pred, target)
            elif name == "drr":
                if geometry is None:
                    raise ValueError("the 'drr' loss term needs the batch's geometry (and affine)")
                value = self.terms["drr"](pred, target, affine, geometry, projections)
            else:
                value = self.terms[name](pred, target)
            terms[name] = value
            total = total + w * value
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return total
