"""Independent checks of sida_core/losses.py against SPEC.md and the SiDA paper (eqs. 5-10, Algorithm 1).

The networks are tiny deterministic stand-ins with the denoiser signature ``net(x, sigma, labels, return_flag)``.
A seeded ``torch.Generator`` is passed to each loss; the test replays the same draws in the order the code
makes them, then computes the expected loss in float64 with explicit numpy loops written from the SPEC formulas.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from sida_core import losses
from sida_core.losses import EDMLoss, FakeScoreLoss, GeneratorLoss, Stage
from sida_core.methods import get_method

B, C, H, W = 4, 2, 4, 4
CHW = C * H * W
SIGMA_DATA = 0.5


# --------------------------------------------------------------------------------------------------
# helpers: stand-in networks and float64 reference math
# --------------------------------------------------------------------------------------------------
class StandIn:
    """y = dec(x, sigma); logits = k * avgpool2x2(channel_mean(x)) + offset_i (a B x 1 x H/2 x W/2 map).

    Records every call (input, sigma, labels, return_flag).
    """

    def __init__(self, dec, k=1.0, offsets=None):
        self.dec, self.k = dec, k
        self.offsets = offsets
        self.calls = []

    def logits(self, x):
        lm = self.k * F.avg_pool2d(x.float().mean(dim=1, keepdim=True), 2)
        if self.offsets is not None:
            lm = lm + torch.as_tensor(self.offsets, dtype=lm.dtype).reshape(-1, 1, 1, 1)
        return lm

    def __call__(self, x, sigma, labels=None, return_flag="decoder"):
        self.calls.append(dict(x=x.detach().clone(), sigma=torch.as_tensor(sigma).detach().clone(), labels=labels,
                               flag=return_flag))
        if return_flag == "encoder":
            return self.logits(x)
        y = self.dec(x, torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1))
        if return_flag == "decoder":
            return y
        assert return_flag == "encoder_decoder"
        return y, self.logits(x)


def np_logit_map(x: np.ndarray, k: float, offsets=None) -> np.ndarray:
    b, c, h, w = x.shape
    out = np.zeros((b, 1, h // 2, w // 2))
    for i in range(b):
        for p in range(h // 2):
            for q in range(w // 2):
                acc = 0.0
                for ch in range(c):
                    for dy in range(2):
                        for dx in range(2):
                            acc += x[i, ch, 2 * p + dy, 2 * q + dx]
                out[i, 0, p, q] = k * acc / (4 * c) + (0.0 if offsets is None else offsets[i])
    return out


def softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def bce_mean(logit_map: np.ndarray, target: float) -> float:
    """Mean over every element of BCE-with-logits: target 1 -> ln(1+e^-l) = -ln sigmoid(l); target 0 -> ln(1+e^l)."""
    vals = [softplus(-l) if target == 1.0 else softplus(l) for l in logit_map.reshape(-1).tolist()]
    return sum(vals) / len(vals)


def sid_sigma_np(t: np.ndarray) -> np.ndarray:
    a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    return (a + (1 - t) * (b - a)) ** 7


def gamma_np(s: float) -> float:
    return (s * s + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


def replay_generator_draws(seed, t_max=800.0, shape=(B, C, H, W)):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape[0], generator=g)            # t ~ U[0, 1) * t_max/1000   (edm.sample_sid_sigma)
    eps = torch.randn(shape, generator=g)            # eps for x_t = x_g + sigma eps
    t = u.double().numpy() * (t_max / 1000.0)
    return sid_sigma_np(t), eps.double().numpy()


def replay_training_draws(seed, p_mean=-1.2, p_std=1.2, shape=(B, C, H, W)):
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(shape[0], generator=g)         # ln sigma ~ N(P_mean, P_std^2)
    eps = torch.randn(shape, generator=g)
    sigma = np.exp(rnd.double().numpy() * p_std + p_mean)
    return sigma, eps.double().numpy()


def make_x(seed, shape=(B, C, H, W)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# teacher depends on sigma (checks that the sigma handed to the nets is the one used for the noise)
def teacher_dec(x, s):
    return x / (1.0 + 0.1 * s)


def teacher_np(x, s):
    return x / (1.0 + 0.1 * s)


def fake_dec(x, s):
    return 0.3 * x + 0.1


def fake_np(x, s):
    return 0.3 * x + 0.1


def sid_reference(xg, xt, sigma, alpha, lam):
    """Per-sample SiD loss in the two SPEC forms (pixel-loop form and paper's norm/inner-product form)."""
    b = xg.shape[0]
    direct, paper, ws = np.zeros(b), np.zeros(b), np.zeros(b)
    for i in range(b):
        yr = teacher_np(xt[i], sigma[i])
        yf = fake_np(xt[i], sigma[i])
        w = max(np.abs(xg[i] - yr).mean(), 1e-5)
        acc = 0.0
        for v_yr, v_yf, v_xg in zip(yr.reshape(-1), yf.reshape(-1), xg[i].reshape(-1)):
            acc += (v_yr - v_yf) * ((v_yr - v_xg) - alpha * (v_yr - v_yf))
        direct[i] = lam * acc / w
        d = (yr - yf).reshape(-1)
        paper[i] = lam * ((1 - alpha) * float(d @ d) + float(d @ (yf - xg[i]).reshape(-1))) / w
        ws[i] = w
    return direct, paper, ws


# --------------------------------------------------------------------------------------------------
# SiD generator loss (eq. 6, Algorithm 1 lines 11-15)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 1.2, 0.0])
@pytest.mark.parametrize("lam", [100.0, 3.0])
def test_sid_generator_loss_hand_value(alpha, lam):
    xg_t = make_x(1)
    teacher, fake = StandIn(teacher_dec), StandIn(fake_dec)
    loss_fn = GeneratorLoss(alpha=alpha, lambda_sid=lam, lambda_adv_theta=0.01, t_max=800.0)
    loss, _ = loss_fn(teacher, fake, xg_t, None, w_sid=1.0, w_adv=0.0, generator=torch.Generator().manual_seed(5))
    assert loss.shape == (B,)

    sigma, eps = replay_generator_draws(5)
    xg = xg_t.double().numpy()
    xt = xg + sigma[:, None, None, None] * eps
    direct, paper, _ = sid_reference(xg, xt, sigma, alpha, lam)
    np.testing.assert_allclose(direct, paper, rtol=1e-10)          # the two SPEC forms agree
    np.testing.assert_allclose(loss.detach().double().numpy(), direct, rtol=2e-4, atol=1e-6 * lam)


def test_generator_loss_calls_both_nets_on_the_same_x_t():
    xg_t = make_x(2)
    labels = torch.eye(10)[[1, 3, 5, 7]]
    teacher, fake = StandIn(teacher_dec), StandIn(fake_dec, offsets=[0.0] * B)
    GeneratorLoss()(teacher, fake, xg_t, labels, w_sid=0.5, w_adv=0.5, generator=torch.Generator().manual_seed(9))
    sigma, eps = replay_generator_draws(9)
    xt = xg_t.double().numpy() + sigma[:, None, None, None] * eps
    assert len(teacher.calls) == 1 and len(fake.calls) == 1          # psi: ONE encoder_decoder pass
    assert teacher.calls[0]["flag"] == "decoder"
    assert fake.calls[0]["flag"] == "encoder_decoder"
    for rec in (teacher.calls[0], fake.calls[0]):
        np.testing.assert_allclose(rec["x"].double().numpy(), xt, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rec["sigma"].double().numpy(), sigma, rtol=1e-5)
        assert rec["labels"] is labels
    assert sigma.max() <= sid_sigma_np(np.array(0.8)) * (1 + 1e-6)


def test_generator_loss_sid_stage_uses_decoder_only():
    teacher, fake = StandIn(teacher_dec), StandIn(fake_dec)
    GeneratorLoss()(teacher, fake, make_x(3), None, w_sid=1.0, w_adv=0.0, generator=torch.Generator().manual_seed(1))
    assert [c["flag"] for c in fake.calls] == ["decoder"]


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.2])
def test_sid_gradient_with_constant_nets_is_minus_lambda_fphi_minus_fpsi_over_w(alpha):
    """With f_phi, f_psi not depending on x, d L_sid,i / d x_g,i = -lambda_sid (f_phi - f_psi) / w_i for any alpha:
    a gradient step moves x_g towards the teacher's denoised output and away from the fake score's."""
    A = make_x(10)        # teacher output
    Bf = make_x(11)       # fake-score output
    teacher = StandIn(lambda x, s: A.clone())
    fake = StandIn(lambda x, s: Bf.clone())
    xg = make_x(12).requires_grad_(True)
    lam = 100.0
    loss, _ = GeneratorLoss(alpha=alpha, lambda_sid=lam)(teacher, fake, xg, None, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    xg_np, A_np, B_np = xg.detach().double().numpy(), A.double().numpy(), Bf.double().numpy()
    expected = np.zeros_like(xg_np)
    for i in range(B):
        w = max(np.abs(xg_np[i] - A_np[i]).mean(), 1e-5)   # stop-gradient normaliser: no gradient through w
        expected[i] = -lam * (A_np[i] - B_np[i]) / w
    np.testing.assert_allclose(xg.grad.double().numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_sid_gradient_flows_through_net_inputs(alpha):
    """Linear stand-ins y_real = a x_t, y_fake = b x_t, x_t = x_g + n: per pixel
    d/dx_g [(a-b) x_t ((a x_t - x_g) - alpha (a-b) x_t)] / w
        = (a-b)/w [ (a x_t - x_g) - alpha (a-b) x_t + x_t ((a - 1) - alpha (a-b)) ]   (w held fixed)."""
    a, b, lam = 0.8, 0.35, 2.0
    teacher = StandIn(lambda x, s: a * x)
    fake = StandIn(lambda x, s: b * x)
    xg = make_x(20).requires_grad_(True)
    loss, _ = GeneratorLoss(alpha=alpha, lambda_sid=lam)(teacher, fake, xg, None, generator=torch.Generator().manual_seed(4))
    loss.sum().backward()
    sigma, eps = replay_generator_draws(4)
    x = xg.detach().double().numpy()
    xt = x + sigma[:, None, None, None] * eps
    expected = np.zeros_like(x)
    for i in range(B):
        w = max(np.abs(x[i] - a * xt[i]).mean(), 1e-5)
        expected[i] = lam * (a - b) / w * ((a * xt[i] - x[i]) - alpha * (a - b) * xt[i]
                                           + xt[i] * ((a - 1) - alpha * (a - b)))
    np.testing.assert_allclose(xg.grad.double().numpy(), expected, rtol=2e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# SiDA generator loss (eqs. 7-8)
# --------------------------------------------------------------------------------------------------
OFFSETS = [12.0, -11.0, 0.3, -0.7]   # first two push the logits beyond the +-10 clamp


def test_sida_generator_loss_hand_value():
    alpha, lam_sid, lam_adv, k = 1.0, 100.0, 0.01, 1.5
    xg_t = make_x(30)
    teacher, fake = StandIn(teacher_dec), StandIn(fake_dec, k=k, offsets=OFFSETS)
    loss_fn = GeneratorLoss(alpha=alpha, lambda_sid=lam_sid, lambda_adv_theta=lam_adv)
    loss, _ = loss_fn(teacher, fake, xg_t, None, w_sid=0.5, w_adv=0.5, generator=torch.Generator().manual_seed(31))

    sigma, eps = replay_generator_draws(31)
    xg = xg_t.double().numpy()
    xt = xg + sigma[:, None, None, None] * eps
    l_sid, _, w = sid_reference(xg, xt, sigma, alpha, lam_sid)
    lmap = np.clip(np_logit_map(xt, k, OFFSETS), -10, 10)
    a = bce_mean(lmap, 1.0)                      # ONE fakeness for the whole micro-batch (and the map)
    l_adv = lam_adv * CHW * a / w
    expected = 0.5 * l_sid + 0.5 * l_adv
    np.testing.assert_allclose(loss.detach().double().numpy(), expected, rtol=2e-4, atol=1e-5)
    # the clamp matters for these logits (sanity of the test itself)
    assert abs(bce_mean(np_logit_map(xt, k, OFFSETS), 1.0) - a) > 1e-3


def test_sida_adversarial_term_clamps_logits_at_10():
    """a = BCE(clamp(l, -10, 10), 1): logits far outside +-10 count as exactly +-10."""
    lam_adv, k = 0.01, 1e-3
    offsets = [40.0, -25.0, -12.0, 0.5]
    xg_t = make_x(34)
    teacher, fake = StandIn(teacher_dec), StandIn(fake_dec, k=k, offsets=offsets)
    loss, _ = GeneratorLoss(lambda_adv_theta=lam_adv)(teacher, fake, xg_t, None, w_sid=0.0, w_adv=1.0,
                                                     generator=torch.Generator().manual_seed(35))
    sigma, eps = replay_generator_draws(35)
    xg = xg_t.double().numpy()
    xt = xg + sigma[:, None, None, None] * eps
    raw = np_logit_map(xt, k, offsets)
    assert raw[0].min() > 10 and raw[1].max() < -10 and raw[2].max() < -10 and abs(raw[3]).max() < 10
    a = bce_mean(np.clip(raw, -10, 10), 1.0)
    assert abs(a - bce_mean(raw, 1.0)) > 0.5          # premise: unclamped value is very different
    for i in range(B):
        w = max(np.abs(xg[i] - teacher_np(xt[i], sigma[i])).mean(), 1e-5)
        assert loss[i].item() == pytest.approx(lam_adv * CHW * a / w, rel=2e-4)


def test_sida_adversarial_term_alone_hand_value():
    lam_adv, k = 0.01, 1.0
    xg_t = make_x(32)
    teacher, fake = StandIn(teacher_dec), StandIn(fake_dec, k=k, offsets=[0.5, -0.5, 1.0, 2.0])
    loss, _ = GeneratorLoss(lambda_adv_theta=lam_adv)(teacher, fake, xg_t, None, w_sid=0.0, w_adv=1.0,
                                                     generator=torch.Generator().manual_seed(33))
    sigma, eps = replay_generator_draws(33)
    xg = xg_t.double().numpy()
    xt = xg + sigma[:, None, None, None] * eps
    lmap = np_logit_map(xt, k, [0.5, -0.5, 1.0, 2.0])
    a = 0.0
    for i in range(B):
        for p in range(2):
            for q in range(2):
                a += -math.log(1.0 / (1.0 + math.exp(-lmap[i, 0, p, q])))   # -ln D, D = sigmoid(l)
    a /= B * 4
    for i in range(B):
        yr = teacher_np(xt[i], sigma[i])
        w = max(np.abs(xg[i] - yr).mean(), 1e-5)
        assert loss[i].item() == pytest.approx(lam_adv * C * H * W * a / w, rel=2e-4)


def test_sida_fakeness_is_shared_across_the_micro_batch():
    xg_t = make_x(40)
    teacher = StandIn(teacher_dec)
    o1 = [0.2, -0.3, 0.4, 0.1]
    o2 = [3.0, -0.3, 0.4, 0.1]          # only sample 0's logits change
    l1, _ = GeneratorLoss()(teacher, StandIn(fake_dec, offsets=o1), xg_t, None, w_sid=0.0, w_adv=1.0,
                            generator=torch.Generator().manual_seed(41))
    l2, _ = GeneratorLoss()(teacher, StandIn(fake_dec, offsets=o2), xg_t, None, w_sid=0.0, w_adv=1.0,
                            generator=torch.Generator().manual_seed(41))
    # every sample's adversarial term changed, by the same factor (a is shared; only 1/w_i differs per sample)
    assert (torch.abs(l1 - l2) > 1e-6 * l1.abs()).all()
    ratio = (l2 / l1).double()
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-5, atol=0)
    # l_i * w_i is the same for every sample
    sigma, eps = replay_generator_draws(41)
    xg = xg_t.double().numpy()
    xt = xg + sigma[:, None, None, None] * eps
    w = np.array([max(np.abs(xg[i] - teacher_np(xt[i], sigma[i])).mean(), 1e-5) for i in range(B)])
    prod = l1.double().numpy() * w
    np.testing.assert_allclose(prod, np.full(B, prod[0]), rtol=1e-4)


def test_sida_adversarial_gradient_through_input_and_clamp():
    """logit map l_i = k * mean(x_t,i) (1x1 map): dL/dx_g,i = -lam CHW S k sigmoid(-l_i) / (B CHW), S = sum_j 1/w_j,
    and zero where the logit is clamped."""
    lam, k = 0.01, 0.05
    offsets = [0.0, 0.5, -15.0, -1.0]    # sample 2 is beyond the clamp (unclamped, its gradient would be large)
    A = make_x(50)

    class Const1x1(StandIn):
        def logits(self, x):
            return self.k * x.float().mean(dim=(1, 2, 3), keepdim=True) + torch.tensor(offsets).reshape(-1, 1, 1, 1)

    teacher = StandIn(lambda x, s: A.clone())           # constant teacher -> w_i fixed by x_g
    fake = Const1x1(lambda x, s: torch.zeros_like(x), k=k)
    xg = make_x(51).requires_grad_(True)
    loss, _ = GeneratorLoss(lambda_adv_theta=lam)(teacher, fake, xg, None, w_sid=0.0, w_adv=1.0,
                                                  generator=torch.Generator().manual_seed(52))
    loss.sum().backward()
    sigma, eps = replay_generator_draws(52)
    x = xg.detach().double().numpy()
    xt = x + sigma[:, None, None, None] * eps
    S = sum(1.0 / max(np.abs(x[j] - A.double().numpy()[j]).mean(), 1e-5) for j in range(B))
    for i in range(B):
        l = k * xt[i].mean() + offsets[i]
        assert (abs(l) > 10) == (i == 2)     # premise of the test
        g = 0.0 if abs(l) > 10 else -lam * S * k * (1.0 / (1.0 + math.exp(l))) / B
        np.testing.assert_allclose(xg.grad[i].double().numpy(), np.full((C, H, W), g), rtol=1e-4, atol=1e-9)
    assert xg.grad[0].abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Fake-score loss (eqs. 5, 9, 10)
# --------------------------------------------------------------------------------------------------
def psi_dec(x, s):
    return x / (1.0 + s * s) - 0.05


def psi_np(x, s):
    return x / (1.0 + s * s) - 0.05


def test_fake_score_loss_sid_hand_value():
    xg_t = make_x(60)
    psi = StandIn(psi_dec)
    loss, _ = FakeScoreLoss(use_adv=False)(psi, xg_t, None, generator=torch.Generator().manual_seed(61))
    assert [c["flag"] for c in psi.calls] == ["decoder"]
    sigma, eps = replay_training_draws(61)
    xg = xg_t.double().numpy()
    for i in range(B):
        xt = xg[i] + sigma[i] * eps[i]
        sq = 0.0
        for v_y, v_x in zip(psi_np(xt, sigma[i]).reshape(-1), xg[i].reshape(-1)):
            sq += (v_y - v_x) ** 2
        assert loss[i].item() == pytest.approx(gamma_np(sigma[i]) * sq, rel=2e-4)


@pytest.mark.parametrize("lam_psi", [1.0, 100.0])
def test_fake_score_loss_sida_hand_value_and_shared_noise(lam_psi):
    k = 1.3
    xg_t, xr_t = make_x(70), make_x(71) * 0.5 + 0.2
    labels, real_labels = torch.eye(10)[[0, 1, 2, 3]], torch.eye(10)[[4, 5, 6, 7]]
    psi = StandIn(psi_dec, k=k, offsets=[0.1, -0.2, 0.3, 0.0])
    loss, stats = FakeScoreLoss(lambda_adv_psi=lam_psi, p_mean=-1.2, p_std=1.2, use_adv=True)(
        psi, xg_t, labels, x_real=xr_t, real_labels=real_labels, generator=torch.Generator().manual_seed(72))
    assert loss.shape == (B,)

    sigma, eps = replay_training_draws(72)
    xg, xr = xg_t.double().numpy(), xr_t.double().numpy()
    n = sigma[:, None, None, None] * eps
    # calls: one encoder_decoder pass on the fakes, one encoder pass on the reals with the SAME n and sigma
    assert [c["flag"] for c in psi.calls] == ["encoder_decoder", "encoder"]
    fake_call, real_call = psi.calls
    np.testing.assert_allclose(fake_call["x"].double().numpy(), xg + n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(real_call["x"].double().numpy(), xr + n, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(real_call["sigma"].double().numpy(), sigma, rtol=1e-5)
    np.testing.assert_allclose(fake_call["sigma"].double().numpy(), sigma, rtol=1e-5)
    assert fake_call["labels"] is labels and real_call["labels"] is real_labels

    l_fake = np_logit_map(xg + n, k, [0.1, -0.2, 0.3, 0.0])
    l_real = np_logit_map(xr + n, k, [0.1, -0.2, 0.3, 0.0])
    adv = (bce_mean(l_real, 1.0) + bce_mean(l_fake, 0.0)) / 2
    # same thing written as eq. 10: -(1/2|B|W'H') sum [ln D(y_t) + ln(1 - D(x_t))], D = sigmoid
    adv_eq10 = 0.0
    for i in range(B):
        for p in range(2):
            for q in range(2):
                adv_eq10 -= math.log(1 / (1 + math.exp(-l_real[i, 0, p, q]))) + math.log(1 - 1 / (1 + math.exp(-l_fake[i, 0, p, q])))  # noqa: E501
    adv_eq10 /= 2 * B * 4
    assert adv == pytest.approx(adv_eq10, rel=1e-10)
    for i in range(B):
        sq = float(((psi_np(xg[i] + n[i], sigma[i]) - xg[i]) ** 2).sum())
        expected = gamma_np(sigma[i]) * (sq + lam_psi * adv)
        assert loss[i].item() == pytest.approx(expected, rel=2e-4)
    assert stats["loss_adv_psi"].item() == pytest.approx(adv, rel=1e-4)


def test_fake_score_loss_does_not_backprop_into_x_g():
    class Param(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor(0.7))

        def forward(self, x, sigma, labels=None, return_flag="decoder"):
            y = self.c * x
            l = self.c * x.mean(dim=(1, 2, 3), keepdim=True)
            return {"decoder": y, "encoder": l, "encoder_decoder": (y, l)}[return_flag]

    net = Param()
    xg = make_x(80).requires_grad_(True)
    loss, _ = FakeScoreLoss(use_adv=True)(net, xg, None, x_real=make_x(81), generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    assert xg.grad is None
    assert net.c.grad is not None and torch.isfinite(net.c.grad)


def test_fake_score_loss_adv_requires_real_batch():
    with pytest.raises(ValueError):
        FakeScoreLoss(use_adv=True)(StandIn(psi_dec), make_x(0), None)


def test_fake_score_loss_other_p_mean_p_std():
    xg_t = make_x(90)
    psi = StandIn(psi_dec)
    loss, _ = FakeScoreLoss(p_mean=-0.4, p_std=1.0, use_adv=False)(psi, xg_t, None, generator=torch.Generator().manual_seed(91))
    sigma, eps = replay_training_draws(91, p_mean=-0.4, p_std=1.0)
    xg = xg_t.double().numpy()
    for i in range(B):
        xt = xg[i] + sigma[i] * eps[i]
        sq = float(((psi_np(xt, sigma[i]) - xg[i]) ** 2).sum())
        assert loss[i].item() == pytest.approx(gamma_np(sigma[i]) * sq, rel=2e-4)


# --------------------------------------------------------------------------------------------------
# EDM loss (teacher training)
# --------------------------------------------------------------------------------------------------
def test_edm_loss_hand_value():
    x_t = make_x(100)
    net = StandIn(lambda x, s: 0.5 * x)
    loss = EDMLoss()(net, x_t, None, generator=torch.Generator().manual_seed(101))
    assert loss.shape == (B,)
    sigma, eps = replay_training_draws(101)
    x = x_t.double().numpy()
    for i in range(B):
        sq = 0.0
        for v_x, v_e in zip(x[i].reshape(-1), eps[i].reshape(-1)):
            sq += (0.5 * (v_x + sigma[i] * v_e) - v_x) ** 2
        assert loss[i].item() == pytest.approx((sigma[i] ** 2 + 0.25) / (0.25 * sigma[i] ** 2) * sq, rel=2e-4)


# --------------------------------------------------------------------------------------------------
# generate()
# --------------------------------------------------------------------------------------------------
def test_generate_is_denoiser_at_sigma_init():
    z = make_x(110)
    labels = torch.eye(10)[[0, 0, 1, 1]]
    g = StandIn(lambda x, s: x * 0 + s)
    out = losses.generate(g, z, labels, 2.5)
    call = g.calls[0]
    torch.testing.assert_close(call["x"], 2.5 * z)
    torch.testing.assert_close(call["sigma"].reshape(-1).float(), torch.full((B,), 2.5))
    assert call["labels"] is labels and call["flag"] == "decoder"
    torch.testing.assert_close(out, torch.full_like(z, 2.5))


# --------------------------------------------------------------------------------------------------
# stages and weights
# --------------------------------------------------------------------------------------------------
def stage_at(n: int, method: str, fake_score_only_kimg: float, sid_until_kimg: float) -> Stage:
    return get_method(method).stage_at(n, fake_score_only_kimg, sid_until_kimg)


@pytest.mark.parametrize("method", ["sida", "sid2a"])
def test_stage_boundaries_sida(method):
    f = lambda n: stage_at(n, method, 100, 200)  # noqa: E731
    assert f(0) is Stage.FAKE_SCORE
    assert f(99_999) is Stage.FAKE_SCORE
    assert f(100_000) is Stage.SID
    assert f(199_999) is Stage.SID
    assert f(200_000) is Stage.SIDA
    assert f(10**9) is Stage.SIDA


def test_stage_sid_never_adversarial():
    f = lambda n: stage_at(n, "sid", 100, 200)  # noqa: E731
    assert f(99_999) is Stage.FAKE_SCORE
    assert f(100_000) is Stage.SID
    assert f(200_000) is Stage.SID
    assert f(10**10) is Stage.SID


def test_stage_custom_boundaries():
    assert stage_at(0, "sida", 0, 0) is Stage.SIDA
    assert stage_at(0, "sida", 0, 10) is Stage.SID
    assert stage_at(49_999, "sida", 50, 60) is Stage.FAKE_SCORE
    assert stage_at(50_000, "sida", 50, 60) is Stage.SID
    assert stage_at(60_000, "sida", 50, 60) is Stage.SIDA
    assert stage_at(1_499, "sid2a", 1.5, 2.5) is Stage.FAKE_SCORE
    assert stage_at(1_500, "sid2a", 1.5, 2.5) is Stage.SID
    assert stage_at(2_500, "sid2a", 1.5, 2.5) is Stage.SIDA


def test_sid2a_same_as_sida():
    for n in [0, 50_000, 99_999, 100_000, 150_000, 199_999, 200_000, 5_000_000]:
        assert stage_at(n, "sid2a", 100, 200) is stage_at(n, "sida", 100, 200)


def test_generator_weights():
    assert losses.generator_weights(Stage.FAKE_SCORE) == (0.0, 0.0)
    assert losses.generator_weights(Stage.SID) == (1.0, 0.0)
    assert losses.generator_weights(Stage.SIDA) == (0.5, 0.5)


def test_adversarial_psi_per_method():
    assert get_method("sida").adversarial_psi is True
    assert get_method("sid2a").adversarial_psi is True
    assert get_method("sid").adversarial_psi is False


@pytest.mark.parametrize("bad", ["SiDA", "gan", "", "dmd", None])
def test_unknown_method_raises(bad):
    with pytest.raises(ValueError, match="method must be one of 'sid', 'sida', 'sid2a'"):
        get_method(bad)
