"""MAISI autoencoder: released layout, loading errors, normalisation, chunked encode/decode of any depth."""

import pytest
import torch

from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from ctsynth.maisi import (MAISI_AUTOENCODER_ARGS, LatentCodec, autoencoder_downsample, build_maisi_autoencoder,
                           ct_to_unit, load_maisi_autoencoder, unit_to_ct)

SMALL = {"num_channels": [8, 16, 32], "norm_num_groups": 4, "num_splits": 1}
SMALL_2X = {"num_channels": [8, 16], "norm_num_groups": 4, "num_splits": 1}  # two levels: one halving


def test_released_architecture_size():
    net = build_maisi_autoencoder()
    assert sum(p.numel() for p in net.parameters()) == 20_944_897
    assert len(net.state_dict()) == 130


def test_small_weights_in_the_released_key_layout_load(tmp_path):
    torch.manual_seed(0)
    src = build_maisi_autoencoder(**SMALL)
    assert list(src.state_dict()) == list(build_maisi_autoencoder().state_dict())  # same keys as the release
    torch.save(src.state_dict(), tmp_path / "ae.pt")
    net = load_maisi_autoencoder(tmp_path / "ae.pt", **SMALL)
    assert net.loaded_tensors == (130, 130) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k], v)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "wrapped.pt")
    assert load_maisi_autoencoder(tmp_path / "wrapped.pt", **SMALL).loaded_tensors == (130, 130)
    # files written by ctsynth's training record their constructor arguments: no overrides needed
    torch.save({"network": src.state_dict(), "meta": {"network_config": src.config}}, tmp_path / "trained.pt")
    assert src.config == SMALL and load_maisi_autoencoder(tmp_path / "trained.pt").loaded_tensors == (130, 130)


def test_loading_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="maisi_ct_generative"):
        load_maisi_autoencoder(tmp_path / "missing.pt")
    sd = build_maisi_autoencoder(**SMALL).state_dict()
    dropped = next(iter(sd))
    bad = {k: v for k, v in sd.items() if k != dropped}
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=f"1 missing keys \\['{dropped}'\\], 1 unexpected keys \\['extra.weight'\\]"):
        load_maisi_autoencoder(tmp_path / "bad.pt", **SMALL)
    torch.save(sd, tmp_path / "small.pt")
    with pytest.raises(ValueError, match="differ in shape"):
        load_maisi_autoencoder(tmp_path / "small.pt", num_channels=[16, 32, 64], norm_num_groups=4)
    with pytest.raises(ValueError, match="unknown MAISI autoencoder arguments"):
        build_maisi_autoencoder(channels=3)


def test_normalisation_round_trip():
    hu = torch.tensor([-3000.0, -1000.0, -400.0, 0.0, 250.0, 1000.0, 2500.0])
    unit = ct_to_unit(hu)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
    assert torch.allclose(unit_to_ct(unit), hu.clamp(-1000, 1000))
    assert float(ct_to_unit(torch.tensor(0.0))) == pytest.approx(0.5)


@pytest.mark.parametrize("args,factor,depth", [(SMALL, 4, 37), (SMALL, 4, 40), (SMALL, 4, 9), (SMALL_2X, 2, 37),
                                               (SMALL_2X, 2, 9)])
def test_latent_shapes_for_odd_depths_and_crop_back(args, factor, depth):
    torch.manual_seed(0)
    codec = LatentCodec(build_maisi_autoencoder(**args).eval(), chunk=16, overlap=0.25)
    assert codec.downsample == factor
    vol = torch.rand(1, 1, 18, 20, depth)
    z = codec.encode(vol)
    assert z.shape == (1, 4, -(-18 // factor), -(-20 // factor), -(-depth // factor))
    out = codec.decode(z, vol.shape[-3:])
    assert out.shape == vol.shape


@pytest.mark.parametrize("levels,factor", [(2, 2), (3, 4), (4, 8)])
def test_compression_follows_the_number_of_levels(levels, factor):
    built = build_maisi_autoencoder(num_channels=[4] * levels, norm_num_groups=4, num_splits=1)
    assert built.downsample == factor and len(built.encoder.blocks) > 0
    # a network built without ctsynth (no `downsample` attribute): counted from its encoder's halvings
    plain = AutoencoderKlMaisi(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                               num_channels=[4] * levels, num_res_blocks=[1] * levels, norm_num_groups=4,
                               attention_levels=[False] * levels, with_encoder_nonlocal_attn=False,
                               with_decoder_nonlocal_attn=False, norm_float16=False, num_splits=1)
    assert autoencoder_downsample(plain) == factor
    with torch.no_grad():
        assert plain.encode(torch.rand(1, 1, 16, 16, 16))[0].shape[-1] == 16 // factor


def test_compression_errors_say_what_to_set():
    with pytest.raises(ValueError, match="num_res_blocks \\[1, 1, 1\\] has 3 levels but num_channels \\[8, 16\\] has 2"):
        build_maisi_autoencoder(num_channels=[8, 16], num_res_blocks=[1, 1, 1])
    with pytest.raises(ValueError, match="set `autoencoder.downsample`"):
        autoencoder_downsample(torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="multiples of 2 \\(the autoencoder's compression"):
        LatentCodec(build_maisi_autoencoder(**SMALL_2X), chunk=9)


def test_windowed_coding_equals_one_pass_when_one_window_covers_and_converges_with_overlap():
    from ctsynth.phantoms import thorax_phantom

    torch.manual_seed(0)
    ae = build_maisi_autoencoder(**SMALL).eval()
    vol, _ = thorax_phantom((32, 32, 96), (8.0, 8.0, 2.0), seed=1)
    x = ct_to_unit(vol.as_tensor())[None]
    with torch.no_grad():
        whole = ae.encode(x)[0]
    assert torch.allclose(LatentCodec(ae, chunk=96).encode(x), whole, atol=1e-5)

    def rel_err(chunk, overlap):
        return float((LatentCodec(ae, chunk=chunk, overlap=overlap).encode(x) - whole).abs().mean() / whole.abs().mean())

    # per-window group-norm statistics: the gap shrinks with bigger windows and more overlap
    assert rel_err(16, 0.5) < rel_err(16, 0.0)
    assert rel_err(48, 0.5) < rel_err(32, 0.5) < rel_err(16, 0.5)
    with torch.no_grad():
        dec_whole = ae.decode(whole)
    assert torch.allclose(LatentCodec(ae, chunk=96).decode(whole), dec_whole, atol=1e-5)


def test_scale_factor_and_errors():
    torch.manual_seed(0)
    codec = LatentCodec(build_maisi_autoencoder(**SMALL).eval(), chunk=8, overlap=0.5)
    vols = [torch.rand(1, 1, 8, 8, 8) for _ in range(2)]
    sf = codec.estimate_scale_factor(vols)
    assert float(torch.cat([codec.encode(v).flatten() for v in vols]).std()) == pytest.approx(1.0, rel=1e-3)
    assert sf == codec.scale_factor
    with pytest.raises(ValueError, match="multiples of 4"):
        LatentCodec(codec.ae, chunk=10)
    with pytest.raises(ValueError, match="fraction"):
        LatentCodec(codec.ae, overlap=2)
    with pytest.raises(ValueError, match="B, 1, X, Y, Z"):
        codec.encode(torch.rand(8, 8, 8))
    assert MAISI_AUTOENCODER_ARGS["latent_channels"] == 4


def test_cli_bench_maisi_small(tmp_path, capsys):
    import json

    from ctsynth.cli import main

    main(["bench", "maisi", "--small", "--depths", "16", "48", "--in_plane", "16", "--chunk", "16",
          "--out", str(tmp_path / "m.json")])
    res = json.loads(capsys.readouterr().out)
    assert [r["depth"] for r in res["runs"]] == [16, 48]
    assert res["runs"][1]["latent_shape"] == [1, 4, 4, 4, 12] and res["runs"][1]["output_shape"] == [1, 1, 16, 16, 48]
    assert res["peak_growth_ratio"] >= 1.0 and json.loads((tmp_path / "m.json").read_text())["benchmark"] == "maisi_codec"


def test_too_small_windows_for_tensor_splitting_say_what_to_do():
    ae = build_maisi_autoencoder(num_channels=[8, 16, 32], norm_num_groups=4, num_splits=8).eval()
    with pytest.raises(ValueError, match="num_splits=1"):
        LatentCodec(ae, chunk=8).encode(torch.rand(1, 1, 16, 16, 8))
