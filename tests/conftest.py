"""Shared fixtures: everything is generated in code (no data files)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

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


_PORTS = iter(range(29531, 29600))


def monai_bundle_run(bundle: str, run_id: str, configs: Sequence[str], overrides: Mapping, torchrun: bool = False,
                     timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m monai.bundle run RUN_ID`` (or under ``torchrun`` with 2 processes) from the repository
    root, as README.md documents it; overrides go on the command line as Python literals (what fire parses)."""
    root = Path(__file__).resolve().parents[1]
    files = json.dumps([str(root / "bundles" / bundle / "configs" / c) for c in configs])
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else repr(v)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={next(_PORTS)}"] \
        if torchrun else [sys.executable]
    cmd = launcher + ["-m", "monai.bundle", "run", run_id, "--config_file", files, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res
