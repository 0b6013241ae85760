"""Training plumbing: atomic saves, resume, best-model selection, non-finite losses, metrics, weights loading."""

import json

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from ctsynth.engine import (CheckpointManager, NonFiniteLossError, TrainingHistory, VolumeMetric, amp_settings,
                            atomic_torch_save, load_network_weights, optimisation_step, read_checkpoint_meta,
                            trainable_parameters)
from ctsynth.metrics import compute_image_metrics
from ctsynth.transforms import scale_hu


def test_atomic_torch_save_leaves_no_temporaries(tmp_path):
    path = atomic_torch_save({"a": torch.arange(3)}, tmp_path / "sub" / "x.pt")
    assert torch.equal(torch.load(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_atomic_torch_save_keeps_old_file_when_writing_fails(tmp_path):
    path = atomic_torch_save({"v": 1}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Unpicklable()}, path)
    assert torch.load(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def _trainer(model, opt, metric_values, max_nonfinite=3):
    """A real ignite engine doing SGD on y = 2x; ``metric_values`` feeds a fake validation engine."""
    x = torch.linspace(-1, 1, 8)[:, None]

    def step(engine, batch):
        loss = ((model(x) - 2 * x) ** 2).mean()
        optimisation_step(engine, loss, opt, grad_clip=1.0, max_nonfinite=max_nonfinite)
        return {"loss": float(loss), "terms": {"mse": float(loss)}}

    trainer = Engine(step)
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):  # what a metric attached to a validation engine does
        engine.state.metrics["val_psnr"] = metric_values[trainer.state.epoch - 1]

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run([0]))

    return trainer, evaluator


def test_checkpoint_manager_resumes_and_tracks_best(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = [10.0, 12.0, 11.0, 13.0]
    trainer, evaluator = _trainer(model, opt, metrics)
    mgr = CheckpointManager(tmp_path / "ck", {"network": model, "optimizer": opt}, evaluator=evaluator,
                            key_metric="val_psnr", meta={"stage": 1}, publish_path=tmp_path / "model.pt")
    mgr.attach(trainer)
    trainer.run(range(3), max_epochs=2)
    assert mgr.best_metric == 12.0 and mgr.best_epoch == 2
    last = torch.load(mgr.last_path)
    assert last["trainer"] == {"epoch": 2, "iteration": 6}
    w_after_2 = model.weight.detach().clone()

    # a fresh process: new objects, same folder -> continues at epoch 2 and keeps the best metric
    model2 = nn.Linear(1, 1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    trainer2, evaluator2 = _trainer(model2, opt2, metrics)
    mgr2 = CheckpointManager(tmp_path / "ck", {"network": model2, "optimizer": opt2}, evaluator=evaluator2,
                             key_metric="val_psnr", meta={"stage": 1}, publish_path=tmp_path / "model.pt")
    mgr2.attach(trainer2)
    started = []
    trainer2.add_event_handler(Events.EPOCH_STARTED,
                               lambda e: started.append(e.state.epoch))
    trainer2.run(range(3), max_epochs=4)
    assert started == [3, 4]  # epochs 1-2 were not repeated
    assert torch.load(mgr2.last_path)["trainer"] == {"epoch": 4, "iteration": 12}
    assert not torch.equal(model2.weight.detach(), w_after_2)  # it trained on
    meta = read_checkpoint_meta(tmp_path / "model.pt")
    assert meta["epoch"] == 4 and meta["metric"] == 13.0 and meta["stage"] == 1
    assert meta["network_target"] == "torch.nn.modules.linear.Linear"


@pytest.mark.parametrize("metrics, best_epoch, published_metric", [
    ([float("nan"), float("nan")], 2, None),  # never finite (an AUC on a one-class split): the model is still saved
    ([float("nan"), 5.0, float("nan")], 2, 5.0),  # a finite value replaces it; later NaN keeps it
    ([5.0, float("nan")], 1, 5.0),
])
def test_checkpoint_manager_handles_non_finite_metrics(tmp_path, metrics, best_epoch, published_metric):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer, evaluator = _trainer(model, opt, metrics)
    mgr = CheckpointManager(tmp_path / "ck", {"network": model, "optimizer": opt}, evaluator=evaluator,
                            key_metric="val_psnr", publish_path=tmp_path / "model.pt")
    mgr.attach(trainer)
    trainer.run(range(2), max_epochs=len(metrics))
    meta = read_checkpoint_meta(tmp_path / "model.pt")
    assert meta["epoch"] == best_epoch and meta["metric"] == published_metric


def test_checkpoint_manager_publishes_the_last_weights_when_validation_never_ran(tmp_path):
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.linspace(-1, 1, 8)[:, None]

    def step(engine, batch):
        loss = ((model(x) - 2 * x) ** 2).mean()
        optimisation_step(engine, loss, opt)
        return {"loss": float(loss.detach())}

    trainer, evaluator = Engine(step), Engine(lambda e, b: None)  # the evaluator never runs (val_interval > epochs)
    mgr = CheckpointManager(tmp_path / "ck", {"network": model, "optimizer": opt}, evaluator, "val_psnr",
                            publish_path=tmp_path / "model.pt")
    mgr.attach(trainer)
    trainer.run(range(2), max_epochs=2)
    meta = read_checkpoint_meta(tmp_path / "model.pt")
    assert meta["epoch"] == 2 and meta["metric"] is None
    assert torch.equal(torch.load(tmp_path / "model.pt")["network"]["weight"], model.weight.detach())


def test_resume_continues_the_random_stream_of_an_uninterrupted_run(tmp_path):
    import random

    import numpy as np

    def run(folder, epochs, draws):
        model = nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer, evaluator = _trainer(model, opt, [1.0] * 4)
        CheckpointManager(folder, {"network": model, "optimizer": opt}, evaluator, "val_psnr").attach(trainer)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: draws.append(
            (e.state.epoch, float(torch.rand(())), float(np.random.rand()), random.random())))
        trainer.run(range(2), max_epochs=epochs)

    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    straight: list = []
    run(tmp_path / "a", 4, straight)
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    interrupted: list = []
    run(tmp_path / "b", 2, interrupted)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # a new process: other seeds
    run(tmp_path / "b", 4, interrupted)
    assert [d[0] for d in interrupted] == [1, 2, 3, 4] and interrupted == straight
    assert torch.load(tmp_path / "b" / CheckpointManager.LAST, weights_only=True)["rng"]["numpy"]["keys"].numel() == 624


def test_resume_restores_the_amp_gradient_scaler(tmp_path, monkeypatch):
    import ctsynth.engine as eng

    def run(init_scale, epochs):
        # a float16 GPU as amp_settings sees it: AMP on with a fresh gradient scaler
        monkeypatch.setattr(eng, "amp_settings", lambda device, enabled, cpu_bf16=False: (True, torch.float16,
                                                                          torch.amp.GradScaler("cpu", init_scale=init_scale)))
        model = nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scales = []

        def step(engine, batch):
            scaler = eng.engine_amp(engine, True)[2]
            scales.append(scaler.get_scale())
            return {"loss": 0.0}

        trainer = Engine(step)
        trainer.state.device = torch.device("cpu")
        CheckpointManager(tmp_path, {"network": model, "optimizer": opt}).attach(trainer)
        trainer.run(range(1), max_epochs=epochs)
        return scales

    assert run(1234.0, 1) == [1234.0]
    assert torch.load(tmp_path / CheckpointManager.LAST, weights_only=True)["grad_scaler"]["scale"] == 1234.0
    assert run(65536.0, 2) == [1234.0]  # the resumed run's new scaler took the saved loss scale


def test_checkpoint_manager_rejects_foreign_checkpoint(tmp_path):
    model = nn.Linear(1, 1)
    atomic_torch_save({"network": model.state_dict()}, tmp_path / CheckpointManager.LAST)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer, evaluator = _trainer(model, opt, [1.0])
    CheckpointManager(tmp_path, {"network": model, "optimizer": opt}, evaluator, "val_psnr").attach(trainer)
    with pytest.raises(ValueError, match="lacks \\['optimizer'\\].*Move it"):
        trainer.run(range(1), max_epochs=1)


def test_training_history_writes_json_and_plot(tmp_path):
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer, evaluator = _trainer(model, opt, [1.0, 2.0])
    TrainingHistory(tmp_path, opt, evaluator).attach(trainer)
    trainer.run(range(2), max_epochs=2)
    rows = json.loads((tmp_path / "history.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["val_psnr"] == 2.0 and rows[0]["lr"] == 0.1 and rows[1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_nonfinite_loss_skips_then_raises():
    model = nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()

    def step(engine, batch):
        loss = model(torch.ones(1, 1)).sum() * float("nan")
        optimisation_step(engine, loss, opt, max_nonfinite=2, terms={"l1": float("nan")})

    engine = Engine(step)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps.*learning rate"):
        engine.run(range(5), max_epochs=1)
    assert engine.state.iteration == 2
    assert torch.equal(model.weight.detach(), before)


def test_optimisation_step_clips_and_reports_norm():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = Engine(lambda e, b: None)
    loss = (model(torch.ones(1, 1)) - 100.0).pow(2).sum()  # gradient -200
    norm = optimisation_step(engine, loss, opt, grad_clip=1.0)
    assert norm == pytest.approx(200.0)
    assert float(model.weight) == pytest.approx(1.0, rel=1e-4)  # clipped to unit norm, lr 1


@pytest.mark.parametrize("metric", ["psnr", "ssim", "mae"])
def test_volume_metric_matches_compute_image_metrics(metric):
    torch.manual_seed(1)
    target_hu = torch.rand(2, 1, 16, 16, 16) * 1600 - 900
    pred_hu = target_hu + torch.randn_like(target_hu) * 50
    m = VolumeMetric(metric, window=(-1000, 1000), intensity_range=(-1000, 1000))
    m.reset()
    m.update((scale_hu(pred_hu), scale_hu(target_hu)))
    expected = sum(compute_image_metrics(p, t, window=(-1000, 1000))[metric] for p, t in zip(pred_hu, target_hu)) / 2
    assert m.compute() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="metric must be one of"):
        VolumeMetric("dice")


def test_load_network_weights_errors(tmp_path):
    net = nn.Linear(2, 3)
    with pytest.raises(FileNotFoundError, match="missing.pt.*previous stage"):
        load_network_weights(net, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable"):
        load_network_weights(net, tmp_path / "junk.pt")
    atomic_torch_save({"network": nn.Linear(2, 4).state_dict(), "meta": {"stage": 1}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: weights do not fit"):
        load_network_weights(net, tmp_path / "other.pt")
    atomic_torch_save(nn.Linear(2, 3).state_dict(), tmp_path / "bare.pt")
    assert load_network_weights(net, tmp_path / "bare.pt") == {}


def test_amp_settings_and_trainable_parameters():
    assert amp_settings("cpu", True) == (False, torch.float32, None)
    assert amp_settings("cpu", True, cpu_bf16=True) == (True, torch.bfloat16, None)
    assert amp_settings("cpu", False, cpu_bf16=True) == (False, torch.float32, None)
    net = nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1))
    net[0].requires_grad_(False)
    assert len(trainable_parameters(net)) == 2
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_parameters(net)


def test_gradient_accumulation_steps_once_with_the_mean_gradient():
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 0.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = Engine(lambda e, b: None)
    targets = (10.0, 30.0)  # gradients -20 and -60: mean -40
    norms = [optimisation_step(engine, (model(torch.ones(1, 1)) - t).pow(2).sum(), opt, grad_clip=None, accumulate=2)
             for t in targets]
    assert norms[0] is None and norms[1] == pytest.approx(40.0)
    assert float(model.weight) == pytest.approx(40.0)  # one step with the mean gradient


def test_adversarial_terms_warm_up_and_update_the_discriminator():
    from monai.networks.nets import PatchDiscriminator

    from ctsynth.adversarial import AdversarialTerms

    torch.manual_seed(0)
    d = PatchDiscriminator(spatial_dims=3, num_layers_d=2, channels=4, in_channels=1, out_channels=1)
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="criterion must be one of"):
        AdversarialTerms(d, opt, criterion="wasserstein")
    adv = AdversarialTerms(d, opt, adversarial_weight=0.5, feature_matching_weight=1.0, start=3)
    engine = Engine(lambda e, b: None)
    engine.state.iteration = 2
    assert not adv.active(engine)
    engine.state.iteration = 3
    assert adv.active(engine)
    fake = torch.rand(2, 1, 16, 16, 16, requires_grad=True)
    real = torch.rand(2, 1, 16, 16, 16)
    g, terms = adv.generator_terms(fake, real)
    g.backward()
    assert fake.grad is not None and set(terms) == {"adv", "feature_matching"} and terms["feature_matching"] > 0
    assert all(p.grad is None for p in d.parameters())  # the generator step leaves the discriminator alone
    before = [p.detach().clone() for p in d.parameters()]
    d_loss = adv.discriminator_step(engine, fake.detach(), real)
    assert d_loss > 0 and any(not torch.equal(b, p) for b, p in zip(before, d.parameters()))


def test_triplanar_grid_places_the_central_slices():
    from ctsynth.plots import triplanar_grid

    vol = torch.zeros(4, 6, 8)
    vol[2, :, :] = 1.0  # the sagittal plane x = 2 (x mid of 4)
    grid = triplanar_grid([vol, torch.ones(1, 4, 6, 8)])
    # panels are (height, width) = axial (Y, X), coronal (Z, X), sagittal (Z, Y), padded to (8, 6), centred
    assert grid.shape == (1, 2 * 8, 3 * 6)
    top = grid[0, :8]
    assert float(top[:, 12:18].mean()) == 1.0  # sagittal panel: the whole Y x Z plane x = 2 is lit
    axial, coronal = top[:, 0:6], top[:, 6:12]
    assert float(axial.sum()) == 6.0 and float(axial[1:7, 1 + 2].sum()) == 6.0  # column x = 2, rows y = 0..5
    assert float(coronal.sum()) == 8.0 and float(coronal[:, 1 + 2].sum()) == 8.0
    assert float(grid[0, 8:].max()) == 1.0 and float(grid.min()) == 0.0
    with pytest.raises(ValueError, match="expected 3D volumes"):
        triplanar_grid([torch.zeros(3, 4)])


def test_triplanar_image_handler_writes_tensorboard_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ctsynth.engine import TriplanarImageHandler

    target = torch.rand(1, 1, 8, 8, 8)
    evaluator = Engine(lambda e, b: {"pred": target * 0.5, "label": target})
    TriplanarImageHandler(tmp_path / "tb").attach(evaluator)
    classifier = Engine(lambda e, b: {"pred": torch.zeros(1, 1), "label": torch.zeros(1, 1)})
    TriplanarImageHandler(tmp_path / "tb_cls").attach(classifier)  # logits: nothing to show, no error
    evaluator.run([0], max_epochs=2)
    classifier.run([0], max_epochs=1)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    images = acc.Images("val_triplanar")
    assert [im.step for im in images] == [1, 2] and images[0].width == 24 and images[0].height == 24  # 3 x 3 panels
    assert not (tmp_path / "tb_cls").exists()
