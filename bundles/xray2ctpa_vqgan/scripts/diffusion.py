"""Stage 2: DDPM training and guided DDIM sampling of VQ-GAN latents conditioned on a chest X-ray.

The frozen VQ-GAN (stage 1) encodes each CTPA (B, 1, X, Y, Z) in [0, 1] to its quantised codes
(B, D, X/f, Y/f, Z/f); multiplied by ``scale_factor`` (unit variance over the training set, estimated by
:func:`latent_scale_factor` and recorded in the checkpoint) these are the diffusion model's clean latents.
Training (:class:`XrayDiffusionIteration`): MSE to the scheduler's target, the X-ray replaced by the null
context with probability ``cond_dropout`` so one network learns both the conditional and the unconditional
model. Sampling (:class:`GuidedSampler`): DDIM with classifier-free guidance,
``out = uncond + guidance * (cond - uncond)``; the sampled latents are snapped to the nearest codes
(``quantize``) and decoded by the VQ-GAN.

The ``regression`` objective (:data:`OBJECTIVES`) trains the same network with the same conditioning as a
deterministic baseline: its input is zero latents at the last timestep and its target the clean latents (MSE),
so it learns the conditional mean; "sampling" it is that one forward pass.

Grids larger than the denoiser was trained on (full resolution, 512 x 512 x N) are sampled in overlapping latent
windows of the training latent shape: at every DDIM step each window is denoised with its own voxels' ray
features and the predictions are blended with Gaussian weights (no floor) into one prediction for the whole
grid, on which the scheduler steps; the VQ-GAN decodes the result in overlapping windows the same way
(:func:`decode_latents`). Working memory then depends on the window, not on the grid; the grid's latents and
the decoded volume are the only arrays that grow with it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.utils import CommonKeys as Keys
from torch import nn
from tqdm.auto import tqdm

from ctsynth.diffusion import diffusion_target
from ctsynth.meta_schema import validate_checkpoint_meta
from ctsynth.engine import engine_amp, engine_autocast, optimisation_step, trainable_parameters, unwrap
from ctsynth.inferers import gaussian_blend_weights
from ctsynth.transforms import pad_to_multiple

from .vqgan import VQGAN3D

__all__ = ["OBJECTIVES", "load_vqgan", "latent_shape_of", "training_grid", "encode_latents", "latent_scale_factor",
           "XrayDiffusionIteration", "latent_windows", "GuidedSampler", "decode_latents", "GenerationValidation"]

logger = logging.getLogger(__name__)
#: what stage 2 learns: a diffusion model, or the deterministic regression baseline with the same conditioning
OBJECTIVES = ("diffusion", "regression")


def _check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return objective


def _regression_input(scheduler: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(zero latents, last timesteps) shaped like ``like``: the regression objective's fixed input."""
    t = torch.full((like.shape[0],), int(scheduler.num_train_timesteps) - 1, device=like.device, dtype=torch.long)
    return torch.zeros_like(like), t


def load_vqgan(path: str | Path, device: str | torch.device = "cpu") -> VQGAN3D:
    """The stage-1 VQ-GAN of ``path`` (``vqgan.pt``, which records its constructor arguments), frozen, in eval mode."""
    from ctsynth.losses import load_state_dict_and_meta

    state, meta = load_state_dict_and_meta(path)  # one read: the settings build the network the weights fill
    rules = json.loads((Path(__file__).resolve().parents[1] / "configs" / "checkpoints.json").read_text())["vqgan"]
    checked, network = validate_checkpoint_meta(meta, rules, path, {"scripts.vqgan.VQGAN3D": VQGAN3D})
    net = VQGAN3D(**network.args)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the VQ-GAN its meta describes ({str(e).splitlines()[0]}); "
                         "the file is damaged or was edited: retrain stage 1") from None
    net = net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.intensity_range = checked.get("intensity_range", [-1000.0, 1000.0])
    return net


def latent_shape_of(volume_shape: Iterable[int], downsample: int, multiple: int = 1) -> list[int]:
    """Latent sizes of a volume of ``volume_shape`` (X, Y, Z): each size padded to the VQ-GAN's ``downsample``,
    divided by it, then padded to the denoiser's ``multiple`` (what :func:`encode_latents` returns)."""
    return [-(-(-(-int(s) // downsample)) // multiple) * multiple for s in volume_shape]


def training_grid(datalist: str | Path, vqgan: VQGAN3D, multiple: int = 1, split: str = "training",
                  image_key: str = "image") -> dict[str, list]:
    """The grid every generated volume is made on: ``volume_shape`` (the training volumes' common shape),
    ``spacing_mm`` (their median voxel size) and ``latent_shape`` (the VQ-GAN latents of that shape, padded to the
    denoiser's ``multiple``). Reads the NIfTI headers only.

    Raises:
        ValueError: the training volumes differ in shape (names two of them and the fix).
    """
    import nibabel as nib

    from ctsynth.prepare import load_datalist

    shapes, spacings = {}, []
    for e in load_datalist(datalist, split):
        img = nib.load(str(e[image_key]))
        shapes.setdefault(tuple(int(s) for s in img.shape[:3]), str(e[image_key]))
        spacings.append([float(v) for v in img.header.get_zooms()[:3]])
    if not shapes:
        raise ValueError(f"{datalist}: no {split!r} volumes")
    if len(shapes) > 1:
        (a, fa), (b, fb) = list(shapes.items())[:2]
        raise ValueError(f"training volumes differ in shape ({fa}: {list(a)}, {fb}: {list(b)}); stage 2 generates one "
                         "grid: prepare the data with `ctsynth prepare ctpa --shape X Y Z`")
    shape = list(next(iter(shapes)))
    latent = latent_shape_of(shape, vqgan.downsample, int(multiple))
    spacing = torch.tensor(spacings).median(0).values.tolist()
    return {"volume_shape": shape, "spacing_mm": spacing, "latent_shape": latent}


@torch.no_grad()
def encode_latents(vqgan: VQGAN3D, image: torch.Tensor, multiple: int = 1) -> torch.Tensor:
    """(B, 1, X, Y, Z) CTPA in [0, 1] -> quantised codes (B, D, x, y, z), padded (replicate) to ``multiple``."""
    return pad_to_multiple(vqgan.encode(pad_to_multiple(image.float(), vqgan.downsample))[0].float(), multiple)


@torch.no_grad()
def latent_scale_factor(vqgan: VQGAN3D, dataset: Iterable[dict[str, Any]], image_key: str = "image",
                        max_items: int = 32, device: str | torch.device | None = None) -> float:
    """1 / standard deviation of the quantised codes of up to ``max_items`` items of ``dataset`` (unit-variance
    latents for the diffusion model)."""
    device = device or next(vqgan.parameters()).device
    values = []
    for i, item in enumerate(dataset):
        if i >= max_items:
            break
        img = torch.as_tensor(item[image_key]).float()
        values.append(encode_latents(vqgan, (img if img.ndim == 5 else img[None]).to(device)).flatten().cpu())
    if not values:
        raise ValueError("no training items to estimate the latent scale from; check the datalist's training split")
    std = float(torch.cat(values).std())
    if not std > 1e-8:
        raise ValueError(f"the VQ-GAN's codes are constant (std {std:.3g}): the stage-1 model collapsed; retrain it")
    scale = 1.0 / std
    logger.info("latent scale factor %.4f (std of the codes over %d volumes)", scale, len(values))
    return scale


class XrayDiffusionIteration:
    """One DDPM step on VQ-GAN latents with classifier-free-guidance dropout.

    Args:
        scheduler: MONAI ``DDPMScheduler`` (its ``prediction_type`` decides the target).
        vqgan: the frozen stage-1 model (encodes the batch's CTPA).
        scale_factor: latents are multiplied by it.
        cond_dropout: probability of training an item on the null context.
        grad_clip / amp / accumulate / max_nonfinite: see ``ctsynth.engine.optimisation_step``.
        image_key / xray_key: batch keys of the (B, 1, X, Y, Z) CTPA in [0, 1] and the (B, 1, H, W) X-ray.
        objective: one of :data:`OBJECTIVES` (``regression``: zero input at the last timestep, target the clean
            latents, no dropout).
    """

    def __init__(self, scheduler: Any, vqgan: VQGAN3D, scale_factor: float = 1.0, cond_dropout: float = 0.1,
                 grad_clip: float | None = 1.0, amp: bool = False, accumulate: int = 1, max_nonfinite: int = 3,
                 image_key: str = "image", xray_key: str = "xray", objective: str = "diffusion") -> None:
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout is a probability in [0, 1), got {cond_dropout}")
        self.objective = _check_objective(objective)
        self.scheduler, self.vqgan, self.scale_factor, self.cond_dropout = scheduler, vqgan, float(scale_factor), cond_dropout
        self.grad_clip, self.amp, self.accumulate, self.max_nonfinite = grad_clip, amp, int(accumulate), max_nonfinite
        self.image_key, self.xray_key = image_key, xray_key

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        device = engine.state.device
        net = unwrap(engine.network)
        z0 = encode_latents(self.vqgan, torch.as_tensor(batch[self.image_key]).to(device), net.multiple) * self.scale_factor
        xray = torch.as_tensor(batch[self.xray_key]).to(device).float()
        engine.network.train()
        if self.objective == "regression":
            noisy, t = _regression_input(self.scheduler, z0)
            drop = torch.zeros(z0.shape[0], dtype=torch.bool, device=device)
            target = z0
        else:
            noise = torch.randn_like(z0)
            t = torch.randint(0, self.scheduler.num_train_timesteps, (z0.shape[0],), device=device).long()
            noisy = self.scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
            drop = torch.rand(z0.shape[0], device=device) < self.cond_dropout
            target = diffusion_target(self.scheduler, z0, noise, t)
        with engine_autocast(engine, self.amp):
            out = engine.network(noisy, t, xray=xray, drop=drop).float()
        loss = F.mse_loss(out, target)
        terms = {"mse": float(loss.detach()), "unconditional_fraction": float(drop.float().mean())}
        scaler = engine_amp(engine, self.amp)[2]
        norm = optimisation_step(engine, loss, engine.optimizer, trainable_parameters(engine.network), self.grad_clip,
                                 scaler, self.max_nonfinite, terms, accumulate=self.accumulate)
        return {Keys.LOSS: float(loss.detach()), "terms": terms, "grad_norm": norm}


def latent_windows(shape: Iterable[int], window: Iterable[int] | None, overlap: float = 0.25,
                   multiple: int = 1) -> list[tuple[slice, slice, slice]]:
    """The overlapping windows (3 slices each) that cover a latent grid of ``shape`` (x, y, z): ``window`` sizes
    (None: one window, the grid) capped at the grid, neighbours sharing about ``overlap`` of a window, the last
    flush with the end (MONAI's ``dense_patch_slices``).

    Raises:
        ValueError: a window size is not a multiple of ``multiple`` (the denoiser's downsampling) or ``overlap``
            is outside [0, 1).
    """
    from monai.data.utils import dense_patch_slices

    size = [int(s) for s in shape]
    if window is None:
        return [tuple(slice(0, s) for s in size)]
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap is a fraction in [0, 1), got {overlap}")
    roi = [min(int(w), s) for w, s in zip(window, size)]
    if len(roi) != 3 or min(roi) < 1 or any(r % int(multiple) for r in roi):
        raise ValueError(f"latent window {list(window)} must be 3 positive multiples of {multiple} (the denoiser's "
                         "downsampling); the default is the checkpoint's latent_shape")
    interval = [r if r == s else max(int(r * (1 - float(overlap))), 1) for r, s in zip(roi, size)]
    return [tuple(w) for w in dense_patch_slices(tuple(size), tuple(roi), tuple(interval))]


class GuidedSampler:
    """DDIM sampling of latents from X-rays with classifier-free guidance.

    Args:
        network: :class:`scripts.conditioning.XrayConditionedDenoiser`.
        scheduler: MONAI ``DDIMScheduler`` with the training schedule and prediction type.
        num_inference_steps: DDIM steps.
        guidance: classifier-free guidance scale (1: conditional model only; 0: unconditional).
        eta: DDIM stochasticity.
        progress: progress bar over the steps.
        objective: the network's (:data:`OBJECTIVES`); ``regression``: one forward pass from zero latents, whatever
            the steps, guidance and noise.
        window: latent window (x, y, z) the denoiser runs on (:func:`latent_windows`); None: the whole grid in one
            pass. Grids no larger than the window are sampled in one pass either way, identically.
        overlap: fraction of a window shared with its neighbours.
    """

    def __init__(self, network: nn.Module, scheduler: Any, num_inference_steps: int = 50, guidance: float = 1.0,
                 eta: float = 0.0, progress: bool = True, objective: str = "diffusion",
                 window: Iterable[int] | None = None, overlap: float = 0.25) -> None:
        self.objective = _check_objective(objective)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self.network, self.scheduler = network, scheduler
        self.num_inference_steps, self.guidance, self.eta, self.progress = int(num_inference_steps), float(guidance), eta, progress
        self.window = None if window is None else [int(w) for w in window]
        self.overlap = float(overlap)
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap is a fraction in [0, 1), got {overlap}")

    def _denoise(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, condition: dict[str, torch.Tensor],
                 windows: list[tuple[slice, slice, slice]], weights: torch.Tensor | None) -> torch.Tensor:
        """The network's prediction for the grid ``x``: one pass, or the windows' predictions blended by
        ``weights`` (1, 1, *window)."""
        if len(windows) == 1 and tuple(s.stop - s.start for s in windows[0]) == tuple(x.shape[-3:]):
            return net(x, t, condition=condition)
        out = torch.zeros_like(x)
        total = torch.zeros((1, 1, *x.shape[-3:]), dtype=x.dtype, device=x.device)
        for w in windows:
            index = (Ellipsis, *w)
            pred = net(x[index], t, condition=net.window_condition(condition, w))
            out[index] += pred * weights
            total[index] += weights
        return out / total

    @torch.no_grad()
    def __call__(self, xray: torch.Tensor, latent_shape: Iterable[int], generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None, volume_shape: Iterable[int] | None = None) -> torch.Tensor:
        """(B, 1, H, W) X-rays -> (B, C, x, y, z) latents (scaled) of ``latent_shape`` (x, y, z), the latents of a
        volume of ``volume_shape`` (X, Y, Z; default the denoiser's training grid), which places the X-ray's rays."""
        net = unwrap(self.network)
        net.eval()
        shape = [int(s) for s in latent_shape]
        if xray.ndim != 4:
            raise ValueError(f"expected (B, 1, H, W) X-rays, got {tuple(xray.shape)}")
        if any(s % net.multiple for s in shape):
            raise ValueError(f"latent shape {shape} must be divisible by {net.multiple}")
        b, device = xray.shape[0], xray.device
        if noise is None:
            noise = torch.randn((b, net.latent_channels, *shape), generator=generator,
                                device="cpu" if generator is None else generator.device)
        x = noise.to(device)
        volume = None if volume_shape is None else [int(v) for v in volume_shape]
        cond = net.condition(xray.float(), shape, volume_shape=volume)
        windows = latent_windows(shape, self.window, self.overlap, net.multiple)
        roi = [s.stop - s.start for s in windows[0]]
        weights = gaussian_blend_weights(roi).to(device) if len(windows) > 1 else None
        if self.objective == "regression":
            zeros, t = _regression_input(self.scheduler, x)
            return self._denoise(net, zeros, t, cond, windows, weights)
        guided = self.guidance != 1.0
        condition = net.cat_conditions(cond, net.condition(None, shape, b)) if guided else cond
        self.scheduler.set_timesteps(self.num_inference_steps, device=device)
        bar = tqdm(self.scheduler.timesteps, desc=f"DDIM ({len(windows)} window{'s' * (len(windows) > 1)})",
                   unit="step", disable=not self.progress, leave=False)
        for t in bar:
            inp = torch.cat([x, x]) if guided else x
            out = self._denoise(net, inp, torch.full((inp.shape[0],), int(t), device=device, dtype=torch.long),
                                condition, windows, weights)
            if guided:
                c, u = out.chunk(2)
                out = u + self.guidance * (c - u)
            x, _ = self.scheduler.step(out, t, x, eta=self.eta, generator=generator)
        return x


@torch.no_grad()
def decode_latents(vqgan: VQGAN3D, latents: torch.Tensor, scale_factor: float, size: Iterable[int] | None = None,
                   quantize: bool = True, window: Iterable[int] | None = None, overlap: float = 0.25,
                   stitch_device: str | torch.device | None = None) -> torch.Tensor:
    """Scaled latents (B, D, x, y, z) -> CTPA (B, 1, X, Y, Z) in [0, 1], cropped to ``size``; ``quantize``
    snaps each latent vector to its nearest code first (the decoder was trained on codes only).

    ``window``: decode patch-wise, in overlapping latent windows of this size (MONAI's sliding-window inference,
    Gaussian weights without floor, the volume assembled on ``stitch_device``, default the latents' device; each
    window is snapped to the codes on its own); None, or latents no larger than the window: one pass."""
    z = latents.float() / scale_factor

    def decode(codes: torch.Tensor) -> torch.Tensor:
        if quantize:
            codes = vqgan.quantizer.embed(vqgan.quantizer.quantize(codes)[2])
        return vqgan.decode(codes)

    roi = None if window is None else [min(int(w), int(s)) for w, s in zip(window, z.shape[-3:])]
    if roi is None or roi == list(z.shape[-3:]):
        out = decode(z).float().clamp(0, 1)
    else:
        from monai.inferers import sliding_window_inference

        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap is a fraction in [0, 1), got {overlap}")
        out = sliding_window_inference(z, roi_size=roi, sw_batch_size=1, predictor=decode, overlap=float(overlap),
                                       mode="gaussian", roi_weight_map=gaussian_blend_weights(roi).to(z.device),
                                       padding_mode="replicate", device=stitch_device or z.device, progress=False)
        out = out.float().clamp(0, 1)
    if size is not None:
        s = [int(v) for v in size]
        out = out[..., :s[0], :s[1], :s[2]]
    return out


class GenerationValidation:
    """Evaluator iteration: CTPA generated from each validation X-ray (fixed noise, few DDIM steps), returned
    with the real CTPA, both (B, 1, X, Y, Z) in [0, 1], for the evaluator's PSNR / SSIM.

    Args:
        scheduler: MONAI ``DDIMScheduler`` matching the training schedule.
        vqgan: the frozen stage-1 model.
        scale_factor: the training latent scale factor.
        num_inference_steps / guidance: sampling settings.
        seed: fixed noise so epochs compare.
        objective: the network's (:data:`OBJECTIVES`).
    """

    def __init__(self, scheduler: Any, vqgan: VQGAN3D, scale_factor: float = 1.0, num_inference_steps: int = 10,
                 guidance: float = 1.0, seed: int = 0, image_key: str = "image", xray_key: str = "xray",
                 objective: str = "diffusion") -> None:
        self.objective = _check_objective(objective)
        self.scheduler, self.vqgan, self.scale_factor = scheduler, vqgan, float(scale_factor)
        self.num_inference_steps, self.guidance, self.seed = num_inference_steps, guidance, seed
        self.image_key, self.xray_key = image_key, xray_key

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        if isinstance(engine, Trainer):
            raise TypeError("GenerationValidation is for evaluators")
        device = engine.state.device
        real = torch.as_tensor(batch[self.image_key]).to(device).float()
        shape = latent_shape_of(real.shape[-3:], self.vqgan.downsample, unwrap(engine.network).multiple)
        g = torch.Generator(device=device).manual_seed(self.seed)
        sampler = GuidedSampler(engine.network, self.scheduler, self.num_inference_steps, self.guidance, progress=False,
                                objective=self.objective)
        z = sampler(torch.as_tensor(batch[self.xray_key]).to(device).float(), shape, generator=g)
        return {Keys.PRED: decode_latents(self.vqgan, z, self.scale_factor, real.shape[-3:]), Keys.LABEL: real}
