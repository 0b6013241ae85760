"""Untrusted input never runs code, and the command line refuses before it writes.

Every case of the table runs ``ctsynth`` as a user would (in-process, ``ctsynth.cli.main``) and asserts the exit
status, the message (the file or option and the fix), that no traceback is printed, that a hostile input created
no marker file, and that outputs already on disk are byte-identical afterwards. Fixtures are made in code.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import string
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from ctsynth.atomic import atomic_write_json
from ctsynth.bundles import _DataOverrideWorkflow, checkpoint_config, run_bundle
from ctsynth.cli import OPTION_LIMITS, CLI, main
from ctsynth.cli_args import UsageError, check_command_line
from ctsynth.engine import atomic_torch_save
from ctsynth.io import VolumeReadError, load_volume, safe_extract_zip, save_dicom_series, save_nifti, zip_limits
from ctsynth.meta_schema import SAFE_STRING, MetaError, MetaField, validate_checkpoint_meta, validate_meta
from ctsynth.phantoms import grid_affine

MARKER = "PWNED"


def _hostile(tmp: Path) -> str:
    """A Python expression that creates the marker file if anything evaluates it."""
    return f"__import__('pathlib').Path({str(tmp / MARKER)!r}).touch()"


def _volume(shape=(12, 10, 8), spacing=(1.0, 1.0, 2.5), seed=0) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    return MetaTensor((torch.rand(1, *shape, generator=g) * 2000 - 1000).round(), affine=grid_affine(shape, spacing))


def _nifti(tmp: Path, name="ct.nii.gz", **kw) -> str:
    return str(save_nifti(_volume(**kw), tmp / name))


def _series(tmp: Path, name="series") -> Path:
    save_dicom_series(_volume(), tmp / name)
    return tmp / name


def _edit_slice(folder: Path, index: int, **tags) -> None:
    f = sorted(folder.iterdir())[index]
    ds = pydicom.dcmread(f)
    for k, v in tags.items():
        if v is None:
            delattr(ds, k)
        else:
            setattr(ds, k, v)
    ds.save_as(f)


def _previous(path: Path, text: str = "previous output\n") -> Path:
    """An output a user already has, that a refused run must leave byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _checkpoint(tmp: Path, meta: dict, name="evil.pt") -> str:
    return str(atomic_torch_save({"network": {}, "meta": meta}, tmp / name))


# ------------------------------------------------------------------------------------------- the table
# each case: tmp -> (argv, exit status, message pattern, paths that must stay byte-identical)
def evil_network_target(tmp):
    ckpt = _checkpoint(tmp, {"network_target": "os.system", "network_config": {"command": f"touch {tmp / MARKER}"}})
    out = _previous(tmp / "ct.nii.gz")
    return (["reconstruct", "a.png", "b.png", "--geometry", "g.json", "--out", str(out), "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'network_target' is 'os\.system', not one of this bundle's networks", [out])


def evil_network_config_target(tmp):
    ckpt = _checkpoint(tmp, {"network_target": "scripts.network.ProgressiveCascade",
                             "network_config": {"sizes": [16], "hidden": {"_target_": "os.system", "command": "x"}}})
    return (["reconstruct", "a.png", "--geometry", "g.json", "--out", str(tmp / "o.nii.gz"), "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'network_config\.hidden' has the entry name '_target_'", [])


def evil_network_config_argument(tmp):
    ckpt = _checkpoint(tmp, {"network_target": "scripts.network.ProgressiveCascade",
                             "network_config": {"sizes": [16], "_target_": "os.system"}})
    return (["reconstruct", "a.png", "--geometry", "g.json", "--out", str(tmp / "o.nii.gz"), "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'network_config\._target_'.*takes no argument", [])


def evil_network_config_string(tmp):
    ckpt = _checkpoint(tmp, {"network_target": "scripts.network.ProgressiveCascade",
                             "network_config": {"sizes": [16], "encoder_channels": ["$" + _hostile(tmp)]}})
    return (["reconstruct", "a.png", "--geometry", "g.json", "--out", str(tmp / "o.nii.gz"), "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'network_config\.encoder_channels' holds the string .\$__import__", [])


def huge_network(tmp):
    ckpt = _checkpoint(tmp, {"network_target": "scripts.network.ProgressiveCascade",
                             "network_config": {"sizes": [16], "hidden": 100000}})
    return (["reconstruct", "a.png", "--geometry", "g.json", "--out", str(tmp / "o.nii.gz"), "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'network_config\.hidden' is 100000, outside \[-4096", [])


def evil_prediction_type_ldm(tmp):
    ckpt = _checkpoint(tmp, {"scale_factor": 1.0, "prediction_type": "$" + _hostile(tmp)})
    out = _previous(tmp / "thin.nii.gz")
    return (["interpolate", _nifti(tmp), "--out", str(out), "--method", "ldm", "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'prediction_type' is .\$__import__.*not one of \['epsilon'", [out])


def evil_reference_ldm(tmp):
    ckpt = _checkpoint(tmp, {"scale_factor": 1.0, "schedule": "@bundle_root"})
    return (["interpolate", _nifti(tmp), "--out", str(tmp / "o.nii.gz"), "--method", "ldm", "--checkpoint", ckpt], 1,
            r"meta key 'schedule' is '@bundle_root', not one of", [])


def evil_prediction_type_generate(tmp):
    ckpt = _checkpoint(tmp, {"scale_factor": 1.0, "prediction_type": "%" + str(tmp / "x.json")})
    return (["generate", "cxr.png", "--out", str(tmp / "o.nii.gz"), "--checkpoint", ckpt], 1,
            r"evil\.pt: meta key 'prediction_type' is '%.*not one of", [])


def evil_meta_not_a_dict(tmp):
    ckpt = str(atomic_torch_save({"network": {}, "meta": ["$x"]}, tmp / "evil.pt"))
    return (["generate", "cxr.png", "--out", str(tmp / "o.nii.gz"), "--checkpoint", ckpt], 1,
            r"evil\.pt: its meta is a list, not a dict", [])


def huge_refiner(tmp):
    ckpt = _checkpoint(tmp, {"features": [100000, 16]})
    out = _previous(tmp / "thin.nii.gz")
    return (["interpolate", _nifti(tmp), "--out", str(out), "--method", "refiner", "--model", ckpt], 1,
            r"evil\.pt: meta key 'features\[0\]' is 100000, outside \[1, 512\]", [out])


def unknown_option(tmp):
    out = _previous(tmp / "thin.nii.gz")
    return (["interpolate", _nifti(tmp), "--out", str(out), "--spacng", "0.5"], 2,
            r"unknown option --spacng; did you mean --spacing\?", [out])


def unknown_command(tmp):
    return (["interpolat", "x.nii.gz"], 2, r"'ctsynth' has no command 'interpolat'; did you mean interpolate\?", [])


def bool_garbage(tmp):
    out = _previous(tmp / "thin.nii.gz")
    return (["interpolate", _nifti(tmp), "--out", str(out), "--consistency", "maybe"], 2,
            r"--consistency takes true/false \(or yes/no, 1/0\), got 'maybe'", [out])


def bool_garbage_equals(tmp):
    return (["convert", "a.nii.gz", "b.nii.gz", "--resample=sure"], 2, r"--resample takes true/false", [])


def option_without_value(tmp):
    return (["drr", "ct.nii.gz", "--out"], 2, r"--out needs a value", [])


def missing_required(tmp):
    return (["drr", "ct.nii.gz"], 2, r"missing OUT: give --out VALUE", [])


def extra_argument(tmp):
    return (["metrics", "a.nii.gz", "b.nii.gz", "c.nii.gz"], 2, r"unexpected argument 'c\.nii\.gz'", [])


def option_twice(tmp):
    return (["drr", "ct.nii.gz", "--out", "a", "--out", "b"], 2, r"--out is given twice", [])


def not_a_number(tmp):
    return (["drr", "ct.nii.gz", "--out", "o", "--size", "big"], 2, r"--size takes an integer, got 'big'", [])


def nan_number(tmp):
    return (["drr", "ct.nii.gz", "--out", "o", "--sid", "nan"], 2, r"--sid must be a finite number, got 'nan'", [])


def drr_size_zero(tmp):
    return (["drr", _nifti(tmp), "--out", str(tmp / "d"), "--size", "0"], 2, r"--size must be between 1 and 8192, got 0",
            [])


def drr_sid_zero(tmp):
    return (["drr", _nifti(tmp), "--out", str(tmp / "d"), "--sid", "0"], 2, r"--sid must be between 1 and 100000", [])


def tiny_spacing(tmp):
    out = _previous(tmp / "thin.nii.gz")
    return (["interpolate", _nifti(tmp), "--out", str(out), "--spacing", "1e-6"], 2,
            r"--spacing must be between 0\.05 and 100, got 1e-6", [out])


def bench_repeats_zero(tmp):
    return (["bench", "drr", "--repeats", "0"], 2, r"--repeats must be between 1 and 1000, got 0", [])


def views_nan(tmp):
    return (["drr", _nifti(tmp), "--out", str(tmp / "d"), "--views", "nan"], 1,
            r"view angle nan is not a finite number of degrees", [])


def views_duplicate(tmp):
    return (["drr", _nifti(tmp), "--out", str(tmp / "d"), "--views", "ap,ap"], 1,
            r"views 1 and 2 are the same \(0 degrees\); give each view once", [])


def dicom_ipp_nan(tmp):
    s = _series(tmp)
    _edit_slice(s, 2, ImagePositionPatient=[0.0, float("nan"), 5.0])
    return (["convert", str(s), str(tmp / "o.nii.gz")], 1, r"slice_0002\.dcm: ImagePositionPatient holds NaN/Inf", [])


def dicom_iop_five(tmp):
    s = _series(tmp)
    _edit_slice(s, 0, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0])
    return (["convert", str(s), str(tmp / "o.nii.gz")], 1, r"slice_0000\.dcm: ImageOrientationPatient has 5 values, "
                                                            r"expected 6", [])


def dicom_iop_zero(tmp):
    s = _series(tmp)
    _edit_slice(s, 1, ImageOrientationPatient=[0.0] * 6)
    return (["convert", str(s), str(tmp / "o.nii.gz")], 1, r"slice_0001\.dcm: ImageOrientationPatient .* is not two "
                                                            r"unit vectors", [])


def dicom_spacing_one(tmp):
    s = _series(tmp)
    _edit_slice(s, 3, PixelSpacing=[0.7])
    return (["convert", str(s), str(tmp / "o.nii.gz")], 1, r"slice_0003\.dcm: PixelSpacing has 1 values, expected 2", [])


def dicom_spacing_zero(tmp):
    s = _series(tmp)
    _edit_slice(s, 3, PixelSpacing=[0.0, 0.7])
    return (["convert", str(s), str(tmp / "o.nii.gz")], 1, r"slice_0003\.dcm: PixelSpacing \[0\.0, 0\.7\] must be "
                                                            r"positive", [])


def dicom_spacing_inf(tmp):
    s = _series(tmp)
    _edit_slice(s, 0, PixelSpacing=[float("inf"), 0.7])
    return (["convert", str(s), str(tmp / "o.nii.gz")], 1, r"slice_0000\.dcm: PixelSpacing holds NaN/Inf", [])


def nifti_zero_spacing(tmp):
    path = tmp / "flat.nii"
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), None)  # no sform / qform: spacing from pixdim
    nib.save(img, str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<f", raw, 76 + 2 * 4, 0.0)  # pixdim[2] = 0 (nibabel itself refuses to write it)
    path.write_bytes(bytes(raw))
    return (["convert", str(path), str(tmp / "o.nii.gz")], 1, r"flat\.nii: voxel spacing \(pixdim\) \[1\.0, 0\.0, 1\.0\] mm has a zero", [])


def nifti_sheared_to_dicom(tmp):
    path = tmp / "sheared.nii.gz"
    aff = np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), aff), str(path))
    return (["convert", str(path), str(tmp / "dicom_out")], 1, r"sheared.*voxel axes are sheared.*resample it", [])


def dicom_out_not_empty(tmp):
    out = _previous(tmp / "thin.nii.gz")
    dcm = tmp / "dcm"
    keep = _previous(dcm / "slice_0000.dcm", "an earlier series")
    return (["interpolate", _nifti(tmp), "--out", str(out), "--dicom_out", str(dcm)], 1,
            r"dcm: output folder is not empty; choose a new folder", [out, keep])


def output_below_a_file(tmp):
    blocker = _previous(tmp / "afile")
    return (["convert", _nifti(tmp), str(blocker / "o.nii.gz")], 1, r"afile is a file, not a folder", [blocker])


def output_is_a_folder(tmp):
    (tmp / "out.nii.gz").mkdir()
    return (["interpolate", _nifti(tmp), "--out", str(tmp / "out.nii.gz")], 1, r"out\.nii\.gz: is a folder", [])


def output_not_nifti(tmp):
    out = _previous(tmp / "thin.mhd")
    return (["interpolate", _nifti(tmp), "--out", str(out)], 1, r"thin\.mhd: NIfTI outputs end in \.nii or \.nii\.gz",
            [out])


def metrics_flipped(tmp):
    vol = _volume()
    a = save_nifti(vol, tmp / "a.nii.gz")
    aff = torch.as_tensor(vol.affine).clone()
    aff[0, 0], aff[0, 3] = -aff[0, 0], aff[0, 3] + aff[0, 0] * (vol.shape[1] - 1)  # the same image stored x-flipped
    b = save_nifti(MetaTensor(torch.flip(vol.as_tensor(), [1]), affine=aff), tmp / "b.nii.gz")
    return (["metrics", str(a), str(b)], 1, r"lie on different voxel grids .*--resample", [])


def metrics_shifted(tmp):
    vol = _volume()
    a = save_nifti(vol, tmp / "a.nii.gz")
    aff = torch.as_tensor(vol.affine).clone()
    aff[2, 3] += 300.0
    b = save_nifti(MetaTensor(vol.clone(), affine=aff), tmp / "b.nii.gz")
    return (["metrics", str(a), str(b)], 1, r"the same voxel lies up to 300 mm apart", [])


def metrics_empty_mask(tmp):
    vol = _volume()
    a = save_nifti(vol, tmp / "a.nii.gz")
    m = save_nifti(MetaTensor(torch.zeros_like(vol), affine=vol.affine), tmp / "mask.nii.gz")
    return (["metrics", str(a), str(a), "--mask", str(m)], 1, r"mask .*mask\.nii\.gz selects no voxel", [])


def bad_geometry_file(tmp):
    g = tmp / "g.json"
    atomic_write_json({"kind": "cone", "angles_deg": [0, 90], "sid_mm": float("nan"), "sdd_mm": 1200,
                       "detector_shape": [32, 32], "pixel_spacing_mm": [1, 1], "isocenter_mm": [0, 0, 0]}, g)
    return (["bundle", "verify", "cascade_xray2ct", "--geometry", str(g)], 1, r"g\.json: sid_mm is nan, expected a "
                                                                              r"finite number", [])


CASES = [evil_network_target, evil_network_config_target, evil_network_config_argument, evil_network_config_string,
         huge_network, evil_prediction_type_ldm, evil_reference_ldm, evil_prediction_type_generate,
         evil_meta_not_a_dict, huge_refiner, unknown_option, unknown_command, bool_garbage, bool_garbage_equals,
         option_without_value, missing_required, extra_argument, option_twice, not_a_number, nan_number,
         drr_size_zero, drr_sid_zero, tiny_spacing, bench_repeats_zero, views_nan, views_duplicate, dicom_ipp_nan,
         dicom_iop_five, dicom_iop_zero, dicom_spacing_one, dicom_spacing_zero, dicom_spacing_inf, nifti_zero_spacing,
         nifti_sheared_to_dicom, dicom_out_not_empty, output_below_a_file, output_is_a_folder, output_not_nifti,
         metrics_flipped, metrics_shifted, metrics_empty_mask, bad_geometry_file]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_refused_with_file_and_fix_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, status, match, kept = case(tmp_path)
    before = {p: Path(p).read_bytes() for p in kept}
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == status, cap.err
    assert re.search(match, cap.err), cap.err
    assert "Traceback" not in cap.err and cap.out == ""
    message = [line for line in cap.err.splitlines() if ": error: " in line]
    assert len(message) == 1 and message[0].startswith("ctsynth"), cap.err
    assert not (tmp_path / MARKER).exists()
    assert {p: Path(p).read_bytes() for p in kept} == before
    if status == 2:  # a usage error stops before any work: not a file is added
        assert sorted(str(p) for p in tmp_path.rglob("*")) == listing


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CTSYNTH_DEBUG", "1")
    assert main(["metrics", str(tmp_path / "nope.nii.gz"), str(tmp_path / "nope.nii.gz")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "nope.nii.gz: no such file or folder" in err


_GEOMETRY = {"kind": "cone", "angles_deg": [0, 90], "sid_mm": 1000, "sdd_mm": 1200, "detector_shape": [32, 32],
             "pixel_spacing_mm": [1.0, 1.0], "isocenter_mm": [0, 0, 0]}


@pytest.mark.parametrize("edit, match", [
    ({"sid_mm": float("nan")}, r"sid_mm is nan"), ({"sdd_mm": float("inf")}, r"sdd_mm is inf"),
    ({"sid_mm": 0}, r"sid_mm is 0\.0, expected a finite number in \[1"), ({"sdd_mm": 500}, r"need sid_mm <= sdd_mm"),
    ({"pixel_spacing_mm": [0.0, 1.0]}, r"pixel_spacing_mm is 0\.0"), ({"pixel_spacing_mm": [float("nan")]},
                                                                    r"pixel_spacing_mm is nan"),
    ({"angles_deg": [0, float("nan")]}, r"view angle nan"), ({"angles_deg": [0, 360]}, r"views 1 and 2 are the same"),
    ({"detector_shape": [0, 32]}, r"detector_shape must be"), ({"detector_shape": [100000, 32]}, r"from 1 to 8192"),
    ({"isocenter_mm": [0, float("inf"), 0]}, r"isocenter_mm is inf"), ({"sid_mm": "far"}, r"could not convert|wrong type"),
    ({"reconstruction": {"fov_mm": float("nan")}}, r"reconstruction\.fov_mm is nan"),
    ({"reconstruction": {"fov_mm": 0}}, r"reconstruction\.fov_mm is 0"),
    ({"reconstruction": {"center_mm": [0, float("nan"), 0]}}, r"reconstruction\.center_mm is nan"),
])
def test_geometry_file_values_are_checked(edit, match, tmp_path):
    from ctsynth.bundles import bundle_module

    path = atomic_write_json({**_GEOMETRY, **edit}, tmp_path / "geometry.json")
    with pytest.raises(ValueError, match=rf"geometry\.json: .*{match}"):
        bundle_module("cascade_xray2ct", "inference").reconstruction_grid(path)


# ------------------------------------------------------------------------------------------- hostile names
@pytest.mark.slow
def test_hostile_file_names_are_data_and_stdout_is_only_json(tiny_cascade, tmp_path):
    """Radiographs and an output whose names MONAI's parser would evaluate (``$``), follow (``@``, ``%``) or
    rewrite (``#``, ``::``) reconstruct like any other, in a real ``ctsynth`` process whose stdout is the JSON only."""
    case = json.loads((tiny_cascade / "data" / "datalist.json").read_text())["test"][0]
    names = ["$__import__('os').system('touch PWNED') or 'a'.nii.gz", "@bundle_root#x::y.nii.gz"]
    xrays = []
    for src, name in zip(case["xrays"], names):
        dst = tmp_path / name
        shutil.copyfile(tiny_cascade / "data" / src, dst)
        xrays.append(str(dst))
    out = tmp_path / "%inference#0 $x.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "ctsynth.cli", "reconstruct", *xrays, "--geometry",
                           str(tiny_cascade / "data" / case["geometry"]), "--out", str(out), "--checkpoint",
                           str(tiny_cascade / "models" / "model.pt"), "--preview", "false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but the JSON result on stdout
    assert report["inputs"] == xrays and report["output"] == str(out) and out.is_file()
    assert not (tmp_path / MARKER).exists()
    assert not out.with_suffix("").with_suffix(".png").exists()  # --preview false is false


def test_data_overrides_never_reach_the_parser(tmp_path):
    """The mechanism under run_bundle: top-level override values are resolved values, never evaluated, followed
    or rewritten, whatever they hold (random strings from the characters MONAI's parser reacts to)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"value": None, "echo": "$[@value]", "run": ["$@echo"]}))
    rng = random.Random(0)
    alphabet = "$@%#:_target{}()'\"\\ ./;" + string.ascii_letters
    values = [_hostile(tmp_path), "$" + _hostile(tmp_path), "@echo", "%" + str(config) + "#run", "a#b::c", "@#x",
              {"_target_": "os.system", "command": f"touch {tmp_path / MARKER}"}, ["$" + _hostile(tmp_path)]]
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for value in values:
        wf = _DataOverrideWorkflow({"value": value}, config_file=str(config), logging_file=False, workflow_type=None,
                                   init_id="initialize", run_id="run", final_id="finalize")
        wf.initialize()
        assert wf.run() == [[value]], value
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("value", ["$" + "x", {"_target_": "os.system"}, "@device", "a#b", ["%x"]])
def test_nested_overrides_must_be_plain(value):
    with pytest.raises(ValueError, match="override 'network_def#hidden' must be plain data"):
        run_bundle("cascade_xray2ct", ["inference.json"], "inference", {"network_def#hidden": value})


def test_device_is_parsed_not_evaluated(tmp_path):
    with pytest.raises(ValueError, match="is not a device; use cpu, cuda or cuda:N"):
        run_bundle("cascade_xray2ct", ["inference.json"], "inference", {}, device="cpu') or " + _hostile(tmp_path))
    assert not (tmp_path / MARKER).exists()


def test_fuzz_checkpoint_meta(tmp_path):
    """Random meta dicts through the checks every checkpoint path uses: each is refused (MetaError) or passes as
    plain data whose strings are words and whose dicts hold no ``_target_``: nothing a config parser acts on."""
    from ctsynth.bundles import checkpoint_rules

    rules = checkpoint_rules("xray2ctpa_vqgan", "ldm")
    targets = {"scripts.conditioning.XrayConditionedDenoiser": type("Net", (), {"__init__": lambda self, **kw: None})}
    rng = random.Random(1)
    leaves = [0, 1, -3, 2.5, 1e9, float("nan"), float("inf"), True, None, "epsilon", "sample", "$x", "@y", "%z", "a#b",
              "x::y", "_target_", "scaled_linear_beta", "ok-word", "' or 1", [1, 2, 3], [256, 256, 64], "diffusion"]

    def value(depth=0):
        r = rng.random()
        if depth < 3 and r < 0.15:
            return {rng.choice(["a", "_target_", "$k", "k"]): value(depth + 1) for _ in range(rng.randint(0, 3))}
        if depth < 3 and r < 0.3:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return rng.choice(leaves)

    keys = [*rules["fields"], "network_target", "network_config", "other"]
    passed = 0
    for _ in range(2000):
        meta = {k: value() for k in rng.sample(keys, rng.randint(1, len(keys)))}
        if rng.random() < 0.7:
            meta["scale_factor"] = rng.choice([1.0, 0.5, "$x", -1.0])
        if rng.random() < 0.5:
            meta["network_target"] = rng.choice([*targets, "os.system", "$x"])
            meta["network_config"] = {rng.choice(["channels", "_target_", "token_dim"]): value() for _ in range(2)}
        try:
            checked, network = validate_checkpoint_meta(meta, rules, "fuzz.pt", targets)
        except MetaError as e:
            assert str(e).startswith("fuzz.pt: ")
            continue
        passed += 1
        for v in [*checked.values(), *(network.args.values() if network else ())]:
            _assert_plain(v)
    assert passed > 0


def _assert_plain(v):
    if isinstance(v, str):
        assert SAFE_STRING.match(v), v
    elif isinstance(v, dict):
        assert all(not k.startswith("_") for k in v), v
        for x in v.values():
            _assert_plain(x)
    elif isinstance(v, list):
        for x in v:
            _assert_plain(x)
    else:
        assert v is None or isinstance(v, (bool, int, float)) and np.isfinite(v), v


@pytest.mark.parametrize("field, value, ok", [
    (MetaField("int", min=1, max=8), 3, True), (MetaField("int", min=1, max=8), 9, False),
    (MetaField("int"), 2.5, False), (MetaField("int"), True, False), (MetaField("float"), float("nan"), False),
    (MetaField("str"), "scaled_linear_beta", True), (MetaField("str"), "$x", False), (MetaField("str"), "a b", False),
    (MetaField("str", choices=("a", "b")), "c", False), (MetaField("ints", len=2), [1, 2], True),
    (MetaField("ints", len=2), [1], False), (MetaField("ints", max_len=2), [], False), (MetaField("bool"), 1, False),
    (MetaField("plain"), {"k": [1, "w"]}, True), (MetaField("plain"), {"_target_": "os.system"}, False),
])
def test_meta_fields(field, value, ok):
    if ok:
        assert validate_meta({"k": value}, {"k": field}, "f.pt")["k"] == value
    else:
        with pytest.raises(MetaError, match=r"^f\.pt: meta key 'k"):
            validate_meta({"k": value}, {"k": field}, "f.pt")


def test_checkpoint_config_of_a_trained_cascade_is_plain(tiny_cascade):
    cfg = checkpoint_config("cascade_xray2ct", tiny_cascade / "models" / "model.pt")
    assert cfg["network_def"]["_target_"] == "scripts.network.ProgressiveCascade" and cfg["sizes"] == [16, 32]
    _assert_plain({k: v for k, v in cfg["network_def"].items() if k != "_target_"})


# ------------------------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("argv, expected", [
    (["interpolate", "a", "--out", "b", "--flips", "false"], "--flips=False"),
    (["interpolate", "a", "--out", "b", "--flips", "NO"], "--flips=False"),
    (["interpolate", "a", "--out", "b", "--flips", "Yes"], "--flips=True"),
    (["interpolate", "a", "--out", "b", "--flips=0"], "--flips=False"),
    (["interpolate", "a", "--out", "b", "--flips"], "--flips=True"),
    (["interpolate", "a", "--out", "b", "--noflips"], "--flips=False"),
    (["interpolate", "--self-supervised", "a", "--out", "b"], "--self_supervised=True"),
    (["convert", "a", "b", "--series-uid", "1.2"], "--series_uid='1.2'"),
    (["convert", "a", "b", "--series-uid", "$x"], "--series_uid='$x'"),
])
def test_command_line_is_normalised_for_fire(argv, expected):
    assert expected in check_command_line(CLI(), argv, OPTION_LIMITS)


def test_fuzz_command_line():
    """Random command lines are either refused with a UsageError (a message, exit 2) or normalised to
    ``--name=value`` options that name the command's own parameters; nothing else escapes the check."""
    rng = random.Random(2)
    words = ["interpolate", "drr", "bench", "cascade", "prepare", "ctpa", "metrics", "convert", "a.nii.gz", "--out",
             "o", "--spacing", "2", "--flips", "false", "--size", "0", "--sid", "nan", "--seed", "-1", "$x", "@y",
             "--help-me", "--", "--noflips", "--views", "ap,ap", "--n", "3", "--shape=4,4,4", "maybe", "1e9"]
    for _ in range(2000):
        argv = [rng.choice(words) for _ in range(rng.randint(0, 8))]
        try:
            out = check_command_line(CLI(), argv, OPTION_LIMITS)
        except UsageError as e:
            assert str(e)
            continue
        assert isinstance(out, list) and all(isinstance(a, str) for a in out)


def test_help_is_not_checked_as_an_option(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["drr", "--help"])
    cap = capsys.readouterr()
    assert stop.value.code == 0 and "pixel_spacing" in cap.out + cap.err and "Traceback" not in cap.err


def test_false_is_false(tmp_path, capsys):
    """``--consistency false`` really turns it off (fire alone passes the truthy string 'false')."""
    src = _nifti(tmp_path, shape=(8, 8, 6))
    for word, expected in (("false", False), ("TRUE", True), ("0", False)):
        assert main(["interpolate", src, "--out", str(tmp_path / f"{word}.nii.gz"), "--spacing", "1.25",
                     "--consistency", word]) == 0
        assert json.loads(capsys.readouterr().out)["consistency"] is expected


def test_upper_case_nii_gz_is_compressed(tmp_path, capsys):
    out = tmp_path / "OUT.NII.GZ"
    assert main(["convert", _nifti(tmp_path), str(out)]) == 0
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(out.read_bytes())[:4] in (struct.pack("<i", 348), struct.pack(">i", 348))


def test_missing_rescale_tags_are_a_warning_in_the_report(tmp_path, capsys):
    s = _series(tmp_path)
    for i in range(len(list(s.iterdir()))):
        _edit_slice(s, i, RescaleIntercept=None, RescaleSlope=None)
    assert main(["convert", str(s), str(tmp_path / "o.nii.gz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["warnings"]) == 1 and "lack RescaleSlope and RescaleIntercept" in report["warnings"][0]
    assert "probably not HU" in report["warnings"][0]  # stored values are all >= 0
    assert float(load_volume(tmp_path / "o.nii.gz").min()) >= 0  # read as stored, never a silent -1024


def test_metrics_resample_compares_on_one_grid(tmp_path, capsys):
    vol = _volume()
    a = save_nifti(vol, tmp_path / "a.nii.gz")
    aff = torch.as_tensor(vol.affine).clone()
    aff[0, 0], aff[0, 3] = -aff[0, 0], aff[0, 3] + aff[0, 0] * (vol.shape[1] - 1)
    b = save_nifti(MetaTensor(torch.flip(vol.as_tensor(), [1]), affine=aff), tmp_path / "b.nii.gz")
    assert main(["metrics", str(a), str(b), "--resample"]) == 0
    assert json.loads(capsys.readouterr().out)["psnr"] == 100.0  # the x-flipped copy is the same image


@pytest.mark.slow
def test_bad_ground_truth_leaves_the_previous_reconstruction(tiny_cascade, tmp_path, capsys):
    case = json.loads((tiny_cascade / "data" / "datalist.json").read_text())["test"][0]
    out = _previous(tmp_path / "ct.nii.gz")
    before = out.read_bytes()
    rc = main(["reconstruct", *[str(tiny_cascade / "data" / x) for x in case["xrays"]], "--geometry",
               str(tiny_cascade / "data" / case["geometry"]), "--out", str(out), "--checkpoint",
               str(tiny_cascade / "models" / "model.pt"), "--ground_truth", str(tmp_path / "missing.nii.gz")])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.nii.gz: no such file or folder" in err
    assert out.read_bytes() == before and not (tmp_path / "ct.json").exists()


# ------------------------------------------------------------------------------------------- archives
def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _patch_zip(path: Path, flag: int | None = None, method: int | None = None, corrupt: bool = False) -> Path:
    """Rewrites the first entry's headers (general-purpose flag, compression method) or one data byte."""
    raw = bytearray(path.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    if flag is not None:
        struct.pack_into("<H", raw, local + 6, flag)
        struct.pack_into("<H", raw, central + 8, flag)
    if method is not None:
        struct.pack_into("<H", raw, local + 8, method)
        struct.pack_into("<H", raw, central + 10, method)
    if corrupt:
        name_len, extra_len = struct.unpack_from("<HH", raw, local + 26)
        raw[local + 30 + name_len + extra_len + 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("make, match", [
    (lambda p: (p.write_bytes(b"PK\x03\x04 not really a zip"), p)[1], r"not a readable zip archive"),
    (lambda p: _patch_zip(_zip(p, {"a.dcm": os.urandom(4000) * 4}), flag=0x1), r"entry 'a\.dcm' is encrypted"),
    (lambda p: _patch_zip(_zip(p, {"a.dcm": os.urandom(4000) * 4}), method=9), r"compression method 9 \(e\.g\. "
                                                                                 r"Deflate64\)"),
    (lambda p: _patch_zip(_zip(p, {"a.dcm": bytes(range(256)) * 64}), corrupt=True), r"entry 'a\.dcm' cannot be read"),
])
def test_damaged_archives_are_named(make, match, tmp_path):
    archive = make(tmp_path / "study.zip")
    with pytest.raises(VolumeReadError, match=rf"study\.zip: .*{match}"):
        safe_extract_zip(archive, tmp_path / "x")
    assert not any((tmp_path / "x").rglob("*.dcm")) if (tmp_path / "x").exists() else True


def test_zip_expansion_is_capped_relative_to_the_archive(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "zeros.zip", {f"s{i}.dcm": bytes(900_000) for i in range(4)})  # 3.6 MB of zeros, a few KB zipped
    size = archive.stat().st_size
    assert zip_limits(archive, tmp_path) == 256 * 2**20  # 50x the archive is below the 256 MiB floor
    assert zip_limits(archive, tmp_path, max_total_ratio=1e6) == min(int(1e6 * size), 64 * 2**30,
                                                                      shutil.disk_usage(tmp_path).free - 2**30)
    monkeypatch.setenv("CTSYNTH_ZIP_MAX_GIB", "0.001")
    with pytest.raises(VolumeReadError, match=r"zeros\.zip: 0\.00 GiB uncompressed exceeds the limit"):
        safe_extract_zip(archive, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_prepare_skips_damaged_archives_and_goes_on(tmp_path, capsys):
    from ctsynth.prepare import write_phantom_ctpa_studies

    src = write_phantom_ctpa_studies(tmp_path / "src", n=3, shape=(24, 24, 16), spacing_mm=8.0, emboli=0.5, seed=0)
    studies = src / "studies"
    (studies / "bad.zip").write_bytes(b"PK\x03\x04 broken")
    _patch_zip(_zip(studies / "locked.zip", {"a.dcm": os.urandom(3000)}), flag=0x1)
    labels = src / "labels.csv"
    labels.write_text(labels.read_text() + "bad,0\nlocked,1\n")
    assert main(["prepare", "ctpa", "--studies", str(studies), "--labels", str(labels), "--out",
                 str(tmp_path / "data"), "--shape", "16", "16", "16", "--xray_size", "16"]) == 0
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    reasons = {Path(s["source"]).name: s["reason"] for s in report["skipped"]}
    assert "not a readable zip archive" in reasons["bad.zip"] and "is encrypted" in reasons["locked.zip"]
    assert report["prepared"] == 3 and (tmp_path / "data" / "datalist.json").is_file()


# ------------------------------------------------------------------------------------------- DICOM codecs
def _compress_gdcm(src: Path, dst: Path, syntax: str) -> None:
    gdcm = pytest.importorskip("gdcm")  # the encoder of the test series only; decoding is pylibjpeg's
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


@pytest.mark.parametrize("syntax, uid, plugin, tolerance_hu", [
    ("JPEGLSLossless", "1.2.840.10008.1.2.4.80", "pyjpegls", 0),
    ("JPEGLSNearLossless", "1.2.840.10008.1.2.4.81", "pyjpegls", 2),
    ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70", "pylibjpeg", 0),
    ("JPEGLosslessProcess14", "1.2.840.10008.1.2.4.57", "pylibjpeg", 0),
    ("RLELossless", "1.2.840.10008.1.2.5", "pydicom", 0),
    ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90", "pylibjpeg", 0),
])
def test_compressed_dicom_series_decode(syntax, uid, plugin, tolerance_hu, tmp_path):
    """Each transfer syntax common in archives reads back voxel for voxel (near-lossless within its error bound),
    decoded by a maintained plugin among the product's dependencies (gdcm only encodes the JPEG Lossless files)."""
    from pydicom.pixels.decoders.base import get_decoder

    vol = _volume(shape=(64, 48, 3))  # JPEG 2000 needs 32+ pixels a side for its wavelet levels
    plain = save_dicom_series(vol, tmp_path / "plain")
    out = tmp_path / "compressed"
    out.mkdir()
    for f in plain:
        if syntax.startswith("JPEGLossless"):
            _compress_gdcm(f, out / f.name, syntax)
        else:
            ds = pydicom.dcmread(f)
            ds.compress(uid, **({"jls_error": tolerance_hu} if tolerance_hu else {}))
            ds.save_as(out / f.name)
    assert str(pydicom.dcmread(next(out.iterdir())).file_meta.TransferSyntaxUID) == uid
    assert plugin in get_decoder(uid).available_plugins
    back, truth = load_volume(out).as_tensor(), load_volume(tmp_path / "plain").as_tensor()
    assert float((back - truth).abs().max()) <= tolerance_hu
