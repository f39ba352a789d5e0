"""Independent checks of sida_core/networks (SPEC.md "Networks"; SiDA paper section 4, return_flag)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sida_core.networks import EDMPrecond, SongUNet, build_denoiser, count_parameters

@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny CPU convolutions are dominated by OpenMP hand-off on a shared 2-core box: run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL_8 = dict(model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[4])
SMALL_16 = dict(model_channels=16, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[8])
CIFAR = dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16])


def _randomise(net: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Make zero-initialised output layers non-trivial so decoder outputs carry information."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def _small(res=8, cfg=SMALL_8, label_dim=0, seed=0, channels=3):
    torch.manual_seed(seed)
    return _randomise(build_denoiser("songunet", res, channels, label_dim, cfg), seed).eval()


def _inputs(b=2, c=3, res=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, res, res, generator=g), torch.exp(torch.randn(b, generator=g))


# --------------------------------------------------------------------------------------------------
# return_flag shapes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("res, cfg, map_res", [(8, SMALL_8, 2), (16, SMALL_16, 8)])
@pytest.mark.parametrize("label_dim", [0, 10])
def test_songunet_return_flag_shapes(res, cfg, map_res, label_dim):
    net = _small(res, cfg, label_dim)
    x, sigma = _inputs(3, 3, res)
    labels = torch.eye(10)[[1, 4, 9]] if label_dim else None
    with torch.no_grad():
        d = net(x, sigma, labels, return_flag="decoder")
        l = net(x, sigma, labels, return_flag="encoder")
        both = net(x, sigma, labels, return_flag="encoder_decoder")
    assert d.shape == x.shape
    assert l.shape == (3, 1, map_res, map_res) and l.dtype == torch.float32
    assert isinstance(both, tuple) and len(both) == 2
    assert both[0].shape == x.shape and both[1].shape == (3, 1, map_res, map_res)
    # default flag is the decoder
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, labels), d)


def test_songunet_conditional_uses_labels():
    net = _small(8, SMALL_8, label_dim=10)
    x, sigma = _inputs(2, 3, 8)
    with torch.no_grad():
        a = net(x, sigma, torch.eye(10)[[0, 0]], return_flag="encoder_decoder")
        b = net(x, sigma, torch.eye(10)[[5, 5]], return_flag="encoder_decoder")
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])


@pytest.mark.parametrize("label_dim", [0, 4])
def test_mlpnet_return_flag_shapes(label_dim):
    torch.manual_seed(0)
    net = _randomise(build_denoiser("mlp", 4, 2, label_dim, dict(hidden=32, emb_channels=16))).eval()
    x, sigma = _inputs(5, 2, 4)
    labels = torch.eye(4)[[0, 1, 2, 3, 0]] if label_dim else None
    with torch.no_grad():
        d = net(x, sigma, labels, return_flag="decoder")
        l = net(x, sigma, labels, return_flag="encoder")
        d2, l2 = net(x, sigma, labels, return_flag="encoder_decoder")
    assert d.shape == (5, 2, 4, 4)
    assert l.shape == (5, 1, 1, 1) and l.dtype == torch.float32
    torch.testing.assert_close(d2, d, rtol=0, atol=0)
    torch.testing.assert_close(l2, l, rtol=0, atol=0)


def test_mlpnet_logits_are_channel_mean_of_last_encoder_features():
    torch.manual_seed(0)
    net = _randomise(build_denoiser("mlp", 4, 2, 0, dict(hidden=32, emb_channels=16))).eval()
    seen = []
    net.model.enc[-1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x, sigma = _inputs(3, 2, 4)
    with torch.no_grad():
        l = net(x, sigma, return_flag="encoder")
    h = torch.nn.functional.silu(seen[-1])     # the encoder's hidden feature vector after its activation
    torch.testing.assert_close(l.reshape(-1), h.float().mean(dim=1))


# --------------------------------------------------------------------------------------------------
# encoder / encoder_decoder semantics
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dim", [0, 10])
def test_encoder_decoder_matches_separate_calls(label_dim):
    net = _small(8, SMALL_8, label_dim)
    x, sigma = _inputs(2, 3, 8)
    labels = torch.eye(10)[[2, 7]] if label_dim else None
    with torch.no_grad():
        d = net(x, sigma, labels, return_flag="decoder")
        l = net(x, sigma, labels, return_flag="encoder")
        d2, l2 = net(x, sigma, labels, return_flag="encoder_decoder")
    assert d.abs().max() > 1e-3  # non-trivial decoder output (weights randomised)
    torch.testing.assert_close(d2, d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l2, l, rtol=1e-6, atol=1e-6)


def test_logits_are_fp32_channel_mean_of_last_encoder_block():
    net = _small(8, SMALL_8)
    last = list(net.model.enc.values())[-1]
    seen = []
    last.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    x, sigma = _inputs(2, 3, 8)
    with torch.no_grad():
        l = net(x, sigma, return_flag="encoder")
    assert len(seen) == 1
    feat = seen[0]
    assert feat.shape[-2:] == (2, 2) and feat.shape[1] == 32   # lowest resolution, 16*2 channels
    ref = torch.zeros(2, 1, 2, 2)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                ref[b, 0, i, j] = sum(feat[b, c, i, j].item() for c in range(feat.shape[1])) / feat.shape[1]
    torch.testing.assert_close(l, ref, rtol=1e-5, atol=1e-6)
    # encoder_decoder's logits come from the same block output
    seen.clear()
    with torch.no_grad():
        _, l2 = net(x, sigma, return_flag="encoder_decoder")
    torch.testing.assert_close(l2, seen[0].float().mean(dim=1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_logits_are_fp32_for_other_input_dtypes(dtype):
    net = _small(8, SMALL_8)
    x, sigma = _inputs(2, 3, 8)
    with torch.no_grad():
        l = net(x.to(dtype), sigma, return_flag="encoder")
        d, l2 = net(x.to(dtype), sigma, return_flag="encoder_decoder")
    assert l.dtype == torch.float32 and l2.dtype == torch.float32
    assert d.dtype == dtype


def test_encoder_does_not_run_decoder():
    net = _small(8, SMALL_8)
    calls = []
    for name, mod in net.model.dec.items():
        mod.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    x, sigma = _inputs(2, 3, 8)
    with torch.no_grad():
        net(x, sigma, return_flag="encoder")
    assert calls == []
    with torch.no_grad():
        net(x, sigma, return_flag="encoder_decoder")
    assert len(calls) == len(net.model.dec)


def test_encoder_gradient_flows_through_input():
    net = _small(8, SMALL_8)
    for p in net.parameters():
        p.requires_grad_(False)       # as in the generator step: psi frozen, gradient only through the input
    x, sigma = _inputs(2, 3, 8)
    x.requires_grad_(True)
    l = net(x, sigma, return_flag="encoder")
    assert l.requires_grad
    l.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # per-sample independence (eval mode, GroupNorm): sample 1's logits do not depend on sample 0's input
    x2 = x.detach().clone().requires_grad_(True)
    net(x2, sigma, return_flag="encoder")[1].sum().backward()
    assert x2.grad[0].abs().max() == 0 and x2.grad[1].abs().sum() > 0


def test_encoder_decoder_gradient_flows_through_input():
    net = _small(8, SMALL_8)
    x, sigma = _inputs(2, 3, 8)
    x.requires_grad_(True)
    d, l = net(x, sigma, return_flag="encoder_decoder")
    (d.sum() + l.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("flag", ["Decoder", "discriminator", "", "encoder-decoder"])
def test_invalid_return_flag_raises(flag):
    net = _small(8, SMALL_8)
    x, sigma = _inputs(2, 3, 8)
    with pytest.raises(ValueError):
        net(x, sigma, return_flag=flag)
    with pytest.raises(ValueError):
        net.model(x, sigma.log() / 4, None, return_flag=flag)
    mlp = build_denoiser("mlp", 8, 3, 0, dict(hidden=8, emb_channels=8))
    with pytest.raises(ValueError):
        mlp(x, sigma, return_flag=flag)


def test_unknown_arch_raises():
    with pytest.raises(ValueError):
        build_denoiser("dit", 8, 3, 0, {})


# --------------------------------------------------------------------------------------------------
# no added parameters; CIFAR-10 DDPM++ size
# --------------------------------------------------------------------------------------------------
def test_no_parameters_added_by_wrapper_or_discriminator():
    torch.manual_seed(0)
    net = build_denoiser("songunet", 8, 3, 0, SMALL_8)
    torch.manual_seed(0)
    plain = SongUNet(img_resolution=8, in_channels=3, out_channels=3, **SMALL_8)
    assert count_parameters(net) == count_parameters(plain) == count_parameters(net.model)
    names = {n for n, _ in net.named_parameters()}
    assert all(n.startswith("model.") for n in names)
    top = {n.split(".")[1] for n in names}
    assert top <= {"map_label", "map_augment", "map_layer0", "map_layer1", "enc", "dec"}, top
    # buffers/params identical after running every flag (nothing created lazily)
    x, sigma = _inputs(2, 3, 8)
    with torch.no_grad():
        for flag in ("decoder", "encoder", "encoder_decoder"):
            net(x, sigma, return_flag=flag)
    assert {n for n, _ in net.named_parameters()} == names


def test_cifar10_ddpmpp_parameter_count_and_logit_map():
    torch.manual_seed(0)
    net = build_denoiser("songunet", 32, 3, 0, CIFAR).eval()
    n = count_parameters(net)
    assert abs(n - 55.73e6) < 0.1e6, n
    assert round(n / 1e6, 2) == 55.73, n           # EDM's reported figure for the CIFAR-10 DDPM++ backbone
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        l = net(x, torch.tensor([1.0]), return_flag="encoder")
    assert l.shape == (1, 1, 8, 8) and l.dtype == torch.float32   # SPEC: 8x8 map for CIFAR-10 DDPM++


def test_cifar10_conditional_adds_only_label_embedding():
    torch.manual_seed(0)
    n0 = count_parameters(build_denoiser("songunet", 32, 3, 0, CIFAR))
    n10 = count_parameters(build_denoiser("songunet", 32, 3, 10, CIFAR))
    assert n10 - n0 == 10 * 128 + 128     # map_label: Linear(10 -> 128) with bias


# --------------------------------------------------------------------------------------------------
# EDMPrecond with a backbone stub
# --------------------------------------------------------------------------------------------------
class Stub(nn.Module):
    """F(x; c_noise, c) = 2 x + c_noise (+ sum of labels); logits = spatial channel-mean of x; records inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, noise_labels, class_labels=None, return_flag="decoder"):
        self.calls.append(dict(x=x.detach().clone(), noise=noise_labels.detach().clone(), labels=class_labels,
                               flag=return_flag))
        f = 2 * x + noise_labels.reshape(-1, 1, 1, 1).to(x.dtype)
        if class_labels is not None:
            f = f + class_labels.sum(dim=1).reshape(-1, 1, 1, 1).to(x.dtype)
        logits = x.float().mean(dim=1, keepdim=True)
        return {"decoder": f, "encoder": logits, "encoder_decoder": (f, logits)}[return_flag]


def test_edmprecond_computes_cskip_x_plus_cout_F_of_cin_x():
    stub = Stub()
    net = EDMPrecond(stub, img_resolution=2, img_channels=1)
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]], [[[0.0, 1.0], [-1.0, 2.0]]]], dtype=torch.float64)
    sigmas = [0.5, 2.0]
    out = net(x, torch.tensor(sigmas))
    call = stub.calls[0]
    assert call["labels"] is None and call["flag"] == "decoder"
    for b, s in enumerate(sigmas):
        den = s * s + 0.25
        c_skip, c_out, c_in, c_noise = 0.25 / den, s * 0.5 / math.sqrt(den), 1 / math.sqrt(den), math.log(s) / 4
        assert call["noise"][b].item() == pytest.approx(c_noise, rel=1e-6)
        for i in range(2):
            for j in range(2):
                xv = x[b, 0, i, j].item()
                assert call["x"][b, 0, i, j].item() == pytest.approx(c_in * xv, rel=1e-6, abs=1e-7)
                f = 2 * c_in * xv + c_noise
                assert out[b, 0, i, j].item() == pytest.approx(c_skip * xv + c_out * f, rel=1e-6, abs=1e-7)
    # sigma = 0.5 hand values: c_skip = 0.5, c_out = c_in / 4 = 0.35355, c_in = 1.41421, c_noise = -0.17329
    assert out[0, 0, 0, 0].item() == pytest.approx(0.5 * 1.0 + 0.3535533906 * (2 * 1.4142135624 - 0.1732867951), rel=1e-6)


def test_edmprecond_flags_and_labels():
    stub = Stub()
    net = EDMPrecond(stub, img_resolution=2, img_channels=1, label_dim=3)
    x = torch.randn(2, 1, 2, 2)
    # scalar sigma is broadcast to the batch; missing labels become zeros for a conditional net
    d = net(x, 1.0)
    assert stub.calls[-1]["noise"].shape == (2,)
    assert torch.equal(stub.calls[-1]["labels"], torch.zeros(2, 3))
    l = net(x, 1.0, return_flag="encoder")
    torch.testing.assert_close(l, (x / math.sqrt(1.25)).mean(dim=1, keepdim=True))   # backbone logits unchanged
    d2, l2 = net(x, 1.0, return_flag="encoder_decoder")
    torch.testing.assert_close(d2, d)
    torch.testing.assert_close(l2, l)
    labels = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    net(x, 1.0, labels)
    assert stub.calls[-1]["labels"] is labels
    # unconditional wrapper drops labels
    stub0 = Stub()
    EDMPrecond(stub0, img_resolution=2, img_channels=1, label_dim=0)(x, 1.0, labels)
    assert stub0.calls[-1]["labels"] is None
    assert count_parameters(net) == 0
