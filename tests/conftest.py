"""Shared fixtures: everything is generated in code (no data files)."""

from __future__ import annotations

import functools
import json
import re
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--nightly", action="store_true", default=False,
                     help="also run the tests marked nightly (every bundle's demo against its metadata floor)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--nightly") or os.environ.get("CTSYNTH_NIGHTLY") == "1":
        return
    skip = pytest.mark.skip(reason="nightly: run with --nightly (or CTSYNTH_NIGHTLY=1)")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


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


def literal_args(overrides: Mapping) -> list[str]:
    """Config overrides as ``--key value`` command-line pairs, values as Python literals (what fire parses)."""
    args: list[str] = []
    for k, v in overrides.items():
        args += [f"--{k}", v if isinstance(v, str) else repr(v)]
    return args


def run_python(args: Sequence[str], cwd: Path | None = None, env: Mapping | None = None, check: bool = True,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """``python ARGS`` in a new process, as a user runs it (one thread per process); asserts it succeeded unless
    ``check`` is False."""
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def monai_bundle_run(bundle: str, run_id: str, configs: Sequence[str], overrides: Mapping, torchrun: bool = False,
                     timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``python -m monai.bundle run RUN_ID`` (or under ``torchrun`` with 2 processes) from the repository
    root, as README.md documents it; overrides go on the command line as Python literals (what fire parses)."""
    root = Path(__file__).resolve().parents[1]
    files = json.dumps([str(root / "bundles" / bundle / "configs" / c) for c in configs])
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={next(_PORTS)}"] if torchrun else []
    return run_python([*launcher, "-m", "monai.bundle", "run", run_id, "--config_file", files, *literal_args(overrides)],
                      cwd=root, timeout=timeout)


def serve_like_monai_label(bundle: str, models_dir: Path, image: str, work: Path, overrides: Mapping) -> dict:
    """One request through a ctsynth bundle the way monailabel 0.8.5's ``BundleInferTask`` + ``BasicInferTask``
    handle it (monailabel cannot be imported here: its only torchvision is a CUDA build), with the settings
    ``ctsynth.label_app`` gives the real task.

    The bundle is laid out as the app finds it (``configs/``, ``scripts/``, ``models/<model_file>``); the task
    overrides ``bundle_root`` with that folder, instantiates ``network_def``, loads ``models/<model_file>`` with the
    ``model_state_dict`` key, runs ``preprocessing`` on ``{"image": path}``, calls ``inferer(image[None], network)``
    and keeps item 0 as ``pred``, then ``postprocessing`` without ``SaveImaged`` (MONAI Label writes the result
    itself). ``overrides`` play the user's edits of inference.json (network size, steps).
    """
    import copy
    import shutil

    from monai.bundle import ConfigParser
    from monai.transforms import Compose, SaveImaged

    from ctsynth.bundles import bundle_root
    from ctsynth.label_app import LABEL_BUNDLES, task_kwargs

    spec, kw = LABEL_BUNDLES[bundle], task_kwargs()
    path = work / bundle
    src = Path(bundle_root(bundle, add_to_path=False))
    shutil.copytree(src / "configs", path / "configs")
    shutil.copytree(src / "scripts", path / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(models_dir, path / "models")
    assert (path / "configs" / "inference.json").is_file() and (path / "models" / spec.model_file).is_file()

    sys.path.insert(0, str(path))
    for mod in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[mod]
    try:
        parser = ConfigParser()
        parser.read_config(str(path / "configs" / "inference.json"))
        parser.config.update({"bundle_root": str(path)})
        for k, v in overrides.items():
            parser[k] = v
        network = parser.get_parsed_content("network_def", instantiate=True)
        meta = json.loads((path / "configs" / "metadata.json").read_text())
        key_image = next(iter(meta["network_data_format"]["inputs"]))
        key_pred = next(iter(meta["network_data_format"]["outputs"]))
        assert (key_image, key_pred) == ("image", "pred")  # BasicInferTask's input_key / output_label_key

        net = copy.deepcopy(network)
        ckpt = torch.load(path / "models" / spec.model_file, map_location="cpu")
        net.load_state_dict(ckpt.get(kw["model_state_dict"], ckpt), strict=kw["load_strict"])
        net.eval()

        data = {"image": image, "image_path": image}
        pre = parser.get_parsed_content("preprocessing", instantiate=True)
        for t in (list(pre.transforms) if isinstance(pre, Compose) else pre):
            data = t(data)
        inferer = parser.get_parsed_content("inferer", instantiate=True)
        with torch.no_grad():
            data["pred"] = inferer(data["image"][None], net)[0]
        post = parser.get_parsed_content("postprocessing", instantiate=True)
        for t in (list(post.transforms) if isinstance(post, Compose) else post):
            if not isinstance(t, SaveImaged):  # BundleInferTask's default post_filter
                data = t(data)
        assert kw["add_post_restore"] is False  # no Restored(pred -> image grid): outputs are new volumes
        return {"data": data, "parser": parser}
    finally:
        sys.path.remove(str(path))


def served_and_written(bundle: str, models_dir: Path, image: str, work: Path, settings: Mapping,
                       weights: Mapping, role: str = "model") -> tuple:
    """(MONAI Label's prediction for ``image``, the volume ``inference.json``'s own run writes for it, the served
    config parser), both with ``settings`` and the network of ``weights["checkpoint"]`` (the served config gets it
    as a user edits inference.json, the run as ``ctsynth`` passes it); ``weights`` are the run's weight paths."""
    from ctsynth.bundles import checkpoint_config, checkpoint_settings, run_bundle
    from ctsynth.io import load_volume

    ckpt = weights["checkpoint"]
    served = serve_like_monai_label(bundle, models_dir, image, work / "label",
                                    {**settings, **checkpoint_config(bundle, ckpt, role)})
    out = work / "written.nii.gz"
    run_bundle(bundle, ["inference.json"], "inference", {**settings, **weights, **checkpoint_settings(bundle, ckpt, role),
                                                         "input": image, "output": str(out)})
    return served["data"]["pred"], load_volume(out), served["parser"]


def phantom_xray2ct_dataset(root: Path, n: int, side: int, spacing_mm: float, sizes: Sequence[int], xray_size: int,
                            fractions: Sequence[float], seed: int) -> Path:
    """``n`` thorax phantoms (side^3 voxels of ``spacing_mm``) prepared for cascade_xray2ct under ``root/data``."""
    from ctsynth.io import save_nifti
    from ctsynth.phantoms import thorax_phantom
    from ctsynth.prepare import prepare_xray2ct

    for i in range(n):
        vol, _ = thorax_phantom((side,) * 3, spacing_mm, seed=seed + i)
        save_nifti(vol, root / "ct" / f"p{i}.nii.gz")
    prepare_xray2ct(str(root / "ct" / "*.nii.gz"), root / "data", views=2, sizes=list(sizes), xray_size=xray_size,
                    fractions=tuple(fractions))
    return root


#: a cascade small enough to train a stage in seconds on 32^3 phantoms (grids 16 and 32)
CASCADE_TINY_SIZES = [16, 32]
CASCADE_TINY = {
    "sizes": CASCADE_TINY_SIZES, "num_workers": 0, "network_def#encoder_channels": [4, 8, 8], "network_def#hidden": 16,
    "network_def#depth": [1, 1], "network_def#heads": [2, 2], "network_def#patch": [4, 8],
    "network_def#stem_channels": 4, "network_def#xray_token_grid": 4, "batch_size": 2, "epochs": 1,
}


@pytest.fixture(scope="session")
def tiny_cascade(tmp_path_factory) -> Path:
    """Four 32^3 phantoms prepared for cascade_xray2ct (``data/``) and a stage-1 cascade trained on them
    (``models/model.pt``)."""
    from ctsynth.bundles import run_bundle

    root = phantom_xray2ct_dataset(tmp_path_factory.mktemp("tiny_cascade"), 4, 32, 12.0, CASCADE_TINY_SIZES, 32,
                                   (0.5, 0.25, 0.25), 400)
    run_bundle("cascade_xray2ct", ["train.json"], "training",
               {**CASCADE_TINY, "dataset_dir": str(root / "data"), "models_dir": str(root / "models"),
                "output_dir": str(root / "eval")})
    return root


def refused(capsys, argv: Sequence[str], match: str, status: int = 1) -> str:
    """Runs ``ctsynth argv`` and checks it was refused as a user should see it: exit ``status``, one message on
    stderr matching ``match``, no traceback, nothing on stdout. Returns the message."""
    from ctsynth.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    cap = capsys.readouterr()
    assert rc == status, cap.err
    assert re.search(match, cap.err), cap.err
    assert "Traceback" not in cap.err and cap.out == "", (cap.out, cap.err)
    return cap.err
