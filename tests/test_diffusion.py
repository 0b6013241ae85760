"""ctsynth.diffusion: training targets and their inversion, for every prediction type."""

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from ctsynth.diffusion import PREDICTION_TYPES, diffusion_target, predicted_original


def _scheduler(kind):
    return DDPMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0195,
                         prediction_type=kind, clip_sample=False)


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_predicted_original_inverts_each_training_target(kind):
    sched = _scheduler(kind)
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(3, 4, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    noisy = sched.add_noise(z0, noise, t)
    target = diffusion_target(sched, z0, noise, t)
    assert torch.allclose(predicted_original(sched, noisy, target, t), z0, atol=2e-3)


@pytest.mark.parametrize("kind, expected", [("epsilon", "noise"), ("sample", "clean")])
def test_target_is_the_noise_or_the_clean_latents(kind, expected):
    z0, noise = torch.zeros(1, 2, 2, 2, 2), torch.ones(1, 2, 2, 2, 2)
    out = diffusion_target(_scheduler(kind), z0, noise, torch.tensor([10]))
    assert torch.equal(out, {"noise": noise, "clean": z0}[expected])


def test_unknown_prediction_type_is_named():
    sched = _scheduler("epsilon")
    sched.prediction_type = "x0"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        diffusion_target(sched, torch.zeros(1), torch.zeros(1), torch.tensor([0]))
