"""EDM2 network (sida_core/networks/edm2.py), forced weight normalisation as an explicit step, and the logvar psi loss.

SPEC.md "Networks" and "EDM2". Tiny widths on CPU; the published model sizes are counted on the meta device.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from schemas.run import LossConfig, RunConfig
from sida_core import edm
from sida_core.distill import Distiller, StepHyper, hyper_from_config, init_networks
from sida_core.losses import FakeScoreLoss
from sida_core.networks import build_denoiser
from sida_core.networks.edm2 import EDM2Precond, MPConv, force_weight_norm_, normalize

RES, CH, LABELS = 8, 2, 3
TINY = dict(model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8,
            logvar_channels=8)


def tiny(label_dim: int = LABELS, seed: int = 0, **kw) -> EDM2Precond:
    """A tiny EDM2 net whose scalar gains (zero at EDM2's init) are random, so every branch contributes."""
    torch.manual_seed(seed)
    net = build_denoiser("edm2", RES, CH, label_dim, {**TINY, **kw})
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.copy_(torch.randn([]))
    return net


def inputs(b: int = 4, label_dim: int = LABELS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, CH, RES, RES, generator=g)
    sigma = torch.tensor([0.02, 0.4, 2.0, 30.0][:b])
    labels = nn.functional.one_hot(torch.arange(b) % label_dim, label_dim).float() if label_dim else None
    return x, sigma, labels


def mpconvs(net: nn.Module) -> dict[str, MPConv]:
    return {n: m for n, m in net.named_modules() if isinstance(m, MPConv)}


def row_rms(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel RMS of a weight: 1 means unit norm in EDM2's sense (||w_i|| = sqrt(fan-in))."""
    return w.detach().float().flatten(1).square().mean(1).sqrt()


# ----------------------------------------------------------------------------------------------- sizes / names
# EDM2 paper (Karras et al., CVPR 2024, arXiv:2312.02696), Table 2, "Mparams" of the ImageNet-512 models; configs
# from NVlabs/edm2 train_edm2.py `config_presets` (edm2-img512-*: only model_channels differs; UNet defaults
# channel_mult [1,2,3,4], num_blocks 3, attn_resolutions [16,8]) on SD-VAE latents 4x64x64, label_dim 1000.
PUBLISHED = [("XS", 128, 125e6, 3), ("S", 192, 280e6, 3), ("M", 256, 498e6, 3), ("L", 320, 777e6, 3),
             ("XL", 384, 1.1e9, 2), ("XXL", 448, 1.5e9, 2)]


@pytest.mark.parametrize("name,channels,published,digits", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_parameter_counts_match_edm2_paper(name, channels, published, digits):
    with torch.device("meta"):
        net = EDM2Precond(64, 4, 1000, model_channels=channels)
    total = sum(p.numel() for p in net.parameters())
    unet = sum(p.numel() for p in net.unet.parameters())
    assert total - unet == 128  # the logvar head (logvar_linear 128 -> 1) is counted; it is 1e-6 of the total
    if digits == 3:
        assert abs(total / published - 1) < 0.005, (name, total)
    else:  # "1.1B" / "1.5B": the count rounds to the published figure
        assert float(f"{total:.{digits}g}") == published, (name, total)


def test_state_dict_names_equal_edm2():
    """Keys (in order) and shapes as NVlabs/edm2 training/networks_edm2.py names them, written out for TINY."""
    def block(prefix, cin, cout, flavor, attn=False):
        keys = [f"{prefix}.emb_gain", f"{prefix}.conv_res0.weight", f"{prefix}.emb_linear.weight",
                f"{prefix}.conv_res1.weight"]
        keys += [f"{prefix}.conv_skip.weight"] if cin != cout else []
        keys += [f"{prefix}.attn_qkv.weight", f"{prefix}.attn_proj.weight"] if attn else []
        return keys

    expected = ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight",
                "unet.emb_label.weight", "unet.enc.8x8_conv.weight"]
    expected += block("unet.enc.8x8_block0", 8, 8, "enc")
    expected += block("unet.enc.4x4_down", 8, 8, "enc")
    expected += block("unet.enc.4x4_block0", 8, 16, "enc", attn=True)
    expected += block("unet.dec.4x4_in0", 16, 16, "dec", attn=True)
    expected += block("unet.dec.4x4_in1", 16, 16, "dec")
    expected += block("unet.dec.4x4_block0", 32, 16, "dec", attn=True)   # + skip of enc 4x4_block0 (16)
    expected += block("unet.dec.4x4_block1", 24, 16, "dec", attn=True)   # + skip of enc 4x4_down (8)
    expected += block("unet.dec.8x8_up", 16, 16, "dec")
    expected += block("unet.dec.8x8_block0", 24, 8, "dec")               # + skip of enc 8x8_block0 (8)
    expected += block("unet.dec.8x8_block1", 16, 8, "dec")               # + skip of enc 8x8_conv (8)
    expected += ["unet.out_conv.weight", "logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
    sd = tiny().state_dict()
    assert list(sd) == expected
    shapes = {"unet.enc.8x8_conv.weight": (8, CH + 1, 3, 3), "unet.emb_noise.weight": (16, 8),
              "unet.emb_label.weight": (16, LABELS), "unet.dec.4x4_block0.conv_res0.weight": (16, 32, 3, 3),
              "unet.dec.4x4_block0.conv_skip.weight": (16, 32, 1, 1), "unet.enc.4x4_block0.attn_qkv.weight": (48, 16, 1, 1),
              "unet.out_conv.weight": (CH, 8, 3, 3), "unet.out_gain": (), "logvar_linear.weight": (1, 8),
              "logvar_fourier.freqs": (8,), "unet.emb_fourier.phases": (8,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert "unet.emb_label.weight" not in tiny(label_dim=0).state_dict()
    # an EDM2 state dict (here: another instance's) loads strictly
    EDM2Precond(RES, CH, LABELS, **TINY).load_state_dict(sd, strict=True)


def test_build_denoiser_returns_edm2_precond_with_the_distiller_attributes():
    net = build_denoiser("edm2", RES, CH, LABELS, TINY)
    assert type(net) is EDM2Precond  # its own preconditioner, not wrapped in EDMPrecond
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_data, net.use_fp16) == (RES, CH, LABELS, 0.5, True)
    assert EDM2Precond(RES, CH, 0, use_fp16=False, **TINY).use_fp16 is False  # recorded only


# ----------------------------------------------------------------------------------------------- return_flag
@pytest.mark.parametrize("train", [False, True])
def test_return_flags(train):
    net = tiny().train(train)
    x, sigma, labels = inputs()
    torch.manual_seed(5)
    dec = net(x, sigma, labels)
    enc = net(x, sigma, labels, return_flag="encoder")
    both = net(x, sigma, labels, return_flag="encoder_decoder")
    assert isinstance(both, tuple) and len(both) == 2
    assert torch.equal(both[0], dec) and torch.equal(both[1], enc)
    assert dec.shape == x.shape and dec.dtype == torch.float32
    assert enc.shape == (4, 1, RES // 2, RES // 2) and enc.dtype == torch.float32  # lowest encoder resolution
    # the logit map is the channel mean of the last encoder block's output
    seen = {}
    handle = net.unet.enc["4x4_block0"].register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    called = []
    hooks = [b.register_forward_pre_hook(lambda m, a: called.append(1)) for b in net.unet.dec.values()]
    try:
        enc2 = net(x, sigma, labels, return_flag="encoder")
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    assert torch.equal(enc2, seen["h"].float().mean(dim=1, keepdim=True))
    assert not called  # 'encoder' skips the decoder
    # logvar appended
    d2, u = net(x, sigma, labels, return_logvar=True)
    d3, l3, u3 = net(x, sigma, labels, return_flag="encoder_decoder", return_logvar=True)
    assert torch.equal(d2, dec) and torch.equal(d3, dec) and torch.equal(l3, enc)
    assert u.shape == (4, 1, 1, 1) and u.dtype == torch.float32 and torch.equal(u, u3)
    assert torch.equal(u, net.logvar(sigma.log() / 4))
    assert len(set(u.flatten().tolist())) == 4  # u depends on sigma


def test_logits_carry_gradient_to_the_encoder_only():
    net = tiny()
    x, sigma, labels = inputs()
    net(x, sigma, labels, return_flag="encoder").square().sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads["unet.enc.8x8_conv.weight"].abs().sum() > 0 and grads["unet.emb_noise.weight"].abs().sum() > 0
    assert grads["unet.enc.4x4_block0.attn_qkv.weight"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith(("unet.dec.", "unet.out_", "logvar_")))


def test_calling_convention_like_edmprecond():
    net = tiny().eval()
    x, sigma, labels = inputs()
    s = torch.full((4,), 0.7)
    assert torch.equal(net(x, 0.7, labels), net(x, s, labels))                       # scalar sigma broadcast
    assert torch.equal(net(x, s), net(x, s, torch.zeros(4, LABELS)))                # missing labels -> zeros
    unc = tiny(label_dim=0).eval()
    assert torch.equal(unc(x, s, labels), unc(x, s))                                 # label_dim 0 ignores labels
    with pytest.raises(ValueError, match="return_flag"):
        net(x, s, labels, return_flag="generator")
    # D = c_skip x + c_out F(c_in x; ln(sigma)/4): at out_gain = 0 (EDM2's init) F = 0
    with torch.no_grad():
        net.unet.out_gain.zero_()
    c_skip = edm.precond_coefficients(s)[0].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(net(x, s, labels), c_skip * x, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- weights
def test_forward_never_writes_weights_and_has_no_pre_hooks():
    net = tiny().train()
    x, sigma, labels = inputs()
    versions = {n: t._version for n, t in [*net.named_parameters(), *net.named_buffers()]}
    values = {n: t.detach().clone() for n, t in net.state_dict().items()}
    raw = mpconvs(net)["unet.emb_label"].weight
    assert (row_rms(raw) - 1).abs().max() > 0.05  # raw randn weights: far from unit norm, so a write would show
    for flag in ("decoder", "encoder", "encoder_decoder"):
        out = net(x, sigma, labels, return_flag=flag, return_logvar=True)
        sum(o.square().sum() for o in out).backward()
    assert {n: t._version for n, t in [*net.named_parameters(), *net.named_buffers()]} == versions
    assert all(torch.equal(values[n], t) for n, t in net.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


def test_force_weight_norm_is_edm2_normalize_on_every_mpconv_and_a_noop_elsewhere():
    net = tiny()
    convs = mpconvs(net)
    before = {n: m.weight.detach().clone() for n, m in convs.items()}
    other = {n: t.detach().clone() for n, t in net.state_dict().items() if not n.endswith("weight")}
    assert force_weight_norm_(net) == len(convs) == sum(k.endswith(".weight") for k in net.state_dict()) == 48
    for n, m in convs.items():
        assert torch.equal(m.weight, normalize(before[n]))
        # unit norm per output channel: ||w_i|| / sqrt(fan_in) = r / (r + 1e-4) for the previous RMS r
        r = row_rms(before[n]).double()
        torch.testing.assert_close(row_rms(m.weight).double(), r / (r + 1e-4), rtol=1e-5, atol=0)
    assert all(torch.equal(other[n], net.state_dict()[n]) for n in other)  # gains and Fourier buffers untouched
    mlp = build_denoiser("mlp", RES, CH, 0, {"hidden": 16, "enc_layers": 1, "dec_layers": 1, "emb_channels": 8})
    sd = {n: t.clone() for n, t in mlp.state_dict().items()}
    assert force_weight_norm_(mlp) == 0
    assert all(torch.equal(sd[n], t) for n, t in mlp.state_dict().items())


# ----------------------------------------------------------------------------------------------- distillation
def hyper(**kw) -> StepHyper:
    d = dict(method="sida", alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0, sigma_init=2.5,
             t_max=800.0, p_mean=-0.4, p_std=1.0, fake_score_only_kimg=0.0, sid_until_kimg=0.0, lr_psi=1e-2,
             lr_theta=1e-2, betas=(0.0, 0.999), eps=1e-8, total_batch=4, per_worker=2, ema_mimg=0.01, ema_rampup=0.05,
             precision="fp32", seed=0, psi_grad_clip=1.0)
    d.update(kw)
    return StepHyper(**d)


def real_data(n: int = 16):
    g = torch.Generator().manual_seed(7)
    return 0.5 * torch.randn(n, CH, RES, RES, generator=g), nn.functional.one_hot(torch.arange(n) % LABELS, LABELS).float()


def make_distiller(wrap=None, **kw) -> Distiller:
    teacher = tiny().eval().requires_grad_(False)
    G, psi = init_networks(teacher)
    if wrap is not None:
        G, psi = wrap(G), wrap(psi)
    x, c = real_data()
    return Distiller(hyper(**kw), teacher, G, psi, x, c)


def test_sida_psi_step_two_forwards_one_backward_on_edm2():
    """SPEC "EDM2": f_psi(fake, encoder_decoder) then f_psi(real, encoder), one backward: no autograd error."""
    psi = tiny().train()
    force_weight_norm_(psi)
    calls = []
    psi.register_forward_pre_hook(lambda m, a, k: calls.append(k.get("return_flag")), with_kwargs=True)
    x_real, c = real_data(4)
    x_g = torch.randn_like(x_real)
    loss, stats = FakeScoreLoss(p_mean=-0.4, p_std=1.0)(psi, x_g, c, x_real, c, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    assert calls == ["encoder_decoder", "encoder"]
    assert all(torch.isfinite(p.grad).all() for p in psi.parameters() if p.grad is not None)
    assert psi.unet.enc["8x8_conv"].weight.grad.abs().sum() > 0 and "d_real" in stats


def test_distiller_normalises_trainable_nets_before_their_forwards_and_never_the_teacher():
    d = make_distiller()
    teacher_before = {n: t.clone() for n, t in d.teacher.state_dict().items()}
    seen: list[tuple[str, str, torch.Tensor]] = []

    def recorder(tag):
        def hook(module, args):
            if torch.is_grad_enabled() and module.weight.requires_grad:  # forwards of this net's own update
                seen.append((tag, module.name, module.weight.detach().clone()))
        return hook

    handles = []
    for tag, net in (("G", d.G), ("psi", d.psi)):
        for n, m in mpconvs(net).items():
            m.name = n
            handles.append(m.register_forward_pre_hook(recorder(tag)))
    assert max((row_rms(m.weight) - 1).abs().max() for m in mpconvs(d.psi).values()) > 0.05  # not unit norm at start
    try:
        for _ in range(3):
            seen.clear()
            start = {tag: {n: m.weight.detach().clone() for n, m in mpconvs(net).items()}
                     for tag, net in (("G", d.G), ("psi", d.psi))}
            st = d.step()
            assert st["stage"] == "sida" and st["psi_updated"] == st["G_updated"] == 1.0
            assert {t for t, _, _ in seen} == {"G", "psi"}
            for tag, name, w in seen:  # every forward of the update saw normalize(weights at the start of the step)
                assert torch.equal(w, normalize(start[tag][name])), (tag, name)
                assert (row_rms(w) - 1).abs().max() < 1e-3, (tag, name)
            for tag, net in (("G", d.G), ("psi", d.psi)):  # ... and the update then moved them
                assert any(not torch.equal(m.weight, normalize(start[tag][n])) for n, m in mpconvs(net).items())
    finally:
        for h in handles:
            h.remove()
    assert all(torch.equal(teacher_before[n], t) for n, t in d.teacher.state_dict().items())  # bit-identical


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the net under ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_forced_normalisation_works_through_a_ddp_style_wrapper():
    plain, wrapped = make_distiller(), make_distiller(wrap=Wrapper)
    for _ in range(2):
        plain.step()
        wrapped.step()
    for a, b in ((plain.G, wrapped.G.module), (plain.psi, wrapped.psi.module)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------------------------- logvar loss
def replay(seed: int, b: int, p_mean: float, p_std: float):
    g = torch.Generator().manual_seed(seed)
    sigma = (torch.randn(b, generator=g) * p_std + p_mean).exp()
    eps = torch.randn(b, CH, RES, RES, generator=g)
    return sigma, eps


def np_bce(logits: np.ndarray, target: float) -> float:
    z = logits.reshape(-1)
    z = -z if target == 1.0 else z
    return float(np.mean(np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))))


@pytest.mark.parametrize("use_adv", [True, False])
def test_logvar_psi_loss_equals_the_formula(use_adv):
    psi = tiny().train()
    with torch.no_grad():
        psi.logvar_linear.weight.mul_(3.0)  # scale is irrelevant (normalised), but keeps u visibly non-zero
    x_real, c = real_data(4)
    x_g = 0.5 * torch.randn(4, CH, RES, RES, generator=torch.Generator().manual_seed(3))
    lam = 0.7
    fn = FakeScoreLoss(lambda_adv_psi=lam, p_mean=-0.4, p_std=1.0, use_adv=use_adv, use_logvar=True)
    loss, stats = fn(psi, x_g, c, x_real if use_adv else None, c, generator=torch.Generator().manual_seed(11))
    loss.sum().backward()
    assert psi.logvar_linear.weight.grad.abs().sum() > 0  # u is trained by this loss

    sigma, eps = replay(11, 4, -0.4, 1.0)
    n = sigma.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        y, l_fake, u = psi(x_g + n, sigma, c, return_flag="encoder_decoder", return_logvar=True)
        l_real = psi(x_real + n, sigma, c, return_flag="encoder")
    y, xg, u, s = y.double().numpy(), x_g.double().numpy(), u.double().numpy().reshape(-1), sigma.double().numpy()
    adv = (np_bce(l_real.double().numpy(), 1.0) + np_bce(l_fake.double().numpy(), 0.0)) / 2
    expected = []
    for i in range(4):
        gamma = (s[i] ** 2 + 0.25) / (s[i] * 0.5) ** 2
        val = gamma * float(((y[i] - xg[i]) ** 2).sum()) / math.exp(u[i]) + u[i]
        expected.append(val + (gamma * lam * adv if use_adv else 0.0))
    assert np.abs(u).min() > 1e-3
    np.testing.assert_allclose(loss.detach().double().numpy(), expected, rtol=1e-5)
    assert stats["logvar"] == pytest.approx(float(u.mean()), rel=1e-5)


def test_logvar_off_is_todays_loss_and_on_refuses_nets_without_a_head():
    psi = tiny().train()
    x_real, c = real_data(4)
    x_g = torch.randn_like(x_real)
    kw = dict(p_mean=-0.4, p_std=1.0)
    off, _ = FakeScoreLoss(**kw)(psi, x_g, c, x_real, c, generator=torch.Generator().manual_seed(2))
    sigma, eps = replay(2, 4, -0.4, 1.0)
    n = edm.expand_sigma(sigma, x_g) * eps
    y, l_fake = psi(x_g + n, sigma, c, return_flag="encoder_decoder")
    l_real = psi(x_real + n, sigma, c, return_flag="encoder")
    bce = nn.functional.binary_cross_entropy_with_logits
    adv = (bce(l_real, torch.ones_like(l_real)) + bce(l_fake, torch.zeros_like(l_fake))) / 2
    today = edm.gamma_weight(sigma) * ((y - x_g).square().flatten(1).sum(1) + 1.0 * adv)
    assert torch.equal(off, today)

    mlp = build_denoiser("mlp", RES, CH, 0, {"hidden": 16, "enc_layers": 1, "dec_layers": 1, "emb_channels": 8})
    with pytest.raises(ValueError, match="logvar head") as err:
        FakeScoreLoss(use_adv=False, use_logvar=True)(mlp, x_g, generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(err.value)
    G, f = init_networks(mlp)
    with pytest.raises(ValueError, match="logvar head"):
        Distiller(hyper(method="sid", fake_score_logvar=True), mlp, G, f)


def test_logvar_option_in_config_reaches_the_loss():
    assert LossConfig().fake_score_logvar is False
    cfg = RunConfig.model_validate({"loss": {"fake_score_logvar": True}})
    h = hyper_from_config(cfg)
    assert h.fake_score_logvar is True
    d = make_distiller(fake_score_logvar=True)
    assert d.fake_loss.use_logvar is True
    st = d.step()
    assert math.isfinite(st["loss_psi"]) and "logvar" in st
    assert make_distiller().fake_loss.use_logvar is False
