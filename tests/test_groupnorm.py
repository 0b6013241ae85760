"""ctsynth.groupnorm: whole-volume GroupNorm statistics measured window by window."""

import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

from ctsynth.groupnorm import GroupNormCalibration, window_cores


@pytest.mark.parametrize("shape, roi, interval, multiple", [
    ((64, 64, 64), (48, 48, 48), (36, 36, 36), 4),
    ((96, 80, 40), (64, 32, 40), (48, 24, 40), 8),
    ((50, 33, 20), (20, 16, 20), (15, 12, 20), 1),
    ((32, 32, 32), (32, 32, 32), (32, 32, 32), 8),
])
def test_cores_cover_the_volume_once(shape, roi, interval, multiple):
    windows = dense_patch_slices(shape, roi, interval)
    count = torch.zeros(shape, dtype=torch.int32)
    for win, core in zip(windows, window_cores(windows, shape, multiple)):
        count[tuple(slice(w.start + c.start, w.start + c.stop) for w, c in zip(win, core))] += 1
        assert all(0 <= c.start <= c.stop <= w.stop - w.start for w, c in zip(win, core))
    assert int(count.min()) == 1 and int(count.max()) == 1


def _pointwise_net() -> nn.Module:
    # no spatial context: a window computes what the whole volume computes, except for the normalisation
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 8, 1), nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv3d(8, 8, 1), nn.GroupNorm(2, 8),
                        nn.SiLU(), nn.Conv3d(8, 1, 1))
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    return net.eval()


def test_windows_with_volume_statistics_compute_the_whole_volume_pass():
    net = _pointwise_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 24, 20, 16, generator=g) * torch.linspace(0.2, 3.0, 16) + torch.linspace(-2, 2, 24)[:, None, None]
    roi, interval = (12, 12, 8), (9, 8, 6)
    windows = dense_patch_slices(x.shape[2:], roi, interval)
    with torch.no_grad():
        whole = net(x)

        def windowed() -> torch.Tensor:
            return sliding_window_inference(x, roi, 1, net, overlap=0.25, mode="gaussian")

        own = windowed()
        cal = GroupNormCalibration(net).calibrate(x, windows, net)
        with cal.applied():
            calibrated = windowed()
    assert len(cal.stats) == 2 and all(v.shape == (4,) for v in next(iter(cal.stats.values())))
    assert (own - whole).abs().max() > 0.05  # each window's own statistics: visibly different
    assert torch.allclose(calibrated, whole, atol=1e-5)
    # the statistics are the whole volume's: GroupNorm's own over the first layer's input
    first = net[0](x).reshape(1, 4, -1)
    mean, var = cal.stats[net[1]]
    assert torch.allclose(mean.float(), first.mean((0, 2)), atol=1e-5)
    assert torch.allclose(var.float(), first.var((0, 2), unbiased=False), atol=1e-4)
    # outside the context the layers are GroupNorm again
    assert torch.equal(net(x), whole)


def test_calibration_errors():
    with pytest.raises(ValueError, match="no GroupNorm layers"):
        GroupNormCalibration(nn.Conv3d(1, 1, 1))
    net = _pointwise_net()
    cal = GroupNormCalibration(net)
    with pytest.raises(RuntimeError, match=r"before calibrate\(\)"):
        with cal.applied():
            pass
    x = torch.randn(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match=r"one volume at a time: expected \(1, C, ...\), got \(2, 1, 8, 8, 8\)"):
        cal.calibrate(x, dense_patch_slices((8, 8, 8), (8, 8, 8), (8, 8, 8)), net)
    cal.calibrate(x[:1], dense_patch_slices((8, 8, 8), (4, 8, 8), (4, 8, 8)), net)
    extra = nn.GroupNorm(1, 1)  # a layer the calibration never saw run
    wrapped = GroupNormCalibration(nn.Sequential(net, extra)).calibrate(
        x[:1], dense_patch_slices((8, 8, 8), (4, 8, 8), (4, 8, 8)), net)
    assert len(wrapped.stats) == 2
    with wrapped.applied(), pytest.raises(RuntimeError, match="without calibrated statistics"):
        extra(x[:1])
