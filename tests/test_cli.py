import json

import pytest
import torch

from conftest import refused

from ctsynth.cli import main, normalise_argv


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["phantom", "o", "--shape", "64", "64", "32"], ["phantom", "o", "--shape=64,64,32"]),
        (["metrics", "a", "b", "--window", "-1000", "1000"], ["metrics", "a", "b", "--window=-1000,1000"]),
        (["phantom", "o", "--spacing", "1.5", "--n", "2"], ["phantom", "o", "--spacing=1.5,", "--n", "2"]),
        (["drr", "v", "--views", "ap,lateral"], ["drr", "v", "--views", "ap,lateral"]),
    ],
)
def test_normalise_argv(argv, expected):
    assert normalise_argv(argv) == expected


def _json_out(capsys):
    return json.loads(capsys.readouterr().out)


def test_cli_end_to_end(tmp_path, capsys):
    main(["phantom", str(tmp_path / "ph"), "--n", "2", "--shape", "40", "40", "32", "--spacing", "6", "--contrast",
          "--emboli", "1", "--seed", "3"])
    assert _json_out(capsys)["written"] == 2
    manifest = json.loads((tmp_path / "ph" / "phantoms.json").read_text())
    assert manifest[0]["seed"] == 3 and manifest[0]["pe"] == 1
    vol = tmp_path / "ph" / "phantom_0003.nii.gz"
    main(["drr", str(vol), "--out", str(tmp_path / "drr"), "--size", "32", "--views", "ap,lateral"])
    out = _json_out(capsys)
    assert len(out["views"]) == 2 and (tmp_path / "drr" / "drr_ap.png").exists()
    assert json.loads((tmp_path / "drr" / "geometry.json").read_text())["detector_shape"] == [32, 32]
    main(["metrics", str(vol), str(vol), "--window", "-1000", "1000"])
    m = _json_out(capsys)
    assert m["psnr"] == 100.0 and m["ssim"] == pytest.approx(1.0) and m["window"] == [-1000.0, 1000.0]
    main(["convert", str(vol), str(tmp_path / "dcm")])
    assert _json_out(capsys)["files"] == 32
    main(["convert", str(tmp_path / "dcm"), str(tmp_path / "back.nii.gz")])
    capsys.readouterr()
    main(["metrics", str(tmp_path / "back.nii.gz"), str(vol)])
    assert _json_out(capsys)["mae"] < 0.5  # DICOM stores whole HU


def test_cli_bench_drr_small(tmp_path, capsys):
    main(["bench", "drr", "--size", "32", "--shape", "32", "32", "16", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    res = _json_out(capsys)
    assert res["benchmark"] == "drr" and res["job"]["volume_shape"] == [32, 32, 16]
    assert res["seconds_per_drr"]["forward"] > 0 and "machine" in res
    assert json.loads((tmp_path / "b.json").read_text())["job"] == res["job"]


def test_foundation_demo(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path), "--bundle", "foundation", "--n", "2"])
    paths = _json_out(capsys)
    report = json.loads(open(paths["foundation"]).read())
    assert len(report["phantoms"]) == 2
    base = report["baselines"]
    assert base["slab5_linear"]["window"] == [-1000, 1000]
    assert base["slab5_linear"]["psnr"] > base["mean_volume"]["psnr"]
    assert (tmp_path / "foundation" / "drr" / "phantom_000_ap.png").exists()
    assert (tmp_path / "foundation" / "previews" / "phantom_001.png").exists()


def test_cli_errors(tmp_path, capsys):
    refused(capsys, ["phantom", str(tmp_path), "--format", "mhd"], "--format")
    refused(capsys, ["demo", "--out", str(tmp_path), "--bundle", "nope"], "unknown demo")
    refused(capsys, ["demo", "--out", str(tmp_path), "--bundle", "cascade_xray2ct", "--views", "0"],
            "--views must be between 1 and 64", status=2)
    refused(capsys, ["demo", "--out", str(tmp_path), "--bundle", "cascade_xray2ct", "--baseline", "maybe"], "baseline",
            status=2)
    assert not (tmp_path / "cascade_xray2ct").exists()  # refused before anything is written


def test_tune_cpu_allocator_respects_opt_out(monkeypatch):
    from ctsynth.runtime import tune_cpu_allocator

    monkeypatch.setenv("CTSYNTH_NO_MALLOC_TUNING", "1")
    assert tune_cpu_allocator() is False
    monkeypatch.delenv("CTSYNTH_NO_MALLOC_TUNING")
    assert tune_cpu_allocator() in (True, False)  # True on glibc, False elsewhere


def test_prepare_xray2ct(tmp_path, capsys):
    from ctsynth.io import load_volume
    from ctsynth.prepare import deterministic_split

    main(["phantom", str(tmp_path / "ct"), "--n", "4", "--shape", "40", "36", "24", "--spacing", "8", "8", "12"])
    (tmp_path / "ct" / "broken.nii.gz").write_bytes(b"not a nifti")
    capsys.readouterr()
    main(["prepare", "xray2ct", "--ct", str(tmp_path / "ct" / "*.nii.gz"), "--out", str(tmp_path / "data"),
          "--views", "4", "--sizes", "8", "16", "--xray-size", "32", "--remove-table"])
    report = _json_out(capsys)
    assert report["prepared"] == 4 and report["skipped"][0]["source"].endswith("broken.nii.gz")
    datalist = json.loads((tmp_path / "data" / "datalist.json").read_text())
    assert sum(report["splits"].values()) == 4 and report["splits"]["test"] == 1
    case = datalist["training"][0]
    cube = load_volume(tmp_path / "data" / case["image_16"])
    assert cube.shape == (1, 16, 16, 16) and float(cube.affine[0, 0]) == pytest.approx(case["fov_mm"] / 16)
    assert len(case["xrays"]) == 4 and datalist["meta"]["views_deg"] == [0.0, 45.0, 90.0, 135.0]
    assert datalist["meta"]["table_removal"] is True
    rec = json.loads((tmp_path / "data" / case["geometry"]).read_text())["reconstruction"]
    assert rec["fov_mm"] == pytest.approx(case["fov_mm"]) and len(rec["center_mm"]) == 3
    # the split does not depend on input order
    ids = [f"case{i}" for i in range(20)]
    assert deterministic_split(ids, seed=1) == deterministic_split(ids[::-1], seed=1)


def test_cli_bench_cascade_small(tmp_path, capsys):
    main(["bench", "cascade", "--small", "--sizes", "16", "24", "32", "--stages", "1", "3", "--batch", "1",
          "--xray-size", "32", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    res = _json_out(capsys)
    assert [s["stage"] for s in res["stages"]] == [1, 3] and res["stages"][1]["size"] == 32
    assert res["stages"][1]["losses"] == ["drr", "grad", "l1", "ssim", "vgg"]
    assert res["stages"][0]["step_s"]["median_s"] > 0 and res["stages"][0]["peak_memory_mb"] > 0
    for st in res["stages"]:  # what the step keeps for backward, by tensor, and the parameter-side memory
        saved = st["saved_for_backward"]
        assert saved["total_mb"] >= sum(r["mb"] for r in saved["largest"]) > 0 and saved["tensors"] > 0
        assert any(r["shape"][-3:] == [st["size"]] * 3 for r in saved["largest"])
        assert st["adamw_state_mb"] == pytest.approx(2 * st["gradients_mb"]) and st["parameters_mb"] > st["gradients_mb"]
    assert json.loads((tmp_path / "b.json").read_text())["benchmark"] == "cascade"


@pytest.mark.parametrize("case, tensors, nbytes", [
    ("product", 1, 8 * 4 * 4),  # mul keeps its input (the parameter is left out)
    ("exp_of_product", 2, 2 * 8 * 4 * 4),  # and exp keeps its result
    ("checkpointed", 1, 8 * 4 * 4),  # a checkpointed region keeps its input only: the rest is recomputed
    ("no_grad", 0, 0),
])
def test_saved_tensor_tally_counts_what_backward_keeps(case, tensors, nbytes):
    from torch.utils.checkpoint import checkpoint

    from ctsynth.bench import SavedTensorTally

    w = torch.nn.Parameter(torch.ones(4))
    x = torch.rand(8, 4, generator=torch.Generator().manual_seed(0))
    fns = {"product": lambda: (x * w).sum(), "exp_of_product": lambda: torch.exp(x * w).sum(),
           "checkpointed": lambda: checkpoint(lambda a: torch.exp(a * w), x, use_reentrant=False).sum(),
           "no_grad": lambda: torch.no_grad()(lambda: (x * w).sum())()}
    with SavedTensorTally([w]) as tally:
        fns[case]()
    summary = tally.summary()
    assert summary["tensors"] == tensors and summary["total_mb"] * 2**20 == nbytes
    if tensors:
        assert summary["largest"][0] == {"shape": [8, 4], "dtype": "float32", "count": tensors, "mb": nbytes / 2**20}


def test_cli_bench_vqgan_small_with_plot(tmp_path, capsys):
    main(["bench", "vqgan", "--small", "--train-shape", "16", "16", "16", "--batch", "1", "--volume", "24", "24", "20",
          "--roi", "16", "16", "16", "--repeats", "1", "--out", str(tmp_path / "v.json"), "--plot", str(tmp_path / "v.png")])
    res = _json_out(capsys)
    assert res["benchmark"] == "vqgan" and res["train_step"]["size"] == [16, 16, 16] and res["parameters"] > 0
    assert res["train_step"]["step_s"]["median_s"] > 0 and res["train_step"]["peak_memory_mb"] > 0
    assert res["patchwise"]["windows"] == 8 and res["patchwise"]["voxels_per_s"] > 0
    assert (tmp_path / "v.png").stat().st_size > 1000 and json.loads((tmp_path / "v.json").read_text()) == res
    assert res["amp"] is False and res["amp_dtype"] == "torch.float32"
    main(["bench", "vqgan", "--small", "--train-shape", "16", "16", "16", "--batch", "1", "--volume", "none",
          "--repeats", "1", "--amp"])
    res = _json_out(capsys)  # bfloat16 on CPU, as the bundle's training runs it
    assert res["amp"] is True and res["amp_dtype"] == "torch.bfloat16" and "patchwise" not in res


def test_plot_benchmark_needs_timings(tmp_path):
    from ctsynth.bench import plot_benchmark

    with pytest.raises(ValueError, match="no timings"):
        plot_benchmark({"benchmark": "x"}, tmp_path / "p.png")


@pytest.mark.parametrize("bundle, channels, guided", [("slice_interp_ldm", 4, False), ("xray2ctpa_vqgan", 16, True)])
def test_cli_bench_diffusion_small(bundle, channels, guided, capsys):
    main(["bench", "diffusion", "--bundle", bundle, "--small", "--latent-shape", "8", "8", "8", "--batch", "1",
          "--repeats", "1", "--latent-channels", "16", "--xray-size", "32"])
    res = _json_out(capsys)
    assert res["bundle"] == bundle and res["latent_shape"] == [1, channels, 8, 8, 8] and res["parameters"] > 0
    assert res["train_step_s"]["median_s"] > 0 and res["sample_step_s"]["median_s"] > 0
    assert res["guided_sample_step"] is guided
    refused(capsys, ["bench", "diffusion", "--bundle", "cascade_xray2ct"], "bundle must be one of")
    main(["bench", "diffusion", "--bundle", bundle, "--small", "--latent-shape", "8", "8", "8", "--batch", "1",
          "--repeats", "1", "--latent-channels", "16", "--xray-size", "32", "--phases", "sample"])
    res = _json_out(capsys)  # inference's step alone: the process peak is inference's
    assert res["phases"] == ["sample"] and "train_step_s" not in res and res["sample_step_s"]["median_s"] > 0
    refused(capsys, ["bench", "diffusion", "--phases", "infer"], "phases must be train and/or sample")


@pytest.mark.parametrize("argv, kind, key, value", [
    (["autoencoder", "--small", "--patch", "16", "16", "16"], "maisi_autoencoder", "patch", [16, 16, 16]),
    (["classifier", "--small", "--volume", "24", "24", "16", "--batch", "2"], "pe_classifier", "shape", [24, 24, 16]),
])
def test_cli_bench_stage_steps(argv, kind, key, value, capsys):
    main(["bench", *argv, "--repeats", "1"])
    res = _json_out(capsys)
    assert res["benchmark"] == kind and res[key] == value and res["parameters"] > 0
    assert res["step_s"]["median_s"] > 0 and res["peak_memory_mb"] > 0


def test_cli_bench_interpolate_reports_each_phase(tmp_path, capsys):
    main(["bench", "interpolate", "--shape", "32", "32", "6", "--spacing", "2", "2", "10", "--steps", "3",
          "--out", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    res = _json_out(capsys)
    assert res["benchmark"] == "interpolate" and res["thick_shape"] == [32, 32, 6] and res["thin_shape"] == [32, 32, 30]
    assert set(res["phases"]) == {"interpolate", "fit", "refine"}  # the refiner works on the thin grid itself
    assert all(p["seconds"] > 0 and p["peak_rss_mb"] > 0 for p in res["phases"].values())
    assert res["gain_over_cubic_db"] == res["psnr_db"] - res["cubic_psnr_db"]
    assert res["peak_memory_mb"] == max(p["peak_rss_mb"] for p in res["phases"].values())
    assert json.loads((tmp_path / "b.json").read_text())["phases"].keys() == res["phases"].keys()
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_peak_memory_of_a_stretch_of_work_can_be_measured():
    import subprocess
    import sys

    # a fresh process: a freed 256 MiB block has left its peak; after the reset the peak is what it holds now
    code = ("import numpy as np; from ctsynth.runtime import peak_rss_mb, reset_peak_rss; "
            "a = np.ones(2 ** 25); del a; before = peak_rss_mb(); ok = reset_peak_rss(); after = peak_rss_mb(); "
            "b = np.ones(2 ** 24); print(before, after, peak_rss_mb(), ok)")
    before, after, grown, ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split()
    if ok != "True":
        pytest.skip("this system cannot reset a process's peak memory")
    assert float(before) - float(after) > 200 and float(grown) - float(after) > 100
