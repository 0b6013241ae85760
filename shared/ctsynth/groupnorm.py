"""Whole-volume GroupNorm statistics for networks run in windows.

A GroupNorm layer normalises by the mean and variance of its whole input. Run in windows (sliding-window
inference), each window is normalised by its own statistics, not by the whole volume's, so the same voxel comes out
differently in neighbouring windows and differently from a whole-volume pass: a seam and a bias that blending does
not remove. :class:`GroupNormCalibration` measures the statistics every GroupNorm layer would see on the whole
volume by passing the windows through the network, each voxel counted once (in the window whose centre is nearest),
and then lets the network run windows with those statistics fixed.

The statistics of layer ``k`` depend on the normalisation of layers ``< k``, so the layers are calibrated one per
pass over the windows, in the order the network runs them, each pass stopping at the layer it measures. Memory stays
that of one window; time is about ``L / 2`` windowed forward passes for ``L`` GroupNorm layers, on top of the final
one. (Iterating all layers at once from each window's own statistics was tried: it converges slowly and not
monotonically; measured 1.9 dB worse than this after 2-3 passes on the xray2ctpa demo VQ-GAN.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["GroupNormCalibration", "window_cores"]

logger = logging.getLogger(__name__)


def window_cores(windows: Sequence[tuple[slice, ...]], shape: Sequence[int],
                 multiple: int = 1) -> list[tuple[slice, ...]]:
    """The part of each window that is nearer to its centre than to any other window's: disjoint regions that
    together cover the volume once.

    Along each axis the windows' starts form a grid (MONAI's ``dense_patch_slices``); neighbours split their
    overlap in the middle, rounded to ``multiple`` voxels (the network's downsampling, so the cut also falls on a
    voxel boundary of the coarser feature maps).

    Args:
        windows: the windows, spatial slices of a volume of ``shape``.
        shape: spatial shape of the volume (voxels).
        multiple: round the cuts to multiples of this.

    Returns:
        For each window, slices relative to the window's own origin.
    """
    axis_bounds = [sorted({(w[a].start, w[a].stop) for w in windows}) for a in range(len(shape))]
    cores = []
    for win in windows:
        core = []
        for a, sl in enumerate(win):
            bounds = axis_bounds[a]
            j = bounds.index((sl.start, sl.stop))
            lo, hi = 0, int(shape[a])
            if j > 0:
                prev_stop = bounds[j - 1][1]
                lo = min(max(int(round((sl.start + prev_stop) / 2 / multiple)) * multiple, sl.start), prev_stop)
            if j + 1 < len(bounds):
                nxt_start = bounds[j + 1][0]
                hi = min(max(int(round((nxt_start + sl.stop) / 2 / multiple)) * multiple, nxt_start), sl.stop)
            core.append(slice(lo - sl.start, hi - sl.start))
        cores.append(tuple(core))
    return cores


class _LayerCollected(Exception):
    """Raised inside the network once the layer being calibrated has its sums (the rest of the pass is skipped)."""


class GroupNormCalibration:
    """Whole-volume statistics for every ``nn.GroupNorm`` in ``model``, measured window by window.

    Args:
        model: the network; its ``nn.GroupNorm`` layers (subclasses included) are the ones calibrated. Each must
            run once per forward pass.

    Use::

        cal = GroupNormCalibration(net)
        cal.calibrate(volume, windows, predictor, multiple=8)  # volume (1, C, X, Y, Z), windows from dense_patch_slices
        with cal.applied():
            out = sliding_window_inference(volume, ..., predictor=predictor)

    Attributes:
        stats: per layer, (mean, var), each (G,) float64, after :meth:`calibrate`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no GroupNorm layers to calibrate")
        self.stats: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] = {}
        self._core: tuple[slice, ...] | None = None
        self._window: Sequence[int] = ()
        self._layer: nn.GroupNorm | None = None
        self._sums: torch.Tensor | None = None

    # -- the replacement forward -------------------------------------------------------------------------------
    def _forward(self, layer: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        g = layer.num_groups
        xf = x.float()
        if layer in self.stats:  # calibrated: normalise with the whole volume's statistics
            mean, var = (t.to(device=x.device, dtype=torch.float32).view(1, g, 1) for t in self.stats[layer])
            y = ((xf.reshape(b, g, -1) - mean) * torch.rsqrt(var + layer.eps)).reshape(x.shape)
            if layer.affine:
                view = (1, c) + (1,) * (x.ndim - 2)
                y = y * layer.weight.float().view(view) + layer.bias.float().view(view)
            return y.to(x.dtype)
        if self._core is None:
            raise RuntimeError("a GroupNorm layer ran without calibrated statistics; call calibrate() on this input "
                               "with the same network first")
        # the first uncalibrated layer of this pass: its sums over the window's core (rescaled to this feature
        # map), then stop the forward pass (nothing after it can be exact yet)
        core = []
        for sl, w, s in zip(self._core, self._window, x.shape[2:]):
            f = w / s
            core.append(slice(int(round(sl.start / f)), int(round(sl.stop / f))))
        part = xf[(..., *core)].reshape(b, g, -1).double()
        sums = torch.stack([part.sum((0, 2)), part.pow(2).sum((0, 2)),
                            torch.full((g,), float(b * part.shape[2]), dtype=torch.float64, device=part.device)])
        if self._layer is None:
            self._layer, self._sums = layer, sums
        elif self._layer is layer:
            self._sums += sums
        else:
            raise RuntimeError("GroupNorm layers ran in a different order for different windows; the network must "
                               "run the same layers for every input")
        raise _LayerCollected

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        for layer in self.layers:
            layer.forward = (lambda x, _layer=layer: self._forward(_layer, x))  # type: ignore[method-assign]
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    @contextlib.contextmanager
    def applied(self) -> Iterator[GroupNormCalibration]:
        """Within this context the GroupNorm layers use the calibrated statistics instead of their input's."""
        if not self.stats:
            raise RuntimeError("GroupNormCalibration.applied() before calibrate(): no statistics yet")
        with self._patched():
            yield self

    # -- calibration -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, volume: torch.Tensor, windows: Sequence[tuple[slice, ...]],
                  predictor: Callable[[torch.Tensor], Any], multiple: int = 1,
                  device: str | torch.device | None = None) -> GroupNormCalibration:
        """Measures the whole-volume statistics of every layer, one layer per pass over the windows (in the order
        the network runs them; each pass stops at the layer it measures).

        Args:
            volume: (1, C, X, Y, Z), already padded to what the windows expect.
            windows: spatial slices of ``volume`` (e.g. ``monai.data.utils.dense_patch_slices``).
            predictor: runs the network on one window (1, C, ...); its output is not used.
            multiple: the network's downsampling (cuts between windows fall on multiples of it).
            device: where windows run (default: the volume's device).

        Returns:
            self, with :attr:`stats` set for every layer.
        """
        if volume.ndim < 3 or volume.shape[0] != 1:
            raise ValueError(f"calibrate one volume at a time: expected (1, C, ...), got {tuple(volume.shape)}")
        cores = window_cores(windows, volume.shape[2:], multiple)
        self.stats = {}
        with self._patched():
            for _ in range(len(self.layers) + 1):
                self._layer, self._sums = None, None
                for win, core in zip(windows, cores):
                    self._core, self._window = core, [s.stop - s.start for s in win]
                    try:
                        predictor(volume[(slice(None), slice(None), *win)].to(device or volume.device))
                    except _LayerCollected:
                        pass
                    finally:
                        self._core = None
                if self._layer is None:  # a pass ran to the end: every layer it uses is calibrated
                    break
                s, ss, n = self._sums
                mean = s / n
                self.stats[self._layer] = (mean, (ss / n - mean.pow(2)).clamp_min(0.0))
        self._layer, self._sums = None, None
        logger.debug("GroupNorm calibration: %d of %d layers over %d windows", len(self.stats), len(self.layers),
                     len(windows))
        return self
