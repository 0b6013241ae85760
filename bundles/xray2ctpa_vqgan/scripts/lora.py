"""Low-rank adaptation (LoRA) of the denoiser's attention projections, for fine-tuning a trained stage-2
model on a new site's X-rays with few trainable parameters.

:func:`add_lora` replaces the chosen ``nn.Linear`` layers by :class:`LoRALinear` (frozen base + trainable
low-rank update, zero at start so the fine-tuned model begins exactly where the base model is) and freezes
every other parameter. The settings go into the network's ``config`` (``lora``), which checkpoints record, so
inference rebuilds the same structure; :func:`merge_lora` folds the updates into plain ``nn.Linear`` layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["LORA_TARGETS", "LoRALinear", "add_lora", "merge_lora", "lora_network"]

#: names of MONAI's attention projections (``CrossAttentionBlock`` / ``SABlock`` in ``DiffusionModelUNet``)
LORA_TARGETS = ("to_q", "to_k", "to_v", "out_proj")


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * B(A(x))`` with ``base`` frozen, A (rank x in) Kaiming-initialised and
    B (out x rank) zero.

    Args:
        base: the linear layer to adapt.
        rank: rank of the update.
        alpha: scale numerator (default ``rank``: scale 1).
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = float(alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale

    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out = out.to(self.base.weight.device)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


def add_lora(module: nn.Module, rank: int = 4, alpha: float | None = None,
             targets: Sequence[str] = LORA_TARGETS) -> list[str]:
    """Wraps every ``nn.Linear`` whose attribute name is in ``targets`` in :class:`LoRALinear` and freezes all other
    parameters of ``module``. Returns the adapted layers' names.

    Raises:
        ValueError: no layer matched (names the targets and what the module has).
    """
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets]
    if not names:
        linear = sorted({n.rpartition(".")[2] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no linear layer named {list(targets)} to adapt; the module's linear layers are named {linear}")
    for p in module.parameters():
        p.requires_grad_(False)
    for n in names:
        _replace(module, n, LoRALinear(module.get_submodule(n), rank, alpha))
    return names


def merge_lora(module: nn.Module) -> nn.Module:
    """Replaces every :class:`LoRALinear` by its merged ``nn.Linear`` (in place); returns ``module``."""
    for n, m in list(module.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(module, n, m.merged())
    if isinstance(getattr(module, "config", None), dict):
        module.config = {k: v for k, v in module.config.items() if k != "lora"}
    return module


def lora_network(network: nn.Module, base_checkpoint: str | Path | None = None, rank: int = 4,
                 alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS) -> nn.Module:
    """The fine-tuning network of ``lora.json``: ``network`` with the base weights loaded from ``base_checkpoint``
    (a stage-2 ``model.pt``; None: as it is), then LoRA layers added (only they train). Its ``config`` gains
    ``lora`` so the checkpoint says how to rebuild it."""
    from ctsynth.engine import load_network_weights

    if base_checkpoint is not None:
        load_network_weights(network, base_checkpoint)
    add_lora(network, rank, alpha, targets)
    if hasattr(network, "config"):
        network.config = {**network.config, "lora": {"rank": int(rank), "alpha": alpha, "targets": list(targets)}}
    return network
