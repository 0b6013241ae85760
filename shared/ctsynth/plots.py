"""PNG previews: tri-planar views of volumes, radiographs, curves (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ctsynth.atomic import atomic_write

__all__ = ["save_image_png", "save_triplanar_png", "save_reformat_png", "save_curves_png", "triplanar_grid"]


def _save_figure(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(lambda tmp: fig.savefig(tmp, dpi=90, format=Path(path).suffix.lstrip(".") or "png"), path)
    finally:
        plt.close(fig)


def _pil_format(path: str | Path) -> str:
    """PIL's format name for ``path``'s suffix (PNG when it has none)."""
    from PIL import Image

    Image.init()
    return Image.EXTENSION.get(Path(path).suffix.lower(), "PNG")


def _np3d(vol) -> np.ndarray:
    a = vol.detach().cpu().float().numpy() if isinstance(vol, torch.Tensor) else np.asarray(vol, dtype=np.float32)
    while a.ndim > 3:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {a.shape}")
    return a


def save_image_png(image, path: str | Path, vmin: float | None = None, vmax: float | None = None) -> Path:
    """Writes a 2D array as an 8-bit grayscale PNG (window ``[vmin, vmax]``, default min/max)."""
    from PIL import Image

    a = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"expected a 2D image, got shape {a.shape}")
    lo = float(a.min()) if vmin is None else vmin
    hi = float(a.max()) if vmax is None else vmax
    u8 = (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).round().astype(np.uint8)
    return atomic_write(lambda tmp: Image.fromarray(u8).save(tmp, format=_pil_format(path)), path)


def save_triplanar_png(
    volumes: Mapping[str, object], path: str | Path, window: Sequence[float] = (-1000.0, 1000.0),
    title: str | None = None, error_of: tuple[str, str] | None = None,
    inputs: Mapping[str, object] | None = None,
) -> Path:
    """Axial, coronal and sagittal centre slices of each volume (rows), with an optional error row.

    Args:
        volumes: name -> (S0, S1, S2) (x, y, z) volume in HU.
        path: PNG to write.
        window: HU display window.
        title: figure title.
        error_of: (prediction name, reference name): adds an |error| row.
        inputs: name -> (rows, cols) 2D images (e.g. the radiographs) shown in a first row, min-max scaled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {k: _np3d(v) for k, v in volumes.items()}
    rows = list(arrays.items())
    if error_of is not None:
        rows.append((f"|{error_of[0]} - {error_of[1]}|", np.abs(arrays[error_of[0]] - arrays[error_of[1]])))
    images = [(k, np.squeeze(v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v)))
              for k, v in (inputs or {}).items()]
    ncols = max(3, len(images))
    off = 1 if images else 0
    fig, axes = plt.subplots(len(rows) + off, ncols, figsize=(3 * ncols, 3 * (len(rows) + off)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, (name, img) in enumerate(images):
        axes[0, c].imshow(img, cmap="gray")
        axes[0, c].set_title(name, fontsize=8)
    for r, (name, a) in enumerate(rows):
        r += off
        cx, cy, cz = (s // 2 for s in a.shape)
        views = [a[:, :, cz].T, a[:, cy, :].T, a[cx, :, :].T]  # axial (x,y), coronal (x,z), sagittal (y,z)
        is_err = error_of is not None and r - off == len(rows) - 1
        for c, (img, plane) in enumerate(zip(views, ("axial", "coronal", "sagittal"))):
            ax = axes[r, c]
            if is_err:
                ax.imshow(img, cmap="magma", origin="lower", vmin=0, vmax=(window[1] - window[0]) / 4)
            else:
                ax.imshow(img, cmap="gray", origin="lower", vmin=window[0], vmax=window[1])
            ax.set_title(f"{name} {plane}", fontsize=8)
    if title:
        fig.suptitle(f"{title}  (window {window[0]:g}..{window[1]:g} HU)", fontsize=9)
    return _save_figure(fig, path)


def save_curves_png(curves: Mapping[str, Sequence[float]], path: str | Path, xlabel: str = "", ylabel: str = "",
                    x: Sequence[float] | None = None, logy: bool = False) -> Path:
    """Line plot of named series (training curves, benchmark sweeps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(list(x) if x is not None else range(len(ys)), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, path)


def save_reformat_png(volumes: Mapping[str, object], path: str | Path, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
                      window: Sequence[float] = (-1000.0, 1000.0), title: str | None = None) -> Path:
    """Coronal and sagittal centre reformats of each volume (rows), drawn at their true aspect ratio, where
    errors of slice interpolation show (staircases, blurred edges along z).

    Args:
        volumes: name -> (X, Y, Z) volume in HU (RAS: z is the slice axis), all the same shape.
        spacing_mm: voxel size (x, y, z) in mm.
        window: HU display window.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = {k: _np3d(v) for k, v in volumes.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1:
        raise ValueError(f"reformat volumes must share a shape, got {sorted(shapes)}")
    sx, sy, sz = (float(s) for s in spacing_mm)
    fig, axes = plt.subplots(len(arrays), 2, figsize=(7, 2.6 * len(arrays)), squeeze=False)
    for row, (name, a) in enumerate(arrays.items()):
        cor = a[:, a.shape[1] // 2, :].T  # rows z, columns x
        sag = a[a.shape[0] // 2, :, :].T  # rows z, columns y
        for col, (img, label, aspect) in enumerate(((cor, "coronal", sz / sx), (sag, "sagittal", sz / sy))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", aspect=aspect)
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def _fit(img: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pads a 2D image with zeros to (rows, cols), centred."""
    out = img.new_zeros(rows, cols)
    r0, c0 = (rows - img.shape[0]) // 2, (cols - img.shape[1]) // 2
    out[r0:r0 + img.shape[0], c0:c0 + img.shape[1]] = img
    return out


def triplanar_grid(volumes: Sequence[torch.Tensor], vmin: float = 0.0, vmax: float = 1.0) -> torch.Tensor:
    """The central axial, coronal and sagittal slices of each volume as one grayscale image (no matplotlib: for
    TensorBoard every validation epoch).

    Row ``i`` holds volume ``i``; columns are the axial (z mid), coronal (y mid) and sagittal (x mid) slices, each
    shown with the superior / anterior direction up (index 0 of x, y, z is right, posterior, inferior in RAS).

    Args:
        volumes: (X, Y, Z) tensors, or with leading singleton dims (e.g. (1, X, Y, Z)); sizes may differ.
        vmin / vmax: intensity window mapped to [0, 1] (clipped).

    Returns:
        (1, rows, cols) float tensor in [0, 1] (TensorBoard's CHW layout).
    """
    planes = []
    for v in volumes:
        v = torch.as_tensor(v).detach().float().cpu()
        while v.ndim > 3 and v.shape[0] == 1:
            v = v[0]
        if v.ndim != 3:
            raise ValueError(f"expected 3D volumes, got shape {tuple(v.shape)}")
        x, y, z = (s // 2 for s in v.shape)
        planes.append([v[:, :, z].T.flip(0), v[:, y, :].T.flip(0), v[x, :, :].T.flip(0)])
    if not planes:
        raise ValueError("no volumes given")
    rows = max(p.shape[0] for row in planes for p in row)
    cols = max(p.shape[1] for row in planes for p in row)
    grid = torch.cat([torch.cat([_fit(p, rows, cols) for p in row], 1) for row in planes], 0)
    return ((grid - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1)[None]
