"""Shared fixtures: everything is generated in code (no data files)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@functools.lru_cache(maxsize=16)
def voxelised_ellipsoid(n: int, spacing: float, radii, center=(0.0, 0.0, 0.0), supersample: int = 3):
    """Partial-volume occupancy of an ellipsoid on an n^3 grid centred on the origin (+ its affine)."""
    aff = torch.diag(torch.tensor([spacing] * 3 + [1.0], dtype=torch.float64))
    aff[:3, 3] = -(n - 1) / 2 * spacing
    ax = torch.arange(n, dtype=torch.float64) * spacing + aff[0, 3]
    occ = torch.zeros(n, n, n, dtype=torch.float64)
    offs = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    r = torch.tensor(radii, dtype=torch.float64)
    c = torch.tensor(center, dtype=torch.float64)
    for a in offs:
        for b in offs:
            for d in offs:
                x = (ax + a * spacing - c[0])[:, None, None] / r[0]
                y = (ax + b * spacing - c[1])[None, :, None] / r[1]
                z = (ax + d * spacing - c[2])[None, None, :] / r[2]
                occ += ((x**2 + y**2 + z**2) <= 1).double()
    return (occ / supersample**3).float(), aff
