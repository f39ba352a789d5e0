"""The distillation step (sida_core/distill.py) and the single-process engine (sida_core/training_loop.py).

Real code throughout: a tiny MLP teacher trained for 1 kimg on the built-in digits (session fixture), real
Distillers, real checkpoints. Only the teacher is swapped for a NaN-producing wrapper in the non-finite tests.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from schemas.loader import load_run_config
from schemas.run import DataConfig, RunConfig
from sida_core import checkpoint as ckpt
from sida_core.data import load_dataset
from sida_core.distill import Distiller, NonFiniteError, StepHyper, ema_beta, init_networks
from sida_core.networks import build_denoiser
from sida_core.teacher import train_teacher
from sida_core.training_loop import build_distiller, build_from_spec, network_spec, save_distill_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MLP_KW = {"hidden": 32, "enc_layers": 1, "dec_layers": 1, "emb_channels": 16}
UNET_KW = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def digits():
    train, _ = load_dataset(DataConfig(kind="digits"))
    return train


def _train_tiny(label_dim: int, digits) -> nn.Module:
    torch.manual_seed(0)
    net = build_denoiser("mlp", 8, 1, label_dim, MLP_KW)
    labels = torch.nn.functional.one_hot(digits.labels, label_dim).float() if label_dim else None
    return train_teacher(net, digits.images, labels, kimg=1, batch=64, lr=2e-3, lr_rampup_kimg=0.1,
                         ema_halflife_kimg=0.2, seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def teacher(digits):
    """Unconditional tiny MLP teacher, trained for 1 kimg."""
    return _train_tiny(0, digits)


@pytest.fixture(scope="session")
def cond_teacher(digits):
    """Class-conditional (10 digits) tiny MLP teacher, trained for 1 kimg."""
    return _train_tiny(10, digits)


def hyper(**kw) -> StepHyper:
    d = dict(method="sida", alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0, sigma_init=2.5,
             t_max=800.0, p_mean=-1.2, p_std=1.2, fake_score_only_kimg=0.0, sid_until_kimg=0.0, lr_psi=1e-3,
             lr_theta=1e-3, betas=(0.0, 0.999), eps=1e-8, total_batch=8, per_worker=4, ema_mimg=0.01, ema_rampup=0.05,
             precision="fp32", seed=0, psi_grad_clip=1.0)
    d.update(kw)
    return StepHyper(**d)


def make(teacher: nn.Module, digits=None, *, cond: bool = False, rank: int = 0, world_size: int = 1, **kw) -> Distiller:
    """A Distiller initialised as the paper says (theta, psi <- phi); real images only when given."""
    G, psi = init_networks(teacher)
    real = digits.images if digits is not None else None
    labels = torch.nn.functional.one_hot(digits.labels, 10).float() if (digits is not None and cond) else None
    return Distiller(hyper(**kw), teacher, G, psi, real, labels, rank=rank, world_size=world_size)


def snap(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a, b) -> bool:
    """Bit-exact equality of nested containers of tensors / numbers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def changed(before: dict, module: nn.Module) -> bool:
    return not states_equal(before, snap(module))


def grads(module: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


class SwitchableNaNTeacher(nn.Module):
    """The real teacher; once ``poison`` is set its output is NaN (a diverged / broken teacher)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.poison = False

    def forward(self, x, sigma, labels=None, return_flag="decoder"):
        y = self.net(x, sigma, labels, return_flag=return_flag)
        return y * float("nan") if self.poison else y


# ----------------------------------------------------------------------------------------------- stages
def test_stage_switch_inside_the_loop_sida(teacher, digits):
    # batch 8: steps start at cur_nimg 0, 8 (fake-score only), 16, 24 (SiD), 32, 40 (SiDA)
    d = make(teacher, digits, fake_score_only_kimg=0.016, sid_until_kimg=0.032)
    seen = []
    for _ in range(6):
        g0, p0 = snap(d.G), snap(d.psi)
        st = d.step()
        seen.append((st["stage"], changed(g0, d.G), changed(p0, d.psi), "loss_adv_theta" in st, "G_updated" in st,
                     "loss_adv_psi" in st))
    assert [s[0] for s in seen] == ["fake_score"] * 2 + ["sid"] * 2 + ["sida"] * 2
    assert [s[1] for s in seen] == [False, False, True, True, True, True]  # G frozen in the fake-score stage
    assert all(s[2] for s in seen)                                         # psi trained in every stage
    assert [s[3] for s in seen] == [False] * 4 + [True] * 2                # adversarial G term only in SiDA
    assert [s[4] for s in seen] == [False] * 2 + [True] * 4                # no theta pass at all before SiD
    assert all(s[5] for s in seen)                                         # SiDA's psi is adversarial throughout
    assert d.cur_nimg == 48 and d.step_idx == 6


def test_method_sid_never_reaches_sida_and_never_reads_real_images(teacher, digits):
    with pytest.raises(ValueError, match="real images"):
        make(teacher, None, method="sida")  # SiDA needs them ...
    d = make(teacher, None, method="sid", fake_score_only_kimg=0.016, sid_until_kimg=0.032, psi_grad_clip=None)
    assert d.real_images is None  # ... SiD gets none, so any read would fail
    stages = []
    for _ in range(6):
        st = d.step()
        stages.append(st["stage"])
        assert not {"loss_adv_theta", "loss_adv_psi", "d_real", "d_fake"} & st.keys()
    assert stages == ["fake_score"] * 2 + ["sid"] * 4


def test_theta_update_leaves_psi_and_teacher_untouched(teacher, digits):
    teacher_before = snap(teacher)
    d = make(teacher, digits)  # SiDA stage from step 0: psi step, then theta step with adversarial term
    captured = []

    def at_theta_start(module, args):  # the teacher is only evaluated in the theta step
        if not captured:
            captured.append((snap(d.psi), [p.requires_grad for p in d.psi.parameters()]))

    handle = d.teacher.register_forward_pre_hook(at_theta_start)
    try:
        for _ in range(3):
            captured.clear()
            psi_before_step, g_before = snap(d.psi), snap(d.G)
            st = d.step()
            assert st["stage"] == "sida" and st["G_updated"] == 1.0
            psi_at_theta, flags_during_theta = captured[0]
            assert not states_equal(psi_before_step, psi_at_theta)   # the psi update did happen first
            assert states_equal(psi_at_theta, snap(d.psi))           # ... and the theta update did not touch psi
            assert not any(flags_during_theta)                       # psi frozen during the theta step
            assert all(p.requires_grad for p in d.psi.parameters())  # ... and restored afterwards
            assert all(p.grad is None for p in d.psi.parameters())   # no stale psi gradients left behind
            assert changed(g_before, d.G)
    finally:
        handle.remove()
    assert states_equal(teacher_before, snap(teacher))  # teacher never changes
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_equals_data_parallel_average(cond_teacher, digits):
    """rounds=2 x per_worker=b on one process == two workers x b (DDP averages their gradients).

    Micro-batch r on worker k draws from the stream of global index k*rounds + r, so the two layouts see the
    same micro-batches; each adversarial BCE is a mean over its own micro-batch of b in both layouts; the loss
    is divided by per_worker x rounds. So sum-with-accumulation equals the average of the workers' gradients.
    Checked for psi (fake-score stage, SiDA's adversarial psi loss, no clipping since DDP clips the averaged
    gradient) and for theta (SiDA stage, lr_psi = 0 so that every layout's theta step sees the same psi).
    """
    b = 4
    common = dict(method="sida", total_batch=2 * b, per_worker=b, psi_grad_clip=None)

    # psi gradients, fake-score stage (psi gradients stay on the parameters after the step)
    kw = dict(common, fake_score_only_kimg=1.0)
    acc = make(cond_teacher, digits, cond=True, **kw)
    w0 = make(cond_teacher, digits, cond=True, rank=0, world_size=2, **kw)
    w1 = make(cond_teacher, digits, cond=True, rank=1, world_size=2, **kw)
    single = make(cond_teacher, digits, cond=True, **dict(kw, total_batch=b))  # one process, one micro-batch
    assert (acc.rounds, w0.rounds, single.rounds) == (2, 1, 1)
    for d in (acc, w0, w1, single):
        assert d.step()["stage"] == "fake_score"
    g_acc, g0, g1, g_single = grads(acc.psi), grads(w0.psi), grads(w1.psi), grads(single.psi)
    assert g_acc.keys() == g0.keys() and len(g_acc) > 0
    for n in g_acc:
        torch.testing.assert_close(g_acc[n], (g0[n] + g1[n]) / 2, rtol=1e-5, atol=1e-8)
        assert torch.equal(g0[n], g_single[n])  # global index 0 is the same micro-batch in every layout
    assert any(not torch.allclose(g0[n], g1[n]) for n in g0)      # the workers really saw different batches
    assert any(not torch.allclose(g_acc[n], g0[n]) for n in g0)

    # theta gradients, SiDA stage (generator gradients stay on the parameters after the step)
    kw = dict(common, lr_psi=0.0)
    acc = make(cond_teacher, digits, cond=True, **kw)
    w0 = make(cond_teacher, digits, cond=True, rank=0, world_size=2, **kw)
    w1 = make(cond_teacher, digits, cond=True, rank=1, world_size=2, **kw)
    for d in (acc, w0, w1):
        st = d.step()
        assert st["stage"] == "sida" and "loss_adv_theta" in st
    g_acc, g0, g1 = grads(acc.G), grads(w0.G), grads(w1.G)
    assert g_acc.keys() == g0.keys() and len(g_acc) > 0
    for n in g_acc:
        torch.testing.assert_close(g_acc[n], (g0[n] + g1[n]) / 2, rtol=1e-5, atol=1e-8)
    assert any(not torch.allclose(g0[n], g1[n]) for n in g0)


# ----------------------------------------------------------------------------------------------- determinism
STAGED = dict(fake_score_only_kimg=0.008, sid_until_kimg=0.016)  # steps 0 / 1 / 2+ = fake-score / SiD / SiDA


def test_same_seed_gives_bit_identical_runs(cond_teacher, digits):
    a = make(cond_teacher, digits, cond=True, **STAGED)
    b = make(cond_teacher, digits, cond=True, **STAGED)
    c = make(cond_teacher, digits, cond=True, seed=1, **STAGED)
    for _ in range(4):
        sa, sb = a.step(), b.step()
        c.step()
        assert sa == sb
    assert states_equal(a.state_dict(), b.state_dict())
    assert not states_equal(a.state_dict()["generator"], c.state_dict()["generator"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exact_resume_from_checkpoint(cond_teacher, digits, tmp_path, precision):
    if precision == "fp16" and not _cpu_autocast_ok(torch.float16):
        pytest.skip("CPU autocast does not support float16 in this torch")
    kw = dict(STAGED, precision=precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 overflow skips at the initial loss scale are expected
        full = make(cond_teacher, digits, cond=True, **kw)
        for _ in range(5):
            full.step()
        first = make(cond_teacher, digits, cond=True, **kw)
        for _ in range(2):
            first.step()
        path = ckpt.save_checkpoint(tmp_path / "ck", first.state_dict(), kind="distill", kimg=first.cur_nimg / 1000,
                                    cur_nimg=first.cur_nimg, config={}, network={})
        del first
        state, _ = ckpt.load_checkpoint(path)  # real file round trip, weights_only=True
        resumed = make(cond_teacher, digits, cond=True, **kw)
        resumed.load_state_dict(state)
        assert (resumed.step_idx, resumed.cur_nimg) == (2, 16)
        for _ in range(3):
            resumed.step()
    assert (resumed.step_idx, resumed.cur_nimg) == (full.step_idx, full.cur_nimg)
    assert states_equal(full.state_dict(), resumed.state_dict())  # G, G_ema, psi, both Adams, scalers, progress
    if precision == "fp16":
        assert full.state_dict()["scaler_G"]  # the scaler state really is part of it


# ----------------------------------------------------------------------------------------------- EMA
def test_ema_beta_formula():
    assert ema_beta(8, 1.0, 0, 0.05) == 0.0                       # ramp-up: h = 0 at cur_nimg 0 -> copy G
    assert ema_beta(8, 1.0, 8, 0.05) == 0.5 ** 20                  # h = 0.05 * 8 images after the first step
    assert ema_beta(8, 1.0, 80, 0.05) == pytest.approx(0.5 ** 2)   # h = 4 images = batch / 2
    assert ema_beta(256, 0.5, 10**9, 0.05) == pytest.approx(0.5 ** (256 / 5e5))  # ramp-up over: h = 0.5 Mimg
    assert ema_beta(256, 0.5, 10**9, None) == ema_beta(256, 0.5, 0, None) == pytest.approx(0.5 ** (256 / 5e5))
    assert ema_beta(256, 0.0, 10**9, None) == 0.0                  # no EMA at all


def test_ema_follows_generator_with_rampup_and_lags_later(teacher):
    d = make(teacher, None, method="sid", ema_mimg=1.0, ema_rampup=0.05, psi_grad_clip=None)
    g_prev = snap(d.G)
    ema = snap(d.G_ema)
    assert states_equal(ema, g_prev)  # G_ema starts as a copy of G
    for k in range(1, 7):
        d.step()
        g = snap(d.G)
        beta = ema_beta(8, 1.0, 8 * k, 0.05)
        assert beta == pytest.approx(0.5 ** (20 / k))
        ema = {n: g[n].lerp(ema[n], beta) if g[n].is_floating_point() else g[n] for n in g}
        assert states_equal(ema, snap(d.G_ema))  # exactly the documented recursion
        if k == 1:  # with ramp-up, the first EMA is G itself up to 0.5**20 ~ 1e-6 of the step
            for n in g:
                step_size = (g[n] - g_prev[n]).abs().max()
                ulp = torch.finfo(torch.float32).eps * g[n].abs().max()
                assert (d.G_ema.state_dict()[n] - g[n]).abs().max() <= 1e-6 * step_size + 2 * ulp
        g_prev = g
    lag = max(float((d.G_ema.state_dict()[n] - g[n]).abs().max()) for n in g)
    moved = max(float((g[n] - snap(teacher)[n]).abs().max()) for n in g)
    assert lag > 0.01 * moved  # by step 6 (beta ~ 0.1) the EMA visibly lags G


def test_ema_without_rampup_and_zero_halflife_copies_generator(teacher):
    d = make(teacher, None, method="sid", ema_mimg=0.0, ema_rampup=None, psi_grad_clip=None)
    for _ in range(2):
        d.step()
    assert states_equal(snap(d.G), snap(d.G_ema))


# ----------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_teacher_raises_naming_step_and_generator(teacher, precision):
    nan_teacher = SwitchableNaNTeacher(copy.deepcopy(teacher))
    G, psi = init_networks(teacher)
    d = Distiller(hyper(method="sid", psi_grad_clip=None, precision=precision), nan_teacher, G, psi)
    d.step()
    d.step()
    nan_teacher.poison = True
    with pytest.raises(NonFiniteError) as err:
        d.step()
    msg = str(err.value)
    assert "generator" in msg and "step 2" in msg and "\n" not in msg
    assert all(p.requires_grad for p in d.psi.parameters())  # restored even when the theta step fails
    assert (d.step_idx, d.cur_nimg) == (2, 16)                 # the failed step is not counted


def _cpu_autocast_ok(dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            return nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2)).dtype == dtype
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _cpu_autocast_ok(torch.float16), reason="CPU autocast does not support float16 in this torch")
@pytest.mark.filterwarnings("ignore:fp16 overflow in fake-score update")
def test_fp16_nonfinite_generator_update_is_skipped_and_counted_then_raises(teacher):
    nan_teacher = SwitchableNaNTeacher(copy.deepcopy(teacher))
    nan_teacher.poison = True
    G, psi = init_networks(teacher)
    d = Distiller(hyper(method="sid", psi_grad_clip=None, precision="fp16", max_fp16_skips=2), nan_teacher, G, psi)
    for k in range(2):
        g0 = snap(d.G)
        scale = d.scaler_G.get_scale()
        with pytest.warns(UserWarning, match="fp16 overflow in generator update"):
            st = d.step()
        assert st["G_updated"] == 0.0 and not changed(g0, d.G)  # skipped, not applied
        assert d.scaler_G.get_scale() == scale / 2              # loss scale backed off
        assert d.fp16_skips >= k + 1                             # counted
    # psi keeps updating in between (that must not reset the generator's overflow streak)
    assert st["psi_updated"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NonFiniteError, match="generator: more than 2 consecutive fp16 overflows at step 2"):
            d.step()


@pytest.mark.skipif(not _cpu_autocast_ok(torch.float16), reason="CPU autocast does not support float16 in this torch")
@pytest.mark.filterwarnings("ignore:fp16 overflow in fake-score update")
def test_fp16_genuine_overflow_is_skipped_not_raised(teacher):
    # lambda_sid = 1e9 keeps the fp32 loss finite, but the scaled gradient overflows fp16 in the backward pass
    G, psi = init_networks(teacher)
    d = Distiller(hyper(method="sid", psi_grad_clip=None, precision="fp16", lambda_sid=1e9), teacher, G, psi)
    g0 = snap(d.G)
    with pytest.warns(UserWarning, match="fp16 overflow in generator update at step 0"):
        st = d.step()
    assert math.isfinite(st["loss_G"])
    assert st["G_updated"] == 0.0 and not changed(g0, d.G)
    assert d.scaler_G.get_scale() == 2.0 ** 15 and d.fp16_skips >= 1


# ----------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_step_on_songunet(precision, digits):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if not _cpu_autocast_ok(dtype):
        pytest.skip(f"CPU autocast does not support {dtype} in this torch")
    torch.manual_seed(0)
    t = build_denoiser("songunet", 8, 1, 0, UNET_KW).eval().requires_grad_(False)
    d = make(t, digits, total_batch=4, per_worker=2, precision=precision)  # SiDA stage, 2 accumulation rounds
    p0, g0 = snap(d.psi), snap(d.G)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16: the first update may be skipped at the initial loss scale
        st = d.step()
    assert st["stage"] == "sida"
    for key in ("loss_psi", "loss_G", "loss_sid", "loss_adv_theta", "loss_adv_psi"):
        assert math.isfinite(st[key]), key
    if precision == "bf16":  # no loss scaling: both updates apply
        assert st["psi_updated"] == st["G_updated"] == 1.0
    for key, before, net in (("psi_updated", p0, d.psi), ("G_updated", g0, d.G)):
        assert changed(before, net) == bool(st[key])
        if not st[key]:
            assert d.fp16_skips > 0
    assert all(p.dtype == torch.float32 for p in d.G.parameters())  # master weights stay fp32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sida_step_on_cuda_with_host_real_images(teacher, digits):
    t = copy.deepcopy(teacher).cuda()
    G, psi = init_networks(t)
    d = Distiller(hyper(), t, G, psi, digits.images, None, device="cuda")  # real images stay on the host
    st = d.step()
    assert st["stage"] == "sida" and math.isfinite(st["loss_G"])


# ----------------------------------------------------------------------------------------------- configs / engine
def tiny_overrides(**extra) -> list[str]:
    kw = json.dumps(MLP_KW).replace('"', "")
    items = {"teacher.network.arch": "mlp", "teacher.network.kwargs": kw, "teacher.train.kimg": 1,
             "teacher.train.batch": 64, "batch.total": 32, "batch.per_worker": 16, "stages.fake_score_only_kimg": 0.064,
             "stages.sid_until_kimg": 0.128, "total_kimg": 0.512, "checkpoint_every_kimg": 0.256,
             "log_every_kimg": 0.128, "device": "cpu", "ema.ema_mimg": 0.001}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def tiny_cfg(**extra) -> RunConfig:
    return load_run_config(ROOT / "configs" / "digits.yaml", tiny_overrides(**extra))


def test_sid2a_initialises_generator_from_checkpoint_ema_and_psi_from_teacher(teacher, digits, tmp_path):
    cfg = tiny_cfg(**{"stages.fake_score_only_kimg": 0, "stages.sid_until_kimg": 0})
    spec = network_spec(cfg, digits)
    t = build_from_spec(spec)
    t.load_state_dict(teacher.state_dict())  # same architecture as the config describes
    t.eval().requires_grad_(False)
    d = build_distiller(cfg, t, digits, "cpu")
    for _ in range(2):
        d.step()
    path = save_distill_checkpoint(d, tmp_path, cfg, spec)
    state, manifest = ckpt.load_checkpoint(path)
    assert manifest["kind"] == "distill" and manifest["step"] == 2
    assert not states_equal(state["generator_ema"], state["generator"])  # so the test can tell them apart

    cfg2 = RunConfig.model_validate({**cfg.model_dump(mode="json"), "method": "sid2a", "init_generator": str(path)})
    d2 = build_distiller(cfg2, t, digits, "cpu")
    assert states_equal(snap(d2.G), state["generator_ema"])
    assert states_equal(snap(d2.G_ema), state["generator_ema"])
    assert states_equal(snap(d2.psi), snap(t))
    assert (d2.step_idx, d2.cur_nimg) == (0, 0) and d2.use_adv
    st = d2.step()
    assert st["stage"] == "sida" and "loss_adv_theta" in st


def test_sida_distill_host_end_to_end_rotation_resume_and_afresh(tmp_path):
    """The single-process host of the shared cadence (pipelines.distill) writes the run folder `sida train` writes."""
    from pipelines.distill import run_distill, run_store_of

    cfg = tiny_cfg()
    store = run_store_of(cfg, str(tmp_path / "run"))
    logs: list[str] = []
    scored = []
    out = run_distill(cfg, store, progress=False, log=logs.append,
                      on_checkpoint=lambda name, d: scored.append((name, d.cur_nimg)))
    assert out["kimg"] == 0.512 and out["run_dir"] == store.uri == str(tmp_path / "run")
    assert store.read_config() == cfg.model_dump(mode="json")
    assert store.checkpoint_names() == ["ckpt-000000000256", "ckpt-000000000512"]
    assert out["checkpoint"] == str(tmp_path / "run" / "ckpt-000000000512")
    assert scored == [("ckpt-000000000256", 256), ("ckpt-000000000512", 512)]
    state, manifest = ckpt.load_checkpoint(out["checkpoint"])
    assert (manifest["kind"], manifest["cur_nimg"], manifest["step"], manifest["method"]) == ("distill", 512, 16, "sida")
    assert manifest["config"] == cfg.model_dump(mode="json") and manifest["run"] == "run"
    G = build_from_spec(manifest["network"])
    G.load_state_dict(state["generator_ema"])  # the checkpoint rebuilds the generator
    assert states_equal(snap(G), snap(out["generator_ema"]))
    rows = store.read_metrics().to_pylist()
    assert [r["kimg"] for r in rows] == [0.128, 0.256, 0.384, 0.512]
    assert [r["stage"] for r in rows] == ["sid", "sida", "sida", "sida"] and {r["num_workers"] for r in rows} == {1}
    assert all(math.isfinite(r["loss_psi"]) and math.isfinite(r["loss_G"]) for r in rows)
    assert ckpt.verify_checkpoint(out["teacher"])["kind"] == "teacher"
    assert store.read_status()["state"] == "finished" and store.read_status()["kimg"] == 0.512

    # resume: same run folder, longer run -> continues from kimg 0.512, nothing repeated; keep-last-3 rotation
    cfg2 = tiny_cfg(total_kimg=1.024, keep_checkpoints=3)
    logs.clear()
    out2 = run_distill(cfg2, store, progress=False, log=logs.append)
    assert any(m.startswith("teacher: reusing") for m in logs)
    assert any("resumed from" in m and "ckpt-000000000512" in m and "kimg 0.512" in m for m in logs)
    assert any("rotated away ckpt-000000000256" in m for m in logs)
    assert out2["kimg"] == 1.024
    rows = store.read_metrics().to_pylist()
    assert [r["kimg"] for r in rows] == [0.128, 0.256, 0.384, 0.512, 0.64, 0.768, 0.896, 1.024]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert store.checkpoint_names() == ["ckpt-000000000512", "ckpt-000000000768", "ckpt-000000001024"]
    assert [(e["kind"], e["cur_nimg"]) for e in store.events()] == [
        ("start", 0), ("finished", 512), ("resume", 512), ("finished", 1024)]
    resumed_state, _ = ckpt.load_checkpoint(out2["checkpoint"])

    # an uninterrupted run to the same length ends bit-identically
    straight = run_distill(cfg2, run_store_of(cfg2, str(tmp_path / "straight")), progress=False, log=lambda m: None)
    straight_state, _ = ckpt.load_checkpoint(straight["checkpoint"])
    assert states_equal(resumed_state, straight_state)

    # calling a finished run again does no work and reports its checkpoint
    out3 = run_distill(cfg2, store, progress=False, log=lambda m: None)
    assert out3["kimg"] == 1.024 and out3["checkpoint"] == out2["checkpoint"]
    assert store.read_metrics().num_rows == 8 and len(store.checkpoint_names()) == 3

    # starting afresh (--no-resume) clears the old outputs and ends where the straight run did
    out4 = run_distill(cfg2, store, resume=False, progress=False, log=logs.append)
    assert any("afresh" in m for m in logs)
    assert [e["kind"] for e in store.events()] == ["start", "finished"]
    assert states_equal(ckpt.load_checkpoint(out4["checkpoint"])[0], straight_state)
    assert store.read_metrics().num_rows == 8



# ------------------------------------------------------------------- config -> step hyper-parameters, psi clip
def test_hyper_from_config_maps_every_field_to_its_own_source():
    """Each StepHyper field reads its own config field: distinct values everywhere, so a swap (lr_psi <-> lr_theta,
    beta1 <-> beta2, lambda_adv_theta <-> lambda_adv_psi ...) or a dropped field fails."""
    from sida_core.distill import hyper_from_config

    sets = {"loss.alpha": 1.3, "loss.lambda_sid": 90.0, "loss.lambda_adv_theta": 0.02, "loss.lambda_adv_psi": 0.7,
            "loss.sigma_init": 2.1, "loss.t_max": 700, "loss.p_mean": -1.1, "loss.p_std": 1.4,
            "stages.fake_score_only_kimg": 3, "stages.sid_until_kimg": 7, "optimizer.lr_psi": 3e-4,
            "optimizer.lr_theta": 2e-4, "optimizer.beta1": 0.1, "optimizer.beta2": 0.98, "optimizer.eps": 1e-7,
            "batch.total": 96, "batch.per_worker": 16, "ema.ema_mimg": 0.02, "ema.rampup": 0.03, "seed": 11,
            "precision": "bf16", "data.xflip": True}
    cfg = load_run_config(ROOT / "configs" / "digits.yaml", [f"{k}={v}" for k, v in sets.items()])
    h = hyper_from_config(cfg)
    expected = dict(method="sida", alpha=1.3, lambda_sid=90.0, lambda_adv_theta=0.02, lambda_adv_psi=0.7,
                    sigma_init=2.1, t_max=700, p_mean=-1.1, p_std=1.4, fake_score_only_kimg=3, sid_until_kimg=7,
                    lr_psi=3e-4, lr_theta=2e-4, betas=(0.1, 0.98), eps=1e-7, total_batch=96, per_worker=16,
                    ema_mimg=0.02, ema_rampup=0.03, seed=11, precision="bf16", xflip=True, psi_grad_clip=1.0)
    got = {k: getattr(h, k) for k in expected}
    assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert h.performance.single_psi_forward and h.performance.adam == "fused" and h.performance.channels_last


@pytest.mark.parametrize("method, value, expected", [("sida", None, 1.0), ("sid", None, None), ("sida", 0.25, 0.25),
                                                     ("sid", 0.5, 0.5)])
def test_psi_grad_clip_defaults_to_one_when_psi_is_adversarial(method, value, expected):
    """SPEC: the fake-score/discriminator update is clipped at 1.0 when its adversarial term is on (SiDA), not in
    SiD; optimizer.grad_clip_value overrides both."""
    sets = [f"method={method}"] + ([f"optimizer.grad_clip_value={value}"] if value is not None else [])
    assert load_run_config(ROOT / "configs" / "digits.yaml", sets).psi_grad_clip == expected


@pytest.mark.parametrize("clip", [1e-5, None])
def test_psi_gradients_are_clipped_elementwise_before_the_update(teacher, digits, clip):
    """After a fake-score-only step psi's gradients are left in place: with a clip every element is within
    [-clip, clip] and some sit on the bound; without one, some exceed it (so the first case is not vacuous)."""
    d = make(teacher, digits, psi_grad_clip=clip, fake_score_only_kimg=1.0)
    d.step()
    g = torch.cat([p.grad.flatten() for p in d.psi.parameters() if p.grad is not None])
    assert g.numel() > 0 and torch.isfinite(g).all()
    if clip is None:
        assert (g.abs() > 1e-5).any()
    else:
        assert (g.abs() <= clip).all() and (g.abs() == clip).any()
