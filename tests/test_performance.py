"""The speed options (sida_core/performance.py, ``performance:``): each one leaves the mathematics alone.

Equivalence: N SiDA steps (psi + theta + EMA, crossing no stage boundary: SiDA from step 0, so the adversarial
terms and the real batch are exercised) from the same seed, eager fp32 vs the option, on a tiny class-conditional
SongUNet; per-step losses and final weights are compared.

Tolerances: the options reassociate float sums (a batched encoder pass over [fake; real], NHWC convolution kernels,
a fused Adam kernel), so losses agree to ~1e-6 relative. Adam (beta1 = 0 here, as in the paper) divides each
gradient element by its own RMS, so an element whose gradient is at rounding level can turn that rounding into a
visible fraction of one step (lr): weights are compared at a quarter of one Adam step (the largest seen: 0.16 of a
step, in 1 of 1,152 elements of one conv weight, channels-last after 3 steps), which still fails for any real change
of the loss (the negative control below moves weights by several steps). Activation checkpointing recomputes the
same operations and is checked tighter.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from schemas.run import RunConfig
from sida_core.distill import Distiller, StepHyper, hyper_from_config, init_networks
from sida_core.losses import FakeScoreLoss
from sida_core.networks import build_denoiser
from sida_core.performance import Performance, adam, batch_statistics_modules, check_single_forward, compile_unavailable

LR = 1e-3
STEPS = 3
LABELS = 10
UNET_KW = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0}
LOSS_TOL = dict(rtol=1e-4, atol=1e-6)
WEIGHT_TOL = dict(rtol=1e-4, atol=0.25 * LR)


def hyper(perf: Performance, method: str = "sida", **kw) -> StepHyper:
    d = dict(method=method, alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0, sigma_init=2.5,
             t_max=800.0, p_mean=-1.2, p_std=1.2, fake_score_only_kimg=0.0, sid_until_kimg=0.0, lr_psi=LR,
             lr_theta=LR, betas=(0.0, 0.999), eps=1e-8, total_batch=8, per_worker=4, ema_mimg=0.01, ema_rampup=0.05,
             precision="fp32", seed=5, psi_grad_clip=1.0, performance=perf)
    d.update(kw)
    return StepHyper(**d)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = build_denoiser("songunet", 8, 1, LABELS, UNET_KW).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(64, 1, 8, 8, generator=gen) * 2 - 1
    labels = nn.functional.one_hot(torch.randint(LABELS, (64,), generator=gen), LABELS).float()
    return teacher, real, labels


def run(setup, perf: Performance, steps: int = STEPS, **kw):
    teacher, real, labels = setup
    teacher = copy.deepcopy(teacher)
    G, psi = init_networks(teacher)
    d = Distiller(hyper(perf, **kw), teacher, G, psi, real, labels)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            st = d.step()
            losses.append(torch.tensor([st.get(k, 0.0) for k in ("loss_psi", "loss_G", "d_real", "d_fake")],
                                       dtype=torch.float64))
    state = d.state_dict()
    return torch.stack(losses), {k: {n: v.detach().clone().contiguous() for n, v in state[k].items()}
                                 for k in ("generator", "generator_ema", "fake_score")}, d


def assert_same(a, b, weight_tol=WEIGHT_TOL, loss_tol=LOSS_TOL):
    torch.testing.assert_close(a[0], b[0], **loss_tol)
    for k in a[1]:
        for n in a[1][k]:
            torch.testing.assert_close(a[1][k][n], b[1][k][n], msg=lambda m: f"{k}.{n}: {m}", **weight_tol)


@pytest.fixture(scope="module")
def eager(setup):
    return run(setup, Performance())


OPTIONS = {
    "single_psi_forward": Performance(single_psi_forward=True),
    "channels_last": Performance(channels_last=True),
    "adam_foreach": Performance(adam="foreach"),
    "adam_fused": Performance(adam="fused"),
    "all_cpu_options": Performance(single_psi_forward=True, channels_last=True, adam="fused"),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_keeps_losses_and_weights(name, setup, eager):
    fast = run(setup, OPTIONS[name])
    assert fast[2].perf_notes == [] or name.startswith("adam")  # fused falls back only where unsupported (noted)
    assert_same(eager, fast)


def test_activation_checkpointing_recomputes_the_same_step(setup, eager):
    assert_same(eager, run(setup, Performance(activation_checkpointing=True)),
                weight_tol=dict(rtol=1e-5, atol=1e-6), loss_tol=dict(rtol=1e-6, atol=1e-7))


def test_negative_control_other_seed_differs(setup, eager):
    """The comparison can fail: another seed (other noise, other real batches) ends far outside the tolerance."""
    other = run(setup, Performance(), seed=6)
    with pytest.raises(AssertionError):
        assert_same(eager, other)


def test_single_forward_matches_two_forwards_per_network():
    """decoder_batch: one pass over [fake; real] gives the two-pass denoised fake half and both logit maps, for every
    backbone family (songunet, adm, edm2 with its logvar head, mlp) under each preconditioning."""
    torch.manual_seed(0)
    nets = [build_denoiser("songunet", 8, 1, 0, UNET_KW, precond="vp"),
            build_denoiser("adm", 8, 3, LABELS, {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                                                 "attn_resolutions": [4], "dropout": 0.0}),
            build_denoiser("edm2", 8, 4, LABELS, {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                                                  "attn_resolutions": [4], "logvar_channels": 8}),
            build_denoiser("mlp", 8, 1, 0, {"hidden": 16, "enc_layers": 1, "dec_layers": 1, "emb_channels": 8})]
    for net in nets:
        net.train()
        c = net.img_channels
        x = torch.randn(6, c, 8, 8)
        sigma = torch.rand(3).repeat(2) + 0.3
        lab = nn.functional.one_hot(torch.arange(6) % LABELS, LABELS).float() if net.label_dim else None
        edm2 = hasattr(net, "logvar_linear")
        kw = {"return_logvar": True} if edm2 else {}
        both = net(x, sigma, lab, return_flag="encoder_decoder", decoder_batch=3, **kw)
        fake = net(x[:3], sigma[:3], None if lab is None else lab[:3], return_flag="encoder_decoder", **kw)
        real = net(x[3:], sigma[3:], None if lab is None else lab[3:], return_flag="encoder")
        name = type(net).__name__
        assert both[0].shape == (3, c, 8, 8), name
        torch.testing.assert_close(both[0], fake[0], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(both[1], torch.cat([fake[1], real]), rtol=1e-5, atol=1e-5, msg=name)
        if edm2:
            torch.testing.assert_close(both[2], fake[2])


def test_single_forward_refused_for_batch_statistics():
    """A fake-score net with BatchNorm would see [fake; real] statistics in one pass: refused in one line."""
    net = build_denoiser("mlp", 8, 1, 0, {"hidden": 16, "enc_layers": 1, "dec_layers": 1, "emb_channels": 8})
    net.model.extra = nn.BatchNorm1d(16)
    assert batch_statistics_modules(net) == ["model.extra"]
    with pytest.raises(ValueError, match=r"single_psi_forward .* has model\.extra") as e:
        check_single_forward(net)
    assert "\n" not in str(e.value)
    check_single_forward(build_denoiser("songunet", 8, 1, 0, UNET_KW))  # GroupNorm: per sample, accepted
    loss = FakeScoreLoss(single_forward=True)
    assert loss.single_forward


def test_fused_adam_falls_back_with_a_note_where_unsupported():
    notes: list[str] = []
    p = [nn.Parameter(torch.zeros(3, dtype=torch.float64).to(torch.complex128))]  # complex: no fused kernel
    opt = adam(p, lr=1e-3, betas=(0.0, 0.999), eps=1e-8, perf=Performance(adam="fused"), notes=notes)
    assert opt.defaults["foreach"] is True and len(notes) == 1 and "fused unavailable" in notes[0]
    notes.clear()
    opt = adam([nn.Parameter(torch.zeros(3))], lr=1e-3, betas=(0.0, 0.999), eps=1e-8, perf=Performance(adam="fused"),
               notes=notes)
    assert opt.defaults["fused"] is True and notes == []


def test_compile_unavailable_without_a_compiler_falls_back_to_eager(setup, eager, monkeypatch, tmp_path):
    """No C++ compiler on PATH (inductor's CPU backend needs one): compile is skipped with a note, the step runs eager
    and gives the eager result."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "C++ compiler" in compile_unavailable(torch.device("cpu"))
    out = run(setup, Performance(compile=("generator", "fake_score", "teacher")))
    assert out[2].compiled == [] and "performance.compile ignored" in out[2].perf_notes[0]
    assert_same(eager, out, weight_tol=dict(rtol=0, atol=0), loss_tol=dict(rtol=0, atol=0))


def test_config_section_maps_onto_the_step():
    cfg = RunConfig.model_validate({"performance": {"compile": True, "channels_last": True, "adam": "fused",
                                                    "single_psi_forward": True}})
    perf = hyper_from_config(cfg).performance
    assert perf == Performance(compile=("generator", "fake_score", "teacher"), channels_last=True, adam="fused",
                               single_psi_forward=True)
    assert hyper_from_config(RunConfig()).performance == Performance()
    for bad in ({"compile": ["gen"]}, {"adam": "lbfgs"}, {"speed": 1}, {"compile_mode": "fast"}):
        with pytest.raises(Exception, match="performance"):
            RunConfig.model_validate({"performance": bad})


@pytest.mark.slow
@pytest.mark.skipif(compile_unavailable(torch.device("cpu")) is not None, reason="torch.compile unavailable here")
def test_compile_keeps_losses_and_weights(tmp_path, monkeypatch):
    """torch.compile of all three networks (inductor on the CPU) gives the eager step. A small MLP denoiser keeps
    the compile time to about a minute on 2 cores (the U-Nets take minutes: see docs/performance.md)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a cold cache: really compiles
    torch.manual_seed(0)
    teacher = build_denoiser("mlp", 8, 1, 0, {"hidden": 32, "enc_layers": 1, "dec_layers": 1, "emb_channels": 8})
    teacher = teacher.eval().requires_grad_(False)
    real = torch.rand(64, 1, 8, 8) * 2 - 1
    setup = (teacher, real, None)
    plain = run(setup, Performance(), steps=2, method="sid")
    compiled = run(setup, Performance(compile=("generator", "fake_score", "teacher")), steps=2, method="sid")
    assert compiled[2].compiled == ["generator", "fake_score", "teacher"]
    torch.testing.assert_close(plain[0][:, :2], compiled[0][:, :2], **LOSS_TOL)
    for k in plain[1]:
        for n in plain[1][k]:
            torch.testing.assert_close(plain[1][k][n], compiled[1][k][n], **WEIGHT_TOL)
