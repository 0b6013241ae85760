"""Finding and running the bundles from the package (demo, ``ctsynth reconstruct``, tests, MONAI Label).

A bundle config sets ``"bundle_root": "$ctsynth.bundles.bundle_root('<name>')"``; that finds the bundle
folder and puts it first on ``sys.path`` (forgetting another bundle's ``scripts``), so ``scripts.*`` targets
import however the config is parsed, also in a process serving several bundles.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["BUNDLES", "DIFFUSION_SCHEDULE_KEYS", "bundle_root", "bundle_module", "run_bundle", "network_overrides"]

logger = logging.getLogger(__name__)

#: The bundles of this project.
BUNDLES = ("cascade_xray2ct", "slice_interp_ldm", "xray2ctpa_vqgan")
#: config ids a diffusion checkpoint records and its sampler must reuse (``network_overrides(..., meta_keys)``)
DIFFUSION_SCHEDULE_KEYS = ("prediction_type", "num_train_timesteps", "schedule", "beta_start", "beta_end")


def bundle_root(name: str, add_to_path: bool = True) -> str:
    """Folder of bundle ``name``.

    Looked up in order: ``$CTSYNTH_BUNDLES_DIR/<name>``, the current folder when it is that bundle,
    ``./bundles/<name>``, and the ``bundles/`` folder of the checkout this package was installed from.

    Raises:
        FileNotFoundError: listing where it looked.
    """
    if name not in BUNDLES:
        raise ValueError(f"unknown bundle {name!r}; choose from {BUNDLES}")
    cwd = Path.cwd()
    candidates = []
    if os.environ.get("CTSYNTH_BUNDLES_DIR"):
        candidates.append(Path(os.environ["CTSYNTH_BUNDLES_DIR"]) / name)
    candidates += [cwd if cwd.name == name else None, cwd / "bundles" / name,
                   Path(__file__).resolve().parents[2] / "bundles" / name]
    for c in candidates:
        if c is not None and (c / "configs").is_dir():
            root = str(c.resolve())
            if add_to_path:
                _activate(root)
            return root
    raise FileNotFoundError(
        f"bundle {name!r} not found (looked in {[str(c) for c in candidates if c is not None]}); run from the "
        "ctsynth checkout, or set CTSYNTH_BUNDLES_DIR to the folder holding the bundles"
    )


def _activate(root: str) -> None:
    """Puts bundle ``root`` first on ``sys.path`` and forgets another bundle's ``scripts`` package, so that
    ``import scripts...`` resolves to this bundle's (every bundle names its package ``scripts``)."""
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    for mod in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not str(getattr(sys.modules[mod], "__file__", "") or "").startswith(str(root)):
            del sys.modules[mod]


def bundle_module(name: str, module: str) -> Any:
    """Imports ``scripts.<module>`` of bundle ``name`` (e.g. ``bundle_module("slice_interp_ldm", "sampling")``)."""
    import importlib

    bundle_root(name)
    return importlib.import_module(f"scripts.{module}")


def run_bundle(name: str, configs: Sequence[str], run_id: str, overrides: Mapping[str, Any] | None = None,
               init_id: str = "initialize", final_id: str = "finalize") -> Any:
    """Runs ``run_id`` of bundle ``name`` with ``configs`` (file names in its ``configs/``, merged in order)
    and ``overrides`` (config ids -> values), as ``python -m monai.bundle run`` would."""
    from monai.bundle import ConfigWorkflow

    root = Path(bundle_root(name))
    files = [str(root / "configs" / c) for c in configs]
    workflow = ConfigWorkflow(config_file=files, meta_file=str(root / "configs" / "metadata.json"),
                              logging_file=False, workflow_type=None, init_id=init_id, run_id=run_id,
                              final_id=final_id, **dict(overrides or {}))
    workflow.initialize()
    try:
        return workflow.run()
    except RuntimeError as e:  # MONAI wraps errors raised while building or evaluating config items
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        if root is not e and isinstance(root, (ValueError, KeyError, OSError)):
            raise root from None  # ours name the file and the fix; the wrapper adds nothing for the user
        raise
    finally:
        workflow.finalize()


def network_overrides(checkpoint: str | Path, meta_keys: Sequence[str] = (),
                      meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config overrides (``network_def``, ``sizes``, and the ``meta_keys`` the checkpoint recorded, e.g. the
    diffusion schedule) rebuilding the network a checkpoint was trained with.

    ``network_def`` is left out when the checkpoint carries no network description (a bare state dict): the
    config's own is used then. Pass ``meta`` when it was read already (checkpoints can be gigabytes).
    """
    from ctsynth.engine import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint) if meta is None else meta
    out: dict[str, Any] = {k: meta[k] for k in meta_keys if k in meta}
    target, cfg = meta.get("network_target"), meta.get("network_config")
    if not target or not cfg:
        return out
    out["network_def"] = {"_target_": target, **cfg}
    if "sizes" in cfg:
        out["sizes"] = list(cfg["sizes"])
    elif "size" in cfg:
        out["sizes"] = [cfg["size"]]
    return out
