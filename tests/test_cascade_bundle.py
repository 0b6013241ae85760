"""cascade_xray2ct bundle end to end on tiny phantoms: configs, training through `monai.bundle run` (all three
stages, resume, multi-process DDP on CPU), UNet and adversarial options, evaluation, inference and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import refused, monai_bundle_run, phantom_xray2ct_dataset

from ctsynth.bundles import bundle_root, checkpoint_settings, run_bundle
from ctsynth.cli import main
from ctsynth.engine import read_checkpoint_meta
from ctsynth.io import load_volume

ROOT = Path(bundle_root("cascade_xray2ct"))
CONFIGS = ROOT / "configs"
SIZES = [16, 32, 48]
TINY = {
    "sizes": SIZES, "num_workers": 0, "network_def#encoder_channels": [4, 8, 8], "network_def#hidden": 32,
    "network_def#depth": [1, 1, 1], "network_def#heads": [2, 2, 2], "network_def#patch": [4, 8, 12],
    "network_def#stem_channels": 4, "network_def#xray_token_grid": 4, "batch_size": 2, "epochs": 1,
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return phantom_xray2ct_dataset(tmp_path_factory.mktemp("cascade"), 6, 48, 8.0, SIZES, 48, (0.6, 0.2, 0.2), 200)


def _dirs(root, name="models"):
    return {"dataset_dir": str(root / "data"), "models_dir": str(root / name), "output_dir": str(root / f"eval_{name}")}


def test_inference_network_matches_training():
    train = ConfigParser.load_config_file(CONFIGS / "train.json")
    infer = ConfigParser.load_config_file(CONFIGS / "inference.json")
    assert train["network_def"] == infer["network_def"]
    assert train["sizes"] == infer["sizes"] and train["intensity_range"] == infer["intensity_range"]


def test_stage_overrides_follow_the_seed():
    stages = [ConfigParser.load_config_file(CONFIGS / f) for f in ("train.json", "stage2.json", "stage3.json")]
    assert [s["epochs"] for s in stages] == [50, 30, 20]
    assert [s["batch_size"] for s in stages] == [8, 4, 2]
    assert [s["learning_rate"] for s in stages] == [1e-4, 5e-5, 2e-5]
    assert stages[2]["loss_weights"] == {"l1": 1.0, "ssim": 0.5, "vgg": 0.1, "grad": 0.2, "drr": 0.3}
    assert stages[0]["loss_weights"] == {"l1": 1.0, "ssim": 0.5}


def test_full_network_config_parses():
    bundle_root("cascade_xray2ct")  # what the config's bundle_root does when a workflow parses it
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    net = parser.get_parsed_content("network_def")
    assert net.sizes == (64, 128, 256) and [len(s.blocks) for s in net.stages] == [4, 6, 8]


def test_cascade_trains_all_stages_resumes_evaluates_and_reconstructs(dataset, tmp_path, capsys):
    d = _dirs(dataset)
    # stage 1 through the documented command line
    monai_bundle_run("cascade_xray2ct", "training", ["train.json"], {**TINY, **d})
    s1 = dataset / "models" / "stage1"
    assert torch.load(s1 / "checkpoint_last.pt")["trainer"] == {"epoch": 1, "iteration": 2}
    meta = read_checkpoint_meta(dataset / "models" / "model.pt")
    assert meta["stage"] == 1 and meta["network_config"]["sizes"] == SIZES and meta["key_metric"] == "val_psnr"

    # resume: one more epoch continues from the checkpoint instead of starting over
    run_bundle("cascade_xray2ct", ["train.json"], "training", {**TINY, **d, "epochs": 2})
    assert torch.load(s1 / "checkpoint_last.pt")["trainer"] == {"epoch": 2, "iteration": 4}
    hist = json.loads((dataset / "eval_models" / "stage1" / "history.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [1, 2] and "val_psnr" in hist[-1]

    # stages 2 and 3 start from the previous stage's best weights; stage 3 runs VGG + gradient + DRR terms
    frozen_before = {k: v.clone() for k, v in torch.load(s1 / "model.pt")["network"].items() if k.startswith("stages.0.")}
    vgg = {"vgg_weights": None, "vgg_random_init": True}
    run_bundle("cascade_xray2ct", ["train.json", "stage2.json"], "training", {**TINY, **d, **vgg})
    run_bundle("cascade_xray2ct", ["train.json", "stage3.json"], "training", {**TINY, **d, **vgg})
    final = torch.load(dataset / "models" / "model.pt")
    assert final["meta"]["stage"] == 3
    for k, v in frozen_before.items():  # stage 1 stayed frozen through stages 2 and 3
        assert torch.equal(final["network"][k], v), k
    hist3 = json.loads((dataset / "eval_models" / "stage3" / "history.json").read_text())["epochs"]
    assert {"loss_vgg", "loss_grad", "loss_drr"} <= set(hist3[0])

    # evaluation: every stage next to the baselines (from stage 2 on also the previous stage upsampled), on both
    # windows, each with its re-projection onto the input radiographs and standard deviations over the cases
    report = run_bundle("cascade_xray2ct", ["train.json", "evaluate.json"], "evaluate", {**TINY, **d})[0]
    rows = report["summary"]
    assert {(r["stage"], r["method"]) for r in rows} == {(k, m) for k in (1, 2, 3) for m in (
        "cascade", "mean_volume", "backprojection")} | {(k, "previous_stage") for k in (2, 3)}
    assert {tuple(r["window"]) for r in rows} == {(-1024.0, 3071.0), (-1000.0, 1000.0)}
    for r in rows:
        assert math.isfinite(r["reprojection_psnr"]) and r["reprojection_psnr_std"] >= 0 and r["n"] == report["cases"]
    per_case = {(r["case"], r["stage"], r["method"], tuple(r["window"])): r for r in report["per_case"]}
    for (case_id, stage, method, window), r in per_case.items():
        if method == "previous_stage":  # the previous stage's prediction, upsampled onto this stage's grid
            before = per_case[(case_id, stage - 1, "cascade", window)]
            assert r["size"] > before["size"] and abs(r["psnr"] - before["psnr"]) < 3.0
    for f in ("metrics.json", "metrics.md", "metrics.png", "preview.png"):
        assert (dataset / "eval_models" / f).stat().st_size > 100

    # ctsynth reconstruct rebuilds the network from the checkpoint and writes CT, stages, preview, report
    case = json.loads((dataset / "data" / "datalist.json").read_text())["test"][0]
    xr = [str(dataset / "data" / x) for x in case["xrays"]]
    out = tmp_path / "rec" / "ct.nii.gz"
    main(["reconstruct", *xr, "--geometry", str(dataset / "data" / case["geometry"]), "--out", str(out),
          "--checkpoint", str(dataset / "models" / "model.pt"), "--ground_truth",
          str(dataset / "data" / case["image_48"]), "--save_stages", "--device", "cpu"])
    assert '"reprojection_psnr_db"' in capsys.readouterr().out
    rep = json.loads((tmp_path / "rec" / "ct.json").read_text())
    ct = load_volume(out)
    truth = load_volume(dataset / "data" / case["image_48"])
    assert ct.shape == (1, 48, 48, 48)
    assert torch.allclose(torch.as_tensor(ct.affine), torch.as_tensor(truth.affine), atol=1e-3)
    assert load_volume(tmp_path / "rec" / "ct_stage1.nii.gz").shape == (1, 16, 16, 16)
    assert (tmp_path / "rec" / "ct.png").is_file() and len(rep["reprojection_psnr_db"]) == 2
    assert rep["metrics"]["-1000_1000"]["data_range"] == 2000.0

    # wrong number of views and a missing weights file give errors that say what to do
    refused(capsys, ["reconstruct", xr[0], "--geometry", str(dataset / "data" / case["geometry"]), "--out", str(out),
              "--checkpoint", str(dataset / "models" / "model.pt")], "describes 2 views.*1 radiographs")
    refused(capsys, ["reconstruct", *xr, "--geometry", str(dataset / "data" / case["geometry"]), "--out", str(out),
              "--checkpoint", str(tmp_path / "nope.pt")], "nope.pt")


def test_stage2_without_previous_weights_is_refused(dataset):
    with pytest.raises(Exception, match="stage1.*model.pt|weights file not found"):
        run_bundle("cascade_xray2ct", ["train.json", "stage2.json"], "training",
                   {**TINY, **_dirs(dataset, "empty_models"), "vgg_weights": None, "vgg_random_init": True})


def test_unet_baseline_and_adversarial_options_train(dataset):
    unet = {**TINY, **_dirs(dataset, "unet"), "network_def#features": [4, 4, 8, 8, 16, 4]}
    unet.pop("network_def#hidden"), unet.pop("network_def#depth"), unet.pop("network_def#heads")
    unet.pop("network_def#patch"), unet.pop("network_def#stem_channels"), unet.pop("network_def#xray_token_grid")
    unet["sizes"] = [16]
    run_bundle("cascade_xray2ct", ["train.json", "unet_baseline.json"], "training", unet)
    meta = read_checkpoint_meta(dataset / "unet" / "model.pt")
    assert meta["network_target"].endswith("BackprojectionUNet")
    assert checkpoint_settings("cascade_xray2ct", dataset / "unet" / "model.pt")["sizes"] == [16]

    # a baseline checkpoint enters the evaluation as a method of its name, rebuilt from its own network record:
    # the U-Net evaluated next to itself gives the same figures row for row (through the documented command line)
    ckpt = str(dataset / "unet" / "model.pt")
    monai_bundle_run("cascade_xray2ct", "evaluate", ["train.json", "unet_baseline.json", "evaluate.json"],
                     {**unet, "baselines": {"unet_again": ckpt}})
    report = json.loads((dataset / "eval_unet" / "metrics.json").read_text())
    assert report["baselines"] == {"unet_again": ckpt}
    rows = {(r["case"], r["method"], tuple(r["window"])): r for r in report["per_case"]}
    again = [r for key, r in rows.items() if key[1] == "unet_again"]
    assert len(again) == 2 * report["cases"]
    for r in again:
        own = rows[(r["case"], "cascade", tuple(r["window"]))]
        assert r["psnr"] == pytest.approx(own["psnr"], abs=1e-6) and r["ssim"] == pytest.approx(own["ssim"], abs=1e-6)
    assert "| unet_again |" in (dataset / "eval_unet" / "metrics.md").read_text()

    # names that are not words or shadow a built-in method, and a bare state dict, are refused with the fix
    torch.save(torch.load(ckpt)["network"], dataset / "unet" / "bare.pt")
    for baselines, match in (({"cascade": ckpt}, "must be a word.*other than cascade"),
                             ({"two words": ckpt}, "must be a word"),
                             ({"bare": str(dataset / "unet" / "bare.pt")}, "bare.pt.*bare state dict.*model.pt")):
        with pytest.raises(ValueError, match=match):
            run_bundle("cascade_xray2ct", ["train.json", "unet_baseline.json", "evaluate.json"], "evaluate",
                       {**unet, "baselines": baselines})

    adv = {**TINY, **_dirs(dataset, "adv"), "discriminator#channels": 4, "discriminator#num_layers_d": 2}
    run_bundle("cascade_xray2ct", ["train.json", "adversarial.json"], "training", adv)
    last = torch.load(dataset / "adv" / "stage1" / "checkpoint_last.pt")
    assert {"discriminator", "d_optimizer"} <= set(last)
    hist = json.loads((dataset / "eval_adv" / "stage1" / "history.json").read_text())["epochs"]
    assert {"loss_adv", "loss_feature_matching", "loss_d_loss"} <= set(hist[0])


def test_multi_gpu_config_runs_two_cpu_processes(dataset):
    d = _dirs(dataset, "ddp")
    res = monai_bundle_run("cascade_xray2ct", "training", ["train.json", "multi_gpu_train.json"], {**TINY, **d, "epochs": 1},
                           torchrun=True)
    last = torch.load(dataset / "ddp" / "stage1" / "checkpoint_last.pt")
    # 4 training cases, 2 ranks, batch 2: one step per rank per epoch (DistributedSampler splits the data)
    assert last["trainer"] == {"epoch": 1, "iteration": 1}, res.stdout[-2000:]


def test_demo_refuses_a_folder_prepared_with_other_views(tmp_path):
    from ctsynth.demo import cascade_xray2ct_demo

    data = tmp_path / "cascade_xray2ct" / "data"
    data.mkdir(parents=True)
    (data / "datalist.json").write_text(json.dumps({"training": [{"xrays": ["a.nii.gz", "b.nii.gz"]}]}))
    with pytest.raises(ValueError, match="holds a demo with 2 views; run the 4-view demo with another --out"):
        cascade_xray2ct_demo(tmp_path, views=4)
    assert sorted(p.name for p in (tmp_path / "cascade_xray2ct").iterdir()) == ["data"]  # nothing written
