"""Vector quantisation for the VQ-GAN: MONAI's EMA codebook with dead-code restart, and codebook statistics.

MONAI's ``EMAQuantizer`` updates the codebook by exponential moving averages of the encoder outputs assigned to
each code. Codes that stop being chosen never move again ("dead" codes, the usual cause of codebook collapse).
:class:`RestartingEMAQuantizer` re-seeds every code whose EMA usage falls below ``restart_threshold`` with a
random encoder output of the current batch (the same on every rank under DDP), and counts the restarts.
:func:`codebook_usage` and :func:`codebook_perplexity` measure how much of the codebook a set of indices uses.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers.vector_quantizer import EMAQuantizer

__all__ = ["RestartingEMAQuantizer", "code_counts", "usage_of_counts", "perplexity_of_counts", "codebook_usage",
           "codebook_perplexity"]


def code_counts(indices: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """How often each of the ``num_embeddings`` codes occurs in ``indices`` ((num_embeddings,) float64)."""
    idx = torch.as_tensor(indices).long().flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_embeddings):
        raise ValueError(f"code indices must lie in [0, {num_embeddings}), got [{int(idx.min())}, {int(idx.max())}]")
    return torch.bincount(idx.cpu(), minlength=num_embeddings).double()


def usage_of_counts(counts: torch.Tensor) -> float:
    """Fraction (0-1) of codes with a non-zero count."""
    return float((torch.as_tensor(counts) > 0).double().mean())


def perplexity_of_counts(counts: torch.Tensor) -> float:
    """``exp`` of the entropy of the code frequencies (1: one code; the codebook size: uniform use)."""
    counts = torch.as_tensor(counts).double()
    total = float(counts.sum())
    if total == 0:
        raise ValueError("no code indices given")
    p = counts[counts > 0] / total
    return float(math.exp(float(-(p * p.log()).sum())))


def codebook_usage(indices: torch.Tensor, num_embeddings: int) -> float:
    """Fraction (0-1) of the ``num_embeddings`` codes that occur at least once in ``indices``."""
    return usage_of_counts(code_counts(indices, num_embeddings))


def codebook_perplexity(indices: torch.Tensor, num_embeddings: int) -> float:
    """``exp`` of the entropy of the code frequencies in ``indices`` (1: one code; ``num_embeddings``: uniform)."""
    return perplexity_of_counts(code_counts(indices, num_embeddings))


class RestartingEMAQuantizer(EMAQuantizer):
    """MONAI ``EMAQuantizer`` plus dead-code restart.

    Args:
        spatial_dims: 2 or 3.
        num_embeddings: codebook size (the seed: 512).
        embedding_dim: code width (the seed: 64).
        commitment_cost: weight of the commitment loss.
        decay: EMA decay (0.99; MONAI's ``VQVAE`` passes 0.5).
        restart_threshold: a code whose EMA cluster size (expected assignments per batch) falls below this is dead.
        ddp_sync: all-reduce the EMA statistics and share the restart samples across processes.

    Shapes:
        forward(x (B, embedding_dim, *spatial)) -> (quantized like x, commitment loss (), indices (B, *spatial)).
    """

    def __init__(self, spatial_dims: int = 3, num_embeddings: int = 512, embedding_dim: int = 64,
                 commitment_cost: float = 0.25, decay: float = 0.99, epsilon: float = 1e-5,
                 restart_threshold: float = 1.0, ddp_sync: bool = True) -> None:
        super().__init__(spatial_dims, num_embeddings, embedding_dim, commitment_cost, decay, epsilon,
                         ddp_sync=ddp_sync)
        if restart_threshold < 0:
            raise ValueError(f"restart_threshold must be >= 0, got {restart_threshold}")
        self.restart_threshold = float(restart_threshold)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def restart_dead_codes(self, flat_input: torch.Tensor) -> int:
        """Re-seeds dead codes with random rows of ``flat_input`` (N, embedding_dim); returns how many."""
        dead = torch.nonzero(self.ema_cluster_size < self.restart_threshold).flatten()
        if dead.numel() == 0 or flat_input.shape[0] == 0:
            return 0
        pick = torch.randint(0, flat_input.shape[0], (dead.numel(),), device=flat_input.device)
        samples = flat_input[pick].float()
        if self.ddp_sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(samples, src=0)
        self.embedding.weight.data[dead] = samples
        self.ema_w[dead] = samples  # cluster size 1: the running mean is the sample itself
        self.ema_cluster_size[dead] = 1.0
        self.restarts += dead.numel()
        return int(dead.numel())

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if inputs.ndim != self.spatial_dims + 2 or inputs.shape[1] != self.embedding_dim:
            raise ValueError(f"expected (B, {self.embedding_dim}, *{self.spatial_dims} spatial) encoder outputs, got "
                             f"{tuple(inputs.shape)}")
        quantized, loss, indices = super().forward(inputs)
        if self.training:
            flat = inputs.detach().float().movedim(1, -1).reshape(-1, self.embedding_dim)
            self.restart_dead_codes(flat)
        return quantized, loss, indices
