"""VQ-GAN training and validation iterations (``iteration_update`` of MONAI's engines) and the codebook monitor.

Training loss (seed 004): L1 (or MSE: ``pixel_loss``) reconstruction + tri-planar perceptual
(``ctsynth.losses.TriPlanarVGGLoss``) + the quantiser's commitment loss + PatchGAN adversarial and
feature-matching terms after a warm-up (``ctsynth.adversarial.AdversarialTerms``, hinge or least squares).
:class:`CodebookMonitor` counts the codes used over each epoch and records usage (%) and perplexity in the
trainer's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys as Keys

from ctsynth.adversarial import ReconstructionIteration
from ctsynth.engine import unwrap
from ctsynth.vq import code_counts, perplexity_of_counts, usage_of_counts

__all__ = ["VQGANIteration", "PatchwiseValidation", "CodebookMonitor"]

logger = logging.getLogger(__name__)


class VQGANIteration(ReconstructionIteration):
    """One VQ-GAN training step (L1 or MSE + commitment + perceptual + adversarial), or one validation reconstruction.
    The outputs carry ``indices`` (the code indices) for :class:`CodebookMonitor`. Arguments: see
    :class:`ctsynth.adversarial.ReconstructionIteration`. ``amp`` runs bfloat16 on CPU too: the VQ-GAN has no
    ``grid_sample`` and keeps its norms and code distances in float32 (:mod:`scripts.vqgan`)."""

    cpu_bf16 = True

    def regularisation(self, extras: tuple) -> dict[str, torch.Tensor]:
        return {"commitment": extras[0].float()}

    def extra_outputs(self, extras: tuple) -> dict[str, Any]:
        return {"indices": extras[1]}


class PatchwiseValidation:
    """Validation iteration: whole volumes reconstructed through the VQ-GAN in overlapping windows
    (:class:`scripts.vqgan.PatchwiseVQGAN`, stitched on CPU), so any volume size validates in bounded memory.

    Args:
        roi_size / overlap / mode / norm_stats: the windows (a volume smaller than a window is one window; see
            :class:`scripts.vqgan.PatchwiseVQGAN`).
        image_key: batch key of the (1, 1, X, Y, Z) volume in [0, 1].
    """

    def __init__(self, roi_size: Sequence[int] = (256, 256, 128), overlap: float = 0.25, mode: str = "gaussian",
                 image_key: str = "image", norm_stats: str = "window") -> None:
        self.roi_size, self.overlap, self.mode, self.image_key = tuple(roi_size), overlap, mode, image_key
        self.norm_stats = norm_stats

    def __call__(self, engine: Any, batch: dict[str, Any]) -> dict[str, Any]:
        from .vqgan import PatchwiseVQGAN

        x = torch.as_tensor(batch[self.image_key]).float()
        codec = PatchwiseVQGAN.fitted(unwrap(engine.network), x.shape[-3:], self.roi_size, overlap=self.overlap,
                                      mode=self.mode, device=engine.state.device, norm_stats=self.norm_stats)
        return {Keys.PRED: codec.reconstruct(x).clamp(0, 1), Keys.LABEL: x}


class CodebookMonitor:
    """Counts the codes an engine's outputs use over each epoch; at its end writes ``codebook_usage_pct`` and
    ``perplexity`` into ``engine.state.metrics`` (read by ``ctsynth.engine.TrainingHistory``) and logs them.

    Args:
        num_embeddings: codebook size; default read from the engine's network quantiser.
    """

    def __init__(self, num_embeddings: int | None = None) -> None:
        self.num_embeddings = num_embeddings
        self._counts: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._record)

    def _reset(self, engine: Engine) -> None:
        self._counts = None

    def _count(self, engine: Engine) -> None:
        idx = (engine.state.output or {}).get("indices")
        if idx is None:
            return
        n = self.num_embeddings or unwrap(engine.network).quantizer.num_embeddings
        counts = code_counts(idx, n)
        self._counts = counts if self._counts is None else self._counts + counts

    def _record(self, engine: Engine) -> None:
        if self._counts is None:
            return
        counts = self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = counts.to(engine.state.device)
            torch.distributed.all_reduce(counts)
            counts = counts.cpu()
        usage, perplexity = 100.0 * usage_of_counts(counts), perplexity_of_counts(counts)
        engine.state.metrics.update({"codebook_usage_pct": usage, "perplexity": perplexity})
        logger.info("epoch %d: codebook usage %.1f %%, perplexity %.1f", engine.state.epoch, usage, perplexity)
