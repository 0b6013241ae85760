"""Nightly: every bundle's demo trains and evaluates end to end on phantoms, and its metrics must reach the floor
recorded in the bundle's metadata.json (``eval_metrics.nightly_floor``: dotted paths into the demo's metrics.json ->
minimum value), and the cascade demo with 4 views must beat its 2-view run by
``eval_metrics.nightly_views_gain_floor`` (seed 002's roadmap: more views is the largest lever). Run with
``python -m pytest tests -m nightly --nightly`` (about an hour on 2 CPU cores); the default test run only checks
that the floors are well-formed."""

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


def test_views_gain_floor_is_well_formed():
    floor = dict(_meta("cascade_xray2ct")["eval_metrics"]["nightly_views_gain_floor"])
    assert isinstance(floor.pop("views"), int) and floor
    assert all(path.startswith("checks.") and isinstance(gain, (int, float)) for path, gain in floor.items())


_DEMO_RUNS: dict[tuple, dict] = {}


def _demo_metrics(tmp_path_factory, bundle: str, **kwargs) -> dict:
    """The metrics.json of ``bundle``'s demo with ``kwargs``, run once per session."""
    from ctsynth.demo import run_demo

    key = (bundle, tuple(sorted(kwargs.items())))
    if key not in _DEMO_RUNS:
        out = tmp_path_factory.mktemp(f"nightly_{bundle}")
        run_demo(str(out), bundle, **kwargs)
        _DEMO_RUNS[key] = json.loads((out / bundle / "metrics.json").read_text())
    return _DEMO_RUNS[key]


@pytest.mark.nightly
@pytest.mark.parametrize("bundle", BUNDLES)
def test_demo_reaches_the_floor_in_metadata(bundle, tmp_path_factory):
    metrics = _demo_metrics(tmp_path_factory, bundle)
    short = {path: (_lookup(metrics, path), floor) for path, floor in _meta(bundle)["eval_metrics"]["nightly_floor"].items()
             if _lookup(metrics, path) is None or _lookup(metrics, path) < floor}
    assert not short, f"{bundle}: below the floor in metadata.json (measured, floor): {short}"


@pytest.mark.nightly
@pytest.mark.xfail(strict=True, reason="measured: with the demo's schedule the 4-view cascade's stage 1 stays at "
                   "12.1 dB validation PSNR for 36 epochs (2 views: 25.0 dB); see the bundle docs. Remove this "
                   "mark when it passes")
def test_cascade_four_views_beat_two(tmp_path_factory):
    floor = dict(_meta("cascade_xray2ct")["eval_metrics"]["nightly_views_gain_floor"])
    views = floor.pop("views")
    two = _demo_metrics(tmp_path_factory, "cascade_xray2ct")
    more = _demo_metrics(tmp_path_factory, "cascade_xray2ct", views=views, baseline=False)
    assert two["views"] == 2 and more["views"] == views
    gains = {path: _lookup(more, path) - _lookup(two, path) for path in floor}
    short = {path: (gain, floor[path]) for path, gain in gains.items() if gain < floor[path]}
    assert not short, f"{views} views over 2 (measured gain, floor): {short}"
