"""EDM's network families with SiDA's return_flag: NCSN++ options of SongUNet, ADM (DhariwalUNet), VP/VE preconditioning.

Expected key names and formulas were derived by reading NVlabs/edm training/networks.py (SongUNet, DhariwalUNet,
VPPrecond, VEPrecond). The exact parameter counts below equal those of EDM's own networks.py built with the same
arguments (checked outside this repository, where the outputs also matched EDM's to max|diff| = 0).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sida_core.networks import (ARCHITECTURES, DhariwalUNet, EDMPrecond, SongUNet, VEPrecond, VPPrecond, build_denoiser,
                                count_parameters)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# EDM train.py presets (--arch=ddpmpp / ncsnpp / adm); augment_dim=9 whenever --augment > 0 (the default 0.12).
DDPMPP = dict(embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
              resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
NCSNPP = dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
ADM = dict(model_channels=192, channel_mult=[1, 2, 3, 4])

NCSN_TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], embedding_type="fourier",
                 channel_mult_noise=2, resample_filter=[1, 3, 3, 1])
# Tiny configs at 8x8 (logit map 4x4). ADM has 64 channels per attention head, so 64 channels at 4x4 give one head.
FAMILIES = {
    "ddpmpp": ("songunet", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
    "ncsnpp-residual": ("songunet", dict(NCSN_TINY, encoder_type="residual", decoder_type="standard")),
    "ncsnpp-skip-skip": ("songunet", dict(NCSN_TINY, encoder_type="skip", decoder_type="skip")),
    "ncsnpp-residual-skip": ("songunet", dict(NCSN_TINY, encoder_type="residual", decoder_type="skip")),
    "adm": ("adm", dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])),
}


def _meta_count(arch, res, label_dim, kwargs):
    with torch.device("meta"):
        return count_parameters(build_denoiser(arch, res, 3, label_dim, kwargs))


def _randomise(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Make zero-initialised layers (ADM's out_conv, conv1, proj) non-trivial so every output carries information."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def _tiny(family, label_dim=0, precond="edm"):
    arch, kw = FAMILIES[family]
    torch.manual_seed(0)
    return _randomise(build_denoiser(arch, 8, 3, label_dim, kw, precond=precond)).eval()


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 8, generator=g), torch.exp(torch.randn(b, generator=g))


# --------------------------------------------------------------------------------------------------
# parameter counts of EDM's released configurations (built on the meta device: no memory)
# --------------------------------------------------------------------------------------------------
def test_cifar10_ddpmpp_count():
    # 55.73M: EDM's reported figure for the CIFAR-10 DDPM++ backbone (as in tests/test_networks.py).
    kw = dict(DDPMPP, num_blocks=4, attn_resolutions=[16], dropout=0.13)
    assert _meta_count("songunet", 32, 0, kw) == 55_732_739
    # EDM trains with --augment 0.12, so its pickles also hold map_augment (9 -> 128, no bias); cond adds map_label.
    assert _meta_count("songunet", 32, 0, dict(kw, augment_dim=9)) == 55_732_739 + 9 * 128
    assert _meta_count("songunet", 32, 10, dict(kw, augment_dim=9)) == 55_732_739 + 9 * 128 + 10 * 128 + 128


def test_cifar10_ncsnpp_count():
    kw = dict(NCSNPP, num_blocks=4, attn_resolutions=[16], dropout=0.13)
    n = _meta_count("songunet", 32, 0, kw)
    # NCSN++ = DDPM++ + a 256-d Fourier noise map into map_layer0 (+128*512) + two aux_residual 3x3 convs:
    # 3 -> 256 at 16x16 and 256 -> 256 at 8x8 (the resample filters and Fourier frequencies are buffers).
    assert n == 55_732_739 + 128 * 512 + (3 * 256 * 9 + 256) + (256 * 256 * 9 + 256) == 56_395_523
    assert 56e6 < n < 63e6          # no published figure for EDM's NCSN++ was found; the count is structural
    assert _meta_count("songunet", 32, 0, dict(kw, augment_dim=9)) == n + 9 * 256


def test_ffhq_afhq_64_ddpmpp_count():
    # EDM README: ffhq/afhqv2-64x64 use --arch=ddpmpp --cres=1,2,2,2 (dropout 0.05/0.25, --augment 0.15).
    kw = dict(DDPMPP, channel_mult=[1, 2, 2, 2], num_blocks=4, attn_resolutions=[16])
    n = _meta_count("songunet", 64, 0, kw)
    assert n == 61_804_419
    assert round(n / 1e6, 2) == 61.80
    assert _meta_count("songunet", 64, 0, dict(kw, augment_dim=9)) == n + 9 * 128


def test_imagenet64_adm_count():
    # EDM README: imagenet-64x64-cond-adm uses --arch=adm --augment=0 (no map_augment), 1000 classes.
    # EDM's paper gives ~296M for this model (figure as quoted in the issue; the paper text was not reachable here).
    n = _meta_count("adm", 64, 1000, ADM)
    assert n == 295_899_267
    assert abs(n - 295.90e6) / 295.90e6 < 0.005
    assert round(n / 1e6, 2) == 295.90
    # map_label is a 1000 -> 768 linear without bias
    assert n - _meta_count("adm", 64, 0, ADM) == 1000 * 768


# --------------------------------------------------------------------------------------------------
# return_flag for every family
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("label_dim", [0, 10])
def test_return_flag_semantics(family, label_dim):
    net = _tiny(family, label_dim)
    x, sigma = _inputs(3)
    labels = torch.eye(10)[[1, 4, 9]] if label_dim else None
    with torch.no_grad():
        d = net(x, sigma, labels, return_flag="decoder")
        logits = net(x, sigma, labels, return_flag="encoder")
        both = net(x, sigma, labels, return_flag="encoder_decoder")
    assert d.shape == x.shape and d.dtype == torch.float32
    assert logits.shape == (3, 1, 4, 4) and logits.dtype == torch.float32   # lowest resolution of an 8x8 two-level net
    assert isinstance(both, tuple) and len(both) == 2
    assert torch.equal(both[0], d) and torch.equal(both[1], logits)
    assert (d - x).abs().max() > 1e-3 and logits.abs().max() > 0
    if label_dim:
        with torch.no_grad():
            d2, l2 = net(x, sigma, torch.eye(10)[[0, 0, 0]], return_flag="encoder_decoder")
        assert not torch.allclose(d2, d) and not torch.allclose(l2, logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_are_channel_mean_of_last_encoder_block(family):
    net = _tiny(family)
    names = list(net.model.enc)
    assert names[-1] == "4x4_block0"     # the aux modules of a level come right after its _down block
    seen = []
    net.model.enc[names[-1]].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    dec_calls = []
    decoder = list(net.model.dec.values()) + [getattr(net.model, n) for n in ("out_norm", "out_conv") if hasattr(net.model, n)]
    for mod in decoder:
        mod.register_forward_hook(lambda m, i, o: dec_calls.append(m))
    x, sigma = _inputs(2)
    with torch.no_grad():
        logits = net(x, sigma, return_flag="encoder")
    assert len(seen) == 1 and dec_calls == []            # decoder skipped
    torch.testing.assert_close(logits, seen[0].float().mean(dim=1, keepdim=True), rtol=0, atol=0)
    with torch.no_grad():
        net(x, sigma, return_flag="encoder_decoder")
    assert len(dec_calls) == len(decoder)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encoder_gradient_reaches_input(family):
    net = _tiny(family).requires_grad_(False)    # psi frozen: gradient only through the input (generator step)
    x, sigma = _inputs(2)
    x.requires_grad_(True)
    logits = net(x, sigma, return_flag="encoder")
    logits[1].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().sum() > 0
    assert x.grad[0].abs().max() == 0            # eval mode: per-sample independence


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_fp32_for_bf16_input(family):
    net = _tiny(family)
    x, sigma = _inputs(2)
    with torch.no_grad():
        d, logits = net(x.bfloat16(), sigma, return_flag="encoder_decoder")
    assert d.dtype == torch.bfloat16 and logits.dtype == torch.float32 and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------------------
# EDM state-dict key names (read off NVlabs/edm training/networks.py for these tiny configs)
# --------------------------------------------------------------------------------------------------
def _block(prefix, skip=False, skip_weight=True, resample=False, attn=False):
    """Keys of an EDM UNetBlock: conv0/skip carry a resample_filter buffer when up/down; a kernel-0 skip has no weight."""
    keys = [f"{prefix}.{m}.{p}" for m in ("norm0", "conv0", "affine", "norm1", "conv1") for p in ("weight", "bias")]
    if resample:
        keys.append(f"{prefix}.conv0.resample_filter")
    if skip:
        keys += [f"{prefix}.skip.weight", f"{prefix}.skip.bias"] if skip_weight else []
        keys += [f"{prefix}.skip.resample_filter"] if resample else []
    if attn:
        keys += [f"{prefix}.{m}.{p}" for m in ("norm2", "qkv", "proj") for p in ("weight", "bias")]
    return keys


def _wb(prefix):
    return [f"{prefix}.weight", f"{prefix}.bias"]


def test_adm_state_dict_keys():
    torch.manual_seed(0)
    net = build_denoiser("adm", 8, 3, 10, dict(FAMILIES["adm"][1], augment_dim=9))
    m = "model."
    expected = [m + "map_augment.weight", *_wb(m + "map_layer0"), *_wb(m + "map_layer1"), m + "map_label.weight",
                *_wb(m + "enc.8x8_conv"),
                *_block(m + "enc.8x8_block0"),                                       # 32 -> 32, 32 channels: no head
                *_block(m + "enc.4x4_down", skip=True, skip_weight=False, resample=True),   # kernel-0 skip (no resample_proj)
                *_block(m + "enc.4x4_block0", skip=True, attn=True),                 # 32 -> 64, one head
                *_block(m + "dec.4x4_in0", attn=True), *_block(m + "dec.4x4_in1"),
                *_block(m + "dec.4x4_block0", skip=True, attn=True), *_block(m + "dec.4x4_block1", skip=True, attn=True),
                *_block(m + "dec.8x8_up", skip=True, skip_weight=False, resample=True),
                *_block(m + "dec.8x8_block0", skip=True), *_block(m + "dec.8x8_block1", skip=True),
                *_wb(m + "out_norm"), *_wb(m + "out_conv")]
    assert len(expected) == len(set(expected))
    assert set(net.state_dict()) == set(expected)
    sd = net.state_dict()
    assert sd[m + "map_label.weight"].shape == (128, 10)       # no bias, into the embedding after map_layer1
    assert sd[m + "map_layer0.weight"].shape == (128, 32)      # positional embedding of model_channels
    assert sd[m + "enc.4x4_block0.affine.weight"].shape == (2 * 64, 128)   # adaptive scale: scale and shift
    assert sd[m + "enc.4x4_block0.qkv.weight"].shape == (192, 64, 1, 1)
    assert sd[m + "out_conv.weight"].shape == (3, 32, 3, 3)


@pytest.mark.parametrize("encoder_type, decoder_type", [("residual", "standard"), ("skip", "skip")])
def test_ncsnpp_state_dict_keys_and_aux_shapes(encoder_type, decoder_type):
    torch.manual_seed(0)
    net = build_denoiser("songunet", 8, 3, 10, dict(NCSN_TINY, augment_dim=9, encoder_type=encoder_type,
                                                    decoder_type=decoder_type))
    m = "model."
    enc_aux = ([*_wb(m + "enc.4x4_aux_residual"), m + "enc.4x4_aux_residual.resample_filter"] if encoder_type == "residual"
               else [m + "enc.4x4_aux_down.resample_filter", *_wb(m + "enc.4x4_aux_skip")])
    dec_aux = ([*_wb(m + "dec.4x4_aux_norm"), *_wb(m + "dec.4x4_aux_conv"), m + "dec.8x8_aux_up.resample_filter"]
               if decoder_type == "skip" else [])
    expected = [m + "map_noise.freqs", *_wb(m + "map_label"), m + "map_augment.weight", *_wb(m + "map_layer0"),
                *_wb(m + "map_layer1"), *_wb(m + "enc.8x8_conv"), *_block(m + "enc.8x8_block0"),
                *_block(m + "enc.4x4_down", skip=True, resample=True),             # resample_proj: 1x1 skip
                *enc_aux,
                *_block(m + "enc.4x4_block0", skip=True, attn=True),
                *_block(m + "dec.4x4_in0", attn=True), *_block(m + "dec.4x4_in1"),
                *_block(m + "dec.4x4_block0", skip=True), *_block(m + "dec.4x4_block1", skip=True, attn=True),
                *dec_aux,
                *_block(m + "dec.8x8_up", skip=True, resample=True),
                *_block(m + "dec.8x8_block0", skip=True), *_block(m + "dec.8x8_block1", skip=True),
                *_wb(m + "dec.8x8_aux_norm"), *_wb(m + "dec.8x8_aux_conv")]
    assert len(expected) == len(set(expected))
    assert set(net.state_dict()) == set(expected)
    sd = net.state_dict()
    assert sd[m + "map_noise.freqs"].shape == (16,)              # 2 * 16 noise channels, half of them frequencies
    assert sd[m + "map_layer0.weight"].shape == (64, 32)
    assert sd[m + "enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 4, 4)
    torch.testing.assert_close(sd[m + "enc.4x4_down.conv0.resample_filter"][0, 0],
                               torch.tensor([1.0, 3, 3, 1]).outer(torch.tensor([1.0, 3, 3, 1])) / 64)
    if encoder_type == "residual":
        assert sd[m + "enc.4x4_aux_residual.weight"].shape == (16, 3, 3, 3)   # image channels -> level-1 channels
    else:
        assert sd[m + "enc.4x4_aux_skip.weight"].shape == (16, 3, 1, 1)
    if decoder_type == "skip":
        assert sd[m + "dec.4x4_aux_conv.weight"].shape == (3, 32, 3, 3)


def test_ddpmpp_defaults_unchanged_by_new_options():
    """Explicit DDPM++ options build the same net (same init stream, same keys) as the defaults."""
    kw = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    torch.manual_seed(0)
    a = SongUNet(8, 3, 3, **kw)
    torch.manual_seed(0)
    b = SongUNet(8, 3, 3, **kw, embedding_type="positional", encoder_type="standard", decoder_type="standard",
                 channel_mult_noise=1, resample_filter=[1, 1])
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any("aux" in k for k in sa if ".enc." in k or k.startswith("enc."))


@pytest.mark.parametrize("bad", [dict(encoder_type="progressive"), dict(decoder_type="residual"),
                                 dict(embedding_type="sinusoidal")])
def test_songunet_rejects_unknown_types(bad):
    with pytest.raises(ValueError):
        SongUNet(8, 3, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, **bad)


def test_adm_no_attention_below_64_channels_like_edm():
    net = DhariwalUNet(8, 3, 3, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4])
    assert all(b.num_heads == 0 for b in list(net.enc.values())[1:] + list(net.dec.values()))
    net = DhariwalUNet(8, 3, 3, model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    assert net.enc["4x4_block0"].num_heads == 2 and net.enc["8x8_block0"].num_heads == 0


# --------------------------------------------------------------------------------------------------
# VP / VE preconditioning (EDM's formulas) and the factory
# --------------------------------------------------------------------------------------------------
class Stub(nn.Module):
    """F = 2 x + c_noise; logits = channel mean of the input; records what the wrapper passed."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, return_flag="decoder"):
        self.calls.append(dict(x=x.detach().clone(), noise=noise_labels.detach().clone(), flag=return_flag))
        f = 2 * x + noise_labels.reshape(-1, 1, 1, 1).to(x.dtype)
        logits = x.float().mean(dim=1, keepdim=True)
        return {"decoder": f, "encoder": logits, "encoder_decoder": (f, logits)}[return_flag]


SIGMAS = [0.002, 0.5, 2.0, 80.0]


def _vp_t(s, beta_d=19.9, beta_min=0.1):
    """Inverse of sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1): solve beta_d/2 t^2 + beta_min t = ln(1 + s^2)."""
    return (-beta_min + math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + s * s))) / beta_d


@pytest.mark.parametrize("beta_d, beta_min, M", [(19.9, 0.1, 1000), (10.0, 0.5, 500)])
def test_vpprecond_coefficients(beta_d, beta_min, M):
    stub = Stub()
    net = VPPrecond(stub, img_resolution=2, img_channels=1, beta_d=beta_d, beta_min=beta_min, M=M)
    x = torch.linspace(-2, 2, len(SIGMAS) * 4, dtype=torch.float64).reshape(len(SIGMAS), 1, 2, 2)
    out = net(x, torch.tensor(SIGMAS))
    call = stub.calls[0]
    for b, s in enumerate(SIGMAS):
        c_in, c_noise = 1 / math.sqrt(s * s + 1), (M - 1) * _vp_t(s, beta_d, beta_min)
        # EDM evaluates t(s) in float32 via log(1 + s^2), as done here to keep a teacher's bits: at s = 0.002 that
        # loses ~1.3% of t against this float64 reference; elsewhere it is exact to float32 rounding.
        assert call["noise"][b].item() == pytest.approx(c_noise, rel=1e-5 if s >= 0.1 else 2e-2)
        torch.testing.assert_close(call["x"][b], x[b] * c_in, rtol=1e-6, atol=1e-9)
        # D = c_skip x + c_out F with c_skip = 1, c_out = -sigma
        torch.testing.assert_close(out[b], x[b] - s * (2 * c_in * x[b] + call["noise"][b].double()), rtol=1e-6, atol=1e-6)
    # schedule ends: sigma(epsilon_t) and sigma(1), and sigma_inv inverts sigma
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * beta_d + beta_min) - 1), rel=1e-5)
    # float32, as EDM: exp(~1e-6) - 1 keeps few significant bits
    assert net.sigma_min == pytest.approx(math.sqrt(math.exp(0.5 * beta_d * 1e-10 + beta_min * 1e-5) - 1), rel=3e-2)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t)


def test_vpprecond_default_sigma_range():
    net = VPPrecond(Stub(), 2, 1)
    assert (net.beta_d, net.beta_min, net.M, net.epsilon_t) == (19.9, 0.1, 1000, 1e-5)
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(10.05) - 1), rel=1e-6) == pytest.approx(152.167, abs=1e-3)
    assert net.sigma_min == 0.0009765625      # sqrt(float32(exp(1e-6)) - 1) = 2^-10, the value EDM's float32 code gives


def test_veprecond_coefficients():
    stub = Stub()
    net = VEPrecond(stub, img_resolution=2, img_channels=1)
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)
    x = torch.linspace(-2, 2, len(SIGMAS) * 4).reshape(len(SIGMAS), 1, 2, 2)
    out = net(x, torch.tensor(SIGMAS))
    call = stub.calls[0]
    for b, s in enumerate(SIGMAS):
        assert call["noise"][b].item() == pytest.approx(math.log(0.5 * s), rel=1e-6)
        assert torch.equal(call["x"][b], x[b])                                   # c_in = 1
        torch.testing.assert_close(out[b], x[b] + s * (2 * x[b] + math.log(0.5 * s)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [VPPrecond, VEPrecond, EDMPrecond])
def test_precond_return_flag_passthrough(cls):
    stub = Stub()
    net = cls(stub, img_resolution=2, img_channels=1, label_dim=0)
    x = torch.randn(2, 1, 2, 2)
    d = net(x, 1.5)
    logits = net(x, 1.5, return_flag="encoder")
    d2, l2 = net(x, 1.5, return_flag="encoder_decoder")
    assert [c["flag"] for c in stub.calls] == ["decoder", "encoder", "encoder_decoder"]
    assert torch.equal(d2, d) and torch.equal(l2, logits)
    torch.testing.assert_close(logits, stub.calls[1]["x"].mean(dim=1, keepdim=True))   # backbone logits unchanged
    with pytest.raises(ValueError):
        net(x, 1.5, return_flag="disc")
    assert count_parameters(net) == 0


def test_build_denoiser_precond_choice():
    kw = FAMILIES["ddpmpp"][1]
    assert "adm" in ARCHITECTURES and ARCHITECTURES["adm"] is DhariwalUNet
    assert type(build_denoiser("songunet", 8, 3, 0, kw)) is EDMPrecond
    vp = build_denoiser("songunet", 8, 3, 0, kw, precond="vp", precond_kwargs=dict(beta_d=10.0, M=500))
    assert type(vp) is VPPrecond and (vp.beta_d, vp.beta_min, vp.M) == (10.0, 0.1, 500)
    ve = build_denoiser("adm", 8, 3, 10, FAMILIES["adm"][1], precond="ve", precond_kwargs=dict(sigma_max=80.0))
    assert type(ve) is VEPrecond and ve.sigma_max == 80.0 and isinstance(ve.model, DhariwalUNet)
    assert type(build_denoiser("songunet", 8, 3, 0, kw, precond_kwargs=dict(sigma_data=0.6))) is EDMPrecond
    with pytest.raises(ValueError, match="precond"):
        build_denoiser("songunet", 8, 3, 0, kw, precond="iddpm")


@pytest.mark.parametrize("precond", ["vp", "ve"])
def test_baseline_preconds_with_real_backbones(precond):
    for family in ("ncsnpp-residual", "adm"):
        net = _tiny(family, label_dim=10, precond=precond)
        x, sigma = _inputs(2)
        labels = torch.eye(10)[[3, 5]]
        with torch.no_grad():
            d, logits = net(x, sigma, labels, return_flag="encoder_decoder")
            assert torch.equal(net(x, sigma, labels), d) and torch.equal(net(x, sigma, labels, return_flag="encoder"), logits)
        assert d.shape == x.shape and logits.shape == (2, 1, 4, 4)
