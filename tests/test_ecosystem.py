"""The bundles in MONAI's ecosystem: packed as the model zoo hosts them, fetched with ``monai.bundle download``,
run from the fetched folder (its own scripts, its own models/), from another folder, and their large-file lists."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import CASCADE_TINY, CASCADE_TINY_SIZES, literal_args, phantom_xray2ct_dataset, run_python

from ctsynth.bundles import BUNDLES, _config_file_bundles, bundle_root, bundle_version, pack_bundle
from ctsynth.cli import main
from ctsynth.engine import read_checkpoint_meta
from ctsynth.io import load_volume

SIZES, TINY = CASCADE_TINY_SIZES, CASCADE_TINY


def _monai_bundle(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_python(["-m", "monai.bundle", *args], cwd=cwd)


@pytest.mark.parametrize("argv,expected", [
    (["-m", "monai.bundle", "run", "--config_file", "X/cascade_xray2ct/configs/train.json"], ["cascade_xray2ct"]),
    (["--config_file=X/cascade_xray2ct/configs/train.json"], ["cascade_xray2ct"]),
    (["--config_file", "['X/slice_interp_ldm/configs/train.json','X/slice_interp_ldm/configs/evaluate.json']"],
     ["slice_interp_ldm", "slice_interp_ldm"]),
    (["--config_file", "X/cascade_xray2ct/train.json"], []),  # not inside a configs/ folder
    (["--meta_file", "X/cascade_xray2ct/configs/metadata.json"], []),
])
def test_config_file_bundles_from_the_command_line(tmp_path, argv, expected):
    for b in BUNDLES:
        (tmp_path / b / "configs").mkdir(parents=True)
    argv = [a.replace("X/", f"{tmp_path}/") for a in argv]
    assert [p.name for p in _config_file_bundles(argv)] == expected


@pytest.mark.parametrize("bundle", BUNDLES)
def test_pack_holds_the_bundle_without_run_outputs(bundle, tmp_path):
    root = Path(bundle_root(bundle))
    # run outputs beside the sources must stay out of the package
    stray = [root / "eval" / "stray.txt", root / "scripts" / "__pycache__" / "stray.pyc", root / "models" / "stray.pt",
             root / "models" / "straystage" / "checkpoint_last.pt"]
    made = [p for p in stray if not p.exists()]
    new_dirs = sorted({d for p in made for d in [p.parent] if not d.exists()})
    try:
        for p in made:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
        path = pack_bundle(bundle, tmp_path)
        assert path.name == f"{bundle}_v{bundle_version(bundle)}.zip"
        names = zipfile.ZipFile(path).namelist()
        assert all(n.startswith(f"{bundle}/") for n in names)
        for required in ("configs/metadata.json", "configs/inference.json", "configs/logging.conf", "LICENSE",
                         "docs/README.md", "scripts/__init__.py", "large_files.yml"):
            assert f"{bundle}/{required}" in names, required
        assert not [n for n in names if "/eval/" in n or "__pycache__" in n or n.endswith(".pt")]
        if root / "models" / "stray.pt" in made:
            with_weights = zipfile.ZipFile(pack_bundle(bundle, tmp_path / "w", weights=True)).namelist()
            assert f"{bundle}/models/stray.pt" in with_weights
            assert not [n for n in with_weights if "straystage" in n]  # training state stays out
    finally:
        for p in made:
            p.unlink()
        for d in new_dirs:
            d.rmdir()


@pytest.fixture(scope="module")
def xray_dataset(tmp_path_factory):
    return phantom_xray2ct_dataset(tmp_path_factory.mktemp("eco"), 4, 32, 12.0, SIZES, 32, (0.5, 0.25, 0.25), 300)


def test_pack_download_and_run_from_the_downloaded_bundle(xray_dataset, tmp_path):
    """``ctsynth bundle pack`` -> ``monai.bundle download --url file://`` -> training run from inside the fetched
    folder (relative config path: it writes into the fetched bundle's models/, not the checkout's) -> inference
    run from another folder through the fetched bundle's absolute config path."""
    main(["bundle", "pack", "cascade_xray2ct", "--out", str(tmp_path / "dist")])
    zip_path = tmp_path / "dist" / f"cascade_xray2ct_v{bundle_version('cascade_xray2ct')}.zip"
    bundles = tmp_path / "bundles"
    _monai_bundle(["download", "--name", "cascade_xray2ct", "--url", zip_path.resolve().as_uri(),
                   "--bundle_dir", str(bundles)], cwd=tmp_path)
    fetched = bundles / "cascade_xray2ct"
    assert (fetched / "configs" / "metadata.json").is_file() and not (fetched / "models" / "model.pt").exists()

    data = str(xray_dataset / "data")
    _monai_bundle(["run", "training", "--config_file", "configs/train.json", "--dataset_dir", data,
                   *literal_args(TINY)], cwd=fetched)
    meta = read_checkpoint_meta(fetched / "models" / "model.pt")
    assert meta["stage"] == 1 and meta["network_config"]["sizes"] == SIZES
    assert (fetched / "eval" / "stage1" / "history.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(fetched / "eval" / "stage1"))
    tb.Reload()  # scalars and the tri-planar validation image of every epoch
    assert "val_triplanar" in tb.Tags()["images"] and {"loss", "val_psnr"} <= set(tb.Tags()["scalars"])

    case = json.loads((xray_dataset / "data" / "datalist.json").read_text())["test"][0]
    out = tmp_path / "ct.nii.gz"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    infer = {k: v for k, v in TINY.items() if k.startswith("network_def") or k == "sizes"}
    _monai_bundle(["run", "inference", "--config_file", str(fetched / "configs" / "inference.json"),
                   "--xrays", repr([str(xray_dataset / "data" / x) for x in case["xrays"]]),
                   "--geometry", str(xray_dataset / "data" / case["geometry"]), "--output", str(out),
                   *literal_args(infer)], cwd=elsewhere)
    assert load_volume(out).shape == (1, 16, 16, 16)  # a stage-1 model reconstructs on the first grid


@pytest.mark.parametrize("bundle,weights", [("cascade_xray2ct", "models/vgg19.pth"),
                                             ("slice_interp_ldm", "models/autoencoder.pt"),
                                             ("xray2ctpa_vqgan", "models/vgg19.pth")])
def test_large_files_list_names_the_pretrained_weights(bundle, weights):
    import yaml

    entries = yaml.safe_load((Path(bundle_root(bundle)) / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == [weights]
    assert all(e["url"].startswith("https://") and e["hash_type"] == "sha256" for e in entries)


def test_pack_publishes_trained_weights_and_download_large_files_fetches_them(tmp_path, monkeypatch):
    """``--weights-url``: weights copied for upload and listed with their sha256 in the packed large_files.yml;
    ``monai.bundle download_large_files`` on the fetched bundle gets them back and checks the hash."""
    import shutil

    import yaml

    src = tmp_path / "src"
    shutil.copytree(bundle_root("xray2ctpa_vqgan"), src / "xray2ctpa_vqgan",
                    ignore=shutil.ignore_patterns("__pycache__", "data", "eval", "*.pt", "*.pth"))
    weights = {"models/vqgan.pt": 1.0, "models/ldm.pt": 2.0}
    for rel, v in weights.items():
        torch.save({"network": {"w": torch.full((4,), v)}, "meta": {}}, src / "xray2ctpa_vqgan" / rel)
    (src / "xray2ctpa_vqgan" / "models" / "vqgan").mkdir()
    torch.save({"optimizer": {}}, src / "xray2ctpa_vqgan" / "models" / "vqgan" / "checkpoint_last.pt")  # not published
    monkeypatch.setenv("CTSYNTH_BUNDLES_DIR", str(src))
    host = tmp_path / "dist"
    zip_path = pack_bundle("xray2ctpa_vqgan", host, weights_url=(host / "xray2ctpa_vqgan_v{v}_files").as_uri()
                           .replace("%7Bv%7D", bundle_version("xray2ctpa_vqgan")))
    names = zipfile.ZipFile(zip_path).namelist()
    assert not [n for n in names if n.endswith(".pt")]
    listed = yaml.safe_load(zipfile.ZipFile(zip_path).read("xray2ctpa_vqgan/large_files.yml"))["large_files"]
    assert [e["path"] for e in listed] == ["models/vgg19.pth", "models/ldm.pt", "models/vqgan.pt"]
    assert all(len(e["hash_val"]) == 64 for e in listed[1:])

    # fetch the bundle, drop the third-party entry (no internet here) and fetch our weights through MONAI
    _monai_bundle(["download", "--name", "xray2ctpa_vqgan", "--url", zip_path.resolve().as_uri(),
                   "--bundle_dir", str(tmp_path / "got")], cwd=tmp_path)
    fetched = tmp_path / "got" / "xray2ctpa_vqgan"
    lf = fetched / "large_files.yml"
    lf.write_text(yaml.safe_dump({"large_files": listed[1:]}))
    _monai_bundle(["download_large_files", "--bundle_path", str(fetched)], cwd=tmp_path)
    for rel, v in weights.items():
        assert torch.load(fetched / rel)["network"]["w"][0].item() == v

    # a corrupted upload is refused by the hash check
    (fetched / "models" / "ldm.pt").unlink()
    (host / f"{zip_path.stem}_files" / "models" / "ldm.pt").write_bytes(b"not the weights")
    res = run_python(["-m", "monai.bundle", "download_large_files", "--bundle_path", str(fetched)], cwd=tmp_path,
                     check=False)
    assert res.returncode != 0 and "hash" in (res.stdout + res.stderr).lower()


def test_pack_errors():
    with pytest.raises(ValueError, match="unknown bundle"):
        pack_bundle("nope", "/tmp")


def test_cascade_verified_and_exported_for_one_geometry(tiny_cascade, tmp_path):
    """``ctsynth bundle verify cascade_xray2ct --geometry G`` checks and traces a FixedGeometryCascade: the
    TorchScript file reconstructs what the cascade does for that geometry; without --geometry it says what to give."""
    from monai.data import load_net_with_metadata

    from ctsynth.bundles import bundle_module, checkpoint_config, verify_bundle
    from ctsynth.engine import load_network_weights
    from ctsynth.geometry import ProjectionGeometry, cube_affine
    from ctsynth.transforms import load_radiographs, normalize_radiograph

    ckpt = tiny_cascade / "models" / "model.pt"
    case = json.loads((tiny_cascade / "data" / "datalist.json").read_text())["test"][0]
    geometry = str(tiny_cascade / "data" / case["geometry"])
    over = {"network_def": checkpoint_config("cascade_xray2ct", ckpt)["network_def"]}
    assert verify_bundle("cascade_xray2ct")["networks"]["network_def"] == {
        "skipped": "give --geometry to check and export it"}
    report = verify_bundle("cascade_xray2ct", export_dir=tmp_path, models_dir=tiny_cascade / "models",
                           overrides={"network_def": over}, settings={"geometry": geometry})
    assert report["networks"]["network_def"]["exported"] == str(tmp_path / "model.ts")

    ts, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    net = bundle_module("cascade_xray2ct", "network").ProgressiveCascade(**read_checkpoint_meta(ckpt)["network_config"])
    load_network_weights(net, ckpt)
    net.eval()
    xrays = normalize_radiograph(load_radiographs([tiny_cascade / "data" / x for x in case["xrays"]]))[None]
    fov, center, _ = bundle_module("cascade_xray2ct", "inference").reconstruction_grid(geometry)
    with torch.no_grad():
        expected = net(xrays, ProjectionGeometry.load_json(geometry), cube_affine(SIZES[0], fov, center))[-1]
        assert torch.allclose(ts(xrays), expected, atol=1e-5)
    assert meta["fixed_geometry_data_format"]["inputs"]["image"]["num_channels"] == 2
