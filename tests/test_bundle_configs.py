"""Checks every bundle shares: configs are plain JSON that only wires objects, metadata verifies against MONAI's
schema (offline), and the documented files exist."""

import json
from pathlib import Path

import pytest

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
BUNDLES = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())
SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "monai-schema" / "meta_schema_20240725.json"
CONFIGS = [(b, p.name) for b in BUNDLES for p in sorted((BUNDLES_DIR / b / "configs").glob("*.json"))]


def test_bundles_are_found():
    assert {"cascade_xray2ct", "slice_interp_ldm"} <= set(BUNDLES)


@pytest.mark.parametrize("bundle,name", CONFIGS)
def test_configs_are_valid_json_without_lambdas(bundle, name):
    text = (BUNDLES_DIR / bundle / "configs" / name).read_text()
    json.loads(text)
    assert "lambda" not in text


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_layout(bundle):
    root = BUNDLES_DIR / bundle
    for f in ("LICENSE", "docs/README.md", "models/README.md", "configs/logging.conf", "configs/train.json",
              "configs/inference.json", "configs/evaluate.json", "configs/multi_gpu_train.json", "scripts/__init__.py"):
        assert (root / f).is_file(), f"{bundle}: {f} is missing"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_metadata_verifies_offline(bundle, tmp_path):
    pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI's metadata schema is not beside this checkout ({SCHEMA})")
    from monai.bundle import verify_metadata

    target = tmp_path / "schema.json"
    target.write_text(SCHEMA.read_text())
    verify_metadata(meta_file=str(BUNDLES_DIR / bundle / "configs" / "metadata.json"), filepath=str(target))
