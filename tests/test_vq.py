"""Codebook: dead-code restart and usage / perplexity statistics."""

import math

import pytest
import torch

from ctsynth.vq import RestartingEMAQuantizer, codebook_perplexity, codebook_usage


@pytest.mark.parametrize("indices,n,usage,perplexity", [
    ([0, 0, 1, 1], 4, 0.5, 2.0),
    ([3, 3, 3, 3], 4, 0.25, 1.0),
    ([0, 1, 2, 3], 4, 1.0, 4.0),
    ([0, 0, 0, 1], 8, 0.25, math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))),
])
def test_usage_and_perplexity_on_constructed_indices(indices, n, usage, perplexity):
    idx = torch.tensor(indices).view(1, 2, 2)
    assert codebook_usage(idx, n) == pytest.approx(usage)
    assert codebook_perplexity(idx, n) == pytest.approx(perplexity)


def test_statistics_reject_bad_indices():
    with pytest.raises(ValueError, match=r"must lie in \[0, 4\)"):
        codebook_usage(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="no code indices"):
        codebook_perplexity(torch.tensor([], dtype=torch.long), 4)


def _data(g, n=4):
    # encoder outputs around 8 well separated centres
    centres = torch.randn(8, 4, generator=g) * 4
    pick = torch.randint(0, 8, (n, 4, 4, 4), generator=g)
    return (centres[pick] + 0.05 * torch.randn(n, 4, 4, 4, 4, generator=g)).permute(0, 4, 1, 2, 3).contiguous()


def _train(restart_threshold):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    q = RestartingEMAQuantizer(3, num_embeddings=16, embedding_dim=4, restart_threshold=restart_threshold)
    with torch.no_grad():  # every code far from the data but one, and unused: without restarts they never move
        q.embedding.weight.data[:] = 100.0 + torch.arange(16.0)[:, None]
        q.embedding.weight.data[0] = 0.0
        q.ema_w.copy_(q.embedding.weight.data)
        q.ema_cluster_size.fill_(0.0)
        q.ema_cluster_size[0] = 1.0
    q.train()
    for _ in range(300):
        q(_data(g))
    q.eval()
    _, loss, idx = q(_data(g, 8))
    return int(q.restarts), codebook_usage(idx, 16), float(loss)


def test_restart_revives_dead_codes():
    restarts, usage, loss = _train(0.5)
    restarts_off, usage_off, loss_off = _train(0.0)
    assert restarts_off == 0 and usage_off == pytest.approx(1 / 16)  # collapsed onto the one live code
    assert restarts >= 15 and usage >= 0.3  # every dead code was re-seeded on the data and is used
    assert loss < 0.5 * loss_off  # and the encoder outputs are quantised far more closely


def test_quantizer_checks_its_input():
    q = RestartingEMAQuantizer(3, 8, 4)
    with pytest.raises(ValueError, match=r"expected \(B, 4"):
        q(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(ValueError, match="restart_threshold"):
        RestartingEMAQuantizer(3, 8, 4, restart_threshold=-1)
