"""xray2ctpa_vqgan bundle, stage 1 (VQ-GAN) on tiny CTPA phantoms: prepare, train whole-volume through
`monai.bundle run` and patch-wise, resume, evaluate (patch-wise vs whole, seams, codebook), reconstruct."""

import json

import pytest
import torch

from conftest import monai_bundle_run

from ctsynth.bundles import run_bundle
from ctsynth.engine import read_checkpoint_meta
from ctsynth.io import load_volume
from ctsynth.prepare import load_datalist, prepare_ctpa, write_phantom_ctpa_studies

TINY = {"network_def#channels": [8, 16, 16, 16], "network_def#num_res_blocks": 1, "network_def#num_embeddings": 32,
        "network_def#embedding_dim": 8, "network_def#norm_groups": 4, "discriminator#channels": 4,
        "discriminator#num_layers_d": 2, "vgg_random_init": True, "adversarial_start": 2, "num_workers": 0,
        "epochs": 1, "batch_size": 2, "val_roi_size": [16, 16, 16]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqgan")
    src = write_phantom_ctpa_studies(root / "src", n=6, shape=(32, 32, 24), spacing_mm=8.0)
    labels = (src / "labels.csv").read_text().splitlines()
    (src / "labels.csv").write_text("\n".join(labels[:-1]) + "\n")  # one study without a label: mixed datalists load
    prepare_ctpa(src / "studies", root / "data", shape=(32, 32, 24), labels=src / "labels.csv", xray_size=32,
                 fractions=(0.5, 0.25, 0.25))
    over = {**TINY, "dataset_dir": str(root / "data"), "models_dir": str(root / "models"),
            "output_dir": str(root / "eval")}
    monai_bundle_run("xray2ctpa_vqgan", "training", ["train.json"], over)
    return root, over


def test_training_logs_codebook_and_resumes(trained):
    root, over = trained
    meta = read_checkpoint_meta(root / "models" / "vqgan.pt")
    assert meta["network_config"]["num_embeddings"] == 32 and meta["key_metric"] == "val_psnr"
    hist = json.loads((root / "eval" / "vqgan" / "history.json").read_text())["epochs"]
    assert 0 < hist[0]["codebook_usage_pct"] <= 100 and hist[0]["perplexity"] >= 1 and "val_psnr" in hist[0]
    assert {"loss_l1", "loss_commitment", "loss_perceptual"} <= set(hist[0])
    run_bundle("xray2ctpa_vqgan", ["train.json"], "training", {**over, "epochs": 2})
    last = torch.load(root / "models" / "vqgan" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 2 and {"discriminator", "d_optimizer", "lr_scheduler"} <= set(last)
    assert last["lr_scheduler"]["last_epoch"] == 2  # the cosine schedule was restored and stepped on after resuming
    hist = json.loads((root / "eval" / "vqgan" / "history.json").read_text())["epochs"]
    assert [h["epoch"] for h in hist] == [1, 2] and "loss_adv" in hist[1]


def test_patchwise_training_crops_random_patches(trained):
    root, over = trained
    run_bundle("xray2ctpa_vqgan", ["train.json", "patchwise.json"], "training", {
        **over, "patch_size": [16, 16, 16], "models_dir": str(root / "models_patch"), "output_dir": str(root / "eval_patch")})
    assert (root / "models_patch" / "vqgan.pt").is_file()


def test_evaluation_and_reconstruction(trained, tmp_path):
    root, over = trained
    report = run_bundle("xray2ctpa_vqgan", ["train.json", "evaluate.json"], "evaluate",
                        {**over, "eval_roi_size": [16, 16, 16]})[0]
    s = report["summary"]
    assert s["window_hu"] == [-1000.0, 1000.0] and 0 < s["codebook_usage_pct"] <= 100 and s["perplexity"] >= 1
    assert s["psnr_whole"] is not None and s["patchwise_minus_whole_db"] is not None and s["seam_ratio_patchwise"] > 0
    assert s["norm_stats"] == "volume"  # train.json: a model trained on whole volumes
    assert (root / "eval" / "metrics.md").is_file() and s["cases"] == len(report["cases"]) >= 1
    first = run_bundle("xray2ctpa_vqgan", ["train.json", "evaluate.json"], "evaluate", {
        **over, "eval_roi_size": [16, 16, 16], "eval_max_cases": 1, "output_dir": str(tmp_path / "one")})[0]
    assert first["summary"]["cases"] == 1 and first["cases"][0]["id"] == report["cases"][0]["id"]
    case = load_datalist(root / "data" / "datalist.json", "test")[0]
    rec = run_bundle("xray2ctpa_vqgan", ["reconstruct.json"], "inference", {
        **{k: v for k, v in over.items() if k.startswith("network_def")}, "models_dir": str(root / "models"),
        "input": case["image"], "output": str(tmp_path / "rec.nii.gz"), "preview": str(tmp_path / "rec.png"),
        "roi_size": [16, 16, 16]})[0]
    assert load_volume(tmp_path / "rec.nii.gz").shape == load_volume(case["image"]).shape
    assert (tmp_path / "rec.png").stat().st_size > 1000 and rec["metrics_vs_input"]["window"] == [-1000.0, 1000.0]


def test_multi_process_training_with_torchrun(trained):
    root, over = trained
    ddp = {**over, "models_dir": str(root / "models_ddp"), "output_dir": str(root / "eval_ddp"), "batch_size": 1}
    monai_bundle_run("xray2ctpa_vqgan", "training", ["train.json", "multi_gpu_train.json"], ddp, torchrun=True)
    last = torch.load(root / "models_ddp" / "vqgan" / "checkpoint_last.pt", weights_only=True)
    assert last["trainer"]["epoch"] == 1 and not any(k.startswith("module.") for k in last["network"])
    assert not any(k.startswith("module.") for k in last["discriminator"])
