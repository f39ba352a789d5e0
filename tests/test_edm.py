"""Independent checks of sida_core/edm.py against SPEC.md ("Networks", "Fake-score step", "Generator step").

Expected values are literal numbers worked out by hand (or plain-Python float64 math written from the SPEC
formulas), never by calling the implementation's own expression.
"""
from __future__ import annotations

import math

import pytest
import torch

from sida_core import edm


# --------------------------------------------------------------------------------------------------
# Preconditioning coefficients (sigma_data = 0.5)
# --------------------------------------------------------------------------------------------------
# Hand values:
#   sigma = 0.5: s^2 + sd^2 = 0.5 -> c_skip = 0.25/0.5 = 0.5, c_out = 0.25/sqrt(0.5) = 0.35355339,
#                c_in = 1/sqrt(0.5) = 1.41421356, c_noise = ln(0.5)/4 = -0.17328680
#   sigma = 1.0: s^2 + sd^2 = 1.25 -> c_skip = 0.2, c_out = 0.5/sqrt(1.25) = 0.44721360,
#                c_in = 1/sqrt(1.25) = 0.89442719, c_noise = 0
#   sigma = 2.0: s^2 + sd^2 = 4.25 -> c_skip = 0.25/4.25 = 0.05882353, c_out = 1/sqrt(4.25) = 0.48507125,
#                c_in = 0.48507125, c_noise = ln(2)/4 = 0.17328680
#   sigma = 80 : s^2 + sd^2 = 6400.25 -> c_skip = 3.9061e-5, c_out = 40/80.0015625 = 0.49999023,
#                c_in = 1/80.0015625 = 0.01249976, c_noise = ln(80)/4 = 1.09550666
HAND_PRECOND = [
    (0.5, 0.5, 0.35355339059327373, 1.4142135623730951, -0.17328679513998632),
    (1.0, 0.2, 0.4472135954999579, 0.8944271909999159, 0.0),
    (2.0, 0.058823529411764705, 0.48507125007266594, 0.48507125007266594, 0.17328679513998632),
    (80.0, 3.906097418069607e-05, 0.49999023466109294, 0.012499755866527323, 1.0955066586684703),
]


@pytest.mark.parametrize("sigma, c_skip, c_out, c_in, c_noise", HAND_PRECOND)
def test_precond_coefficients_hand_values(sigma, c_skip, c_out, c_in, c_noise):
    got = edm.precond_coefficients(torch.tensor([sigma], dtype=torch.float64), 0.5)
    for name, g, e in zip(("c_skip", "c_out", "c_in", "c_noise"), got, (c_skip, c_out, c_in, c_noise)):
        assert g.item() == pytest.approx(e, rel=1e-9, abs=1e-12), name


def test_precond_coefficients_identities():
    # c_skip + (c_out / sd)^2 == 1 and c_in^2 (s^2 + sd^2) == 1: unit-variance training target (EDM app. B.6).
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.3, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precond_coefficients(sigma)
    for i, s in enumerate(sigma.tolist()):
        assert c_skip[i].item() + (c_out[i].item() / 0.5) ** 2 == pytest.approx(1.0, rel=1e-12)
        assert c_in[i].item() ** 2 * (s * s + 0.25) == pytest.approx(1.0, rel=1e-12)
        assert c_noise[i].item() == pytest.approx(math.log(s) / 4, rel=1e-12, abs=1e-15)
    # c_skip -> 1, c_out -> 0 as sigma -> 0 (denoiser is the identity at zero noise)
    assert c_skip[0].item() == pytest.approx(1.0, abs=2e-5)
    assert c_out[0].item() == pytest.approx(0.002, rel=1e-4)


def test_precond_coefficients_other_sigma_data():
    # sigma_data = 1, sigma = 1: c_skip = 1/2, c_out = 1/sqrt(2), c_in = 1/sqrt(2)
    c_skip, c_out, c_in, c_noise = edm.precond_coefficients(torch.tensor([1.0], dtype=torch.float64), 1.0)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(0.7071067811865476)
    assert c_in.item() == pytest.approx(0.7071067811865476)
    assert c_noise.item() == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# gamma(sigma) = (s^2 + sd^2) / (s sd)^2
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma, expected", [
    (0.5, 8.0),        # 0.5 / 0.0625
    (1.0, 5.0),        # 1.25 / 0.25
    (2.0, 4.25),       # 4.25 / 1
    (0.1, 104.0),      # 0.26 / 0.0025
    (80.0, 4.00015625),  # 6400.25 / 1600
])
def test_gamma_weight_hand_values(sigma, expected):
    got = edm.gamma_weight(torch.tensor([sigma], dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_gamma_weight_is_edm_lambda_times_unit_target():
    # gamma(sigma) * c_out(sigma)^2 == 1 (EDM's lambda makes the effective F-target loss unweighted)
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    _, c_out, _, _ = edm.precond_coefficients(sigma)
    torch.testing.assert_close(edm.gamma_weight(sigma) * c_out**2, torch.ones_like(sigma), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------------
# Training sigma (lognormal) draw
# --------------------------------------------------------------------------------------------------
def test_sample_training_sigma_reproduces_lognormal_draw():
    g = torch.Generator().manual_seed(123)
    got = edm.sample_training_sigma(7, -1.2, 1.2, generator=g)
    g2 = torch.Generator().manual_seed(123)
    rnd = torch.randn(7, generator=g2).tolist()
    for i, r in enumerate(rnd):
        assert got[i].item() == pytest.approx(math.exp(r * 1.2 - 1.2), rel=1e-6)
    assert got.shape == (7,)
    assert (got > 0).all()


def test_sample_training_sigma_statistics():
    g = torch.Generator().manual_seed(0)
    s = edm.sample_training_sigma(200_000, -0.4, 1.0, generator=g).double().log()
    assert s.mean().item() == pytest.approx(-0.4, abs=0.01)
    assert s.std().item() == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------------------------------
# SiD sigma(t) schedule
# --------------------------------------------------------------------------------------------------
def _sigma_t_hand(t: float) -> float:
    a = 80.0 ** (1 / 7)
    b = 0.002 ** (1 / 7)
    return (a + (1 - t) * (b - a)) ** 7


def test_sid_sigma_endpoints_and_t_max():
    t = torch.tensor([0.0, 1.0, 0.8], dtype=torch.float64)
    s = edm.sid_sigma(t)
    assert s[0].item() == pytest.approx(0.002, rel=1e-10)
    assert s[1].item() == pytest.approx(80.0, rel=1e-10)
    # SPEC: t_max = 800 gives sigma in [0.002, ~24.4]
    assert s[2].item() == pytest.approx(24.4, abs=0.05)
    assert s[2].item() == pytest.approx(24.40834, abs=1e-4)


@pytest.mark.parametrize("t", [0.05, 0.25, 0.5, 0.75])
def test_sid_sigma_hand_values(t):
    assert edm.sid_sigma(torch.tensor([t], dtype=torch.float64)).item() == pytest.approx(_sigma_t_hand(t), rel=1e-10)


def test_sid_sigma_monotonic_increasing():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    s = edm.sid_sigma(t)
    assert (s[1:] > s[:-1]).all()


def test_sample_sid_sigma_range_and_reproducibility():
    cap = _sigma_t_hand(0.8)
    g = torch.Generator().manual_seed(7)
    s = edm.sample_sid_sigma(100_000, 800.0, generator=g)
    assert s.max().item() <= cap * (1 + 1e-6)
    assert s.min().item() >= 0.002 * (1 - 1e-6)
    # the upper end is actually reached (t is uniform on the whole [0, 0.8])
    assert s.max().item() > 0.95 * cap
    # reproduce the draw: t = U[0,1) * t_max/1000
    g = torch.Generator().manual_seed(11)
    s = edm.sample_sid_sigma(5, 800.0, generator=g)
    g2 = torch.Generator().manual_seed(11)
    u = torch.rand(5, generator=g2).tolist()
    for i, ui in enumerate(u):
        assert s[i].item() == pytest.approx(_sigma_t_hand(ui * 0.8), rel=1e-5)


@pytest.mark.parametrize("t_max", [200.0, 500.0, 1000.0])
def test_sample_sid_sigma_other_t_max(t_max):
    g = torch.Generator().manual_seed(1)
    s = edm.sample_sid_sigma(20_000, t_max, generator=g)
    assert s.max().item() <= _sigma_t_hand(t_max / 1000) * (1 + 1e-6)


# --------------------------------------------------------------------------------------------------
# Stop-gradient normaliser w_i
# --------------------------------------------------------------------------------------------------
def test_sid_normaliser_hand_value_shape_and_detach():
    x_g = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]], requires_grad=True)  # B=2,C=1,2x2
    y = torch.tensor([[[[0.0, 4.0], [3.0, 3.0]]], [[[0.5, -0.5], [1.0, -2.0]]]], requires_grad=True)
    w = edm.sid_normaliser(x_g, y)
    assert w.shape == (2, 1, 1, 1)
    # sample 0: |1|,|−2|,|0|,|1| -> 4/4 = 1 ; sample 1: .5,.5,1,2 -> 4/4 = 1.0
    assert w[0].item() == pytest.approx(1.0)
    assert w[1].item() == pytest.approx(1.0)
    assert not w.requires_grad and w.grad_fn is None


def test_sid_normaliser_mean_over_all_nonbatch_dims():
    x = torch.zeros(3, 2, 4, 4)
    y = torch.zeros(3, 2, 4, 4)
    y[0, 0, 0, 0] = 32.0  # mean over 2*4*4 = 32 entries -> 1.0
    y[1] = -0.25
    w = edm.sid_normaliser(x, y)
    assert w.shape == (3, 1, 1, 1)
    assert w[0].item() == pytest.approx(1.0)
    assert w[1].item() == pytest.approx(0.25)
    assert w[2].item() == pytest.approx(1e-5)  # identical -> clamped at 1e-5


def test_sid_normaliser_clamp_floor():
    x = torch.full((2, 3, 2, 2), 0.5, dtype=torch.float64)
    y = x.clone()
    y[1] += 1e-7  # below the floor
    w = edm.sid_normaliser(x, y)
    assert w[0].item() == pytest.approx(1e-5, rel=1e-6)
    assert w[1].item() == pytest.approx(1e-5, rel=1e-6)
    # a value above the floor is not clamped
    y2 = x + 2e-5
    assert edm.sid_normaliser(x, y2)[0].item() == pytest.approx(2e-5, rel=1e-3)


def test_sid_normaliser_no_gradient_through_w():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.randn(2, 3, 4, 4)
    loss = (x / edm.sid_normaliser(x, y)).sum()
    loss.backward()
    # only the 1/w factor: d/dx (x/w) with w constant -> 1/w
    w = (x.detach() - y).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, (1 / w).expand_as(x))


# --------------------------------------------------------------------------------------------------
# Heun sampler schedule
# --------------------------------------------------------------------------------------------------
def test_heun_sigma_steps_endpoints_length_and_values():
    t = edm.heun_sigma_steps(18)
    assert t.shape == (19,)
    assert t[0].item() == pytest.approx(80.0, rel=1e-12)
    assert t[17].item() == pytest.approx(0.002, rel=1e-10)
    assert t[18].item() == 0.0
    assert (t[1:] < t[:-1]).all()
    # t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, hand value at i = 9 of N = 18
    a, b = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    assert t[9].item() == pytest.approx((a + 9 / 17 * (b - a)) ** 7, rel=1e-10)


def test_heun_sigma_steps_other_lengths():
    t = edm.heun_sigma_steps(2)
    assert t.tolist() == pytest.approx([80.0, 0.002, 0.0])
    t = edm.heun_sigma_steps(40)
    assert t.shape == (41,)


def test_heun_nfe():
    assert edm.heun_nfe(18) == 35
    assert edm.heun_nfe(1) == 1
    assert edm.heun_nfe(40) == 79


def test_expand_sigma_shape():
    s = torch.tensor([1.0, 2.0])
    like = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    e = edm.expand_sigma(s, like)
    assert e.shape == (2, 1, 1, 1) and e.dtype == torch.float64
