"""Nightly: every bundle's demo trains and evaluates end to end on phantoms, and its metrics must reach the floor
recorded in the bundle's metadata.json (``eval_metrics.nightly_floor``: dotted paths into the demo's metrics.json ->
minimum value). Run with ``python -m pytest tests -m nightly --nightly`` (about 30 minutes on 2 CPU cores); the
default test run only checks that the floors are well-formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctsynth.bundles import BUNDLES, bundle_root


def _meta(bundle: str) -> dict:
    return json.loads((Path(bundle_root(bundle)) / "configs" / "metadata.json").read_text())


def _lookup(obj: dict, dotted: str) -> float:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(f"{dotted!r}: no {part!r} in the demo's metrics.json")
        obj = obj[part]
    return obj


@pytest.mark.parametrize("bundle", BUNDLES)
def test_floors_are_recorded_below_the_measured_demo(bundle):
    metrics = _meta(bundle)["eval_metrics"]
    floors, measured = metrics["nightly_floor"], metrics["demo_phantoms"]
    assert floors and "definition" in measured
    for path, floor in floors.items():
        assert path.startswith("checks.") and isinstance(floor, (int, float)), path
    assert all(isinstance(v, (int, float)) for k, v in measured.items() if k != "definition")


@pytest.mark.nightly
@pytest.mark.parametrize("bundle", BUNDLES)
def test_demo_reaches_the_floor_in_metadata(bundle, tmp_path_factory):
    from ctsynth.demo import run_demo

    out = tmp_path_factory.mktemp(f"nightly_{bundle}")
    run_demo(str(out), bundle)
    metrics = json.loads((out / bundle / "metrics.json").read_text())
    short = {path: (_lookup(metrics, path), floor) for path, floor in _meta(bundle)["eval_metrics"]["nightly_floor"].items()
             if _lookup(metrics, path) is None or _lookup(metrics, path) < floor}
    assert not short, f"{bundle}: below the floor in metadata.json (measured, floor): {short}"
