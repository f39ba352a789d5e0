"""ADD (``method: add``, sida_core/methods/add_impl.py; docs/methods/add.md): the encoders' feature maps, the
losses against hand-computed float64 formulas, which parameters each update reaches, the stage schedule and the
configuration. Real networks throughout (tiny SongUNet / ADM / EDM2 / MLP denoisers), real Distiller steps."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from torch import nn

from schemas.run import AddOptions, RunConfig
from sida_core import edm
from sida_core.distill import Distiller, StepHyper, init_method_networks
from sida_core.methods import Stage, get_method
from sida_core.methods.add_impl import (ADDGeneratorLoss, FeatureDiscriminator, HingeDiscriminatorLoss, distill_weight,
                                        logit_sum)
from sida_core.networks import build_denoiser

UNET_KW = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def unet_teacher(label_dim: int = 0) -> nn.Module:
    torch.manual_seed(0)
    return build_denoiser("songunet", 8, 1, label_dim, UNET_KW).eval().requires_grad_(False)


def add_hyper(**kw) -> StepHyper:
    options = AddOptions(**kw.pop("add", {})).model_dump()
    d = dict(method="add", alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0, sigma_init=2.5,
             t_max=800.0, p_mean=-1.2, p_std=1.2, fake_score_only_kimg=0.0, sid_until_kimg=0.0, lr_psi=1e-3,
             lr_theta=1e-3, betas=(0.0, 0.999), eps=1e-8, total_batch=8, per_worker=4, ema_mimg=0.01, ema_rampup=0.05,
             precision="fp32", seed=0, psi_grad_clip=None, method_options=options)
    d.update(kw)
    return StepHyper(**d)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().double().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- feature maps
@pytest.mark.parametrize("arch,kw", [
    ("songunet", UNET_KW),
    ("adm", {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}),
    ("edm2", {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}),
    ("mlp", {"hidden": 16, "enc_layers": 2, "dec_layers": 1, "emb_channels": 8}),
])
def test_features_are_the_encoder_output_at_each_resolution_ending_with_the_discriminator_block(arch, kw):
    torch.manual_seed(0)
    net = build_denoiser(arch, 8, 1, 0, kw).eval()
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0])
    feats = net(x, sigma, None, return_flag="features")
    sizes = [f.shape[-1] for f in feats]
    assert len(feats) >= 1 and all(f.shape[0] == 3 for f in feats)
    if arch != "mlp":
        assert sizes == sorted(set(sizes), reverse=True) and sizes[0] == 8  # one map per resolution, high to low
    # the last feature map is the block whose channel mean is SiDA's logit map
    logits = net(x, sigma, None, return_flag="encoder")
    torch.testing.assert_close(feats[-1].float().mean(1, keepdim=True).reshape(logits.shape), logits)


def test_discriminator_holds_only_heads_and_reads_the_frozen_teacher():
    teacher = unet_teacher()
    disc = FeatureDiscriminator(teacher, hidden=4, sigma=0.002)
    assert all(k.startswith("heads.") for k in disc.state_dict())  # the feature network is not in checkpoints
    assert {id(p) for p in disc.parameters()}.isdisjoint({id(p) for p in teacher.parameters()})
    assert len(disc.heads) == 2  # 8x8 and 4x4 resolutions of the tiny U-Net
    maps = disc(torch.randn(2, 1, 8, 8))
    assert [tuple(m.shape) for m in maps] == [(2, 1, 8, 8), (2, 1, 4, 4)]


# ----------------------------------------------------------------------------------------------- losses, float64
class FixedMaps(nn.Module):
    """A stand-in discriminator with a known answer: D_k(x) = w_k * x pooled to the k-th size (linear in x)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.7, -1.3], dtype=torch.float64))

    def forward(self, x, labels=None):
        return [self.w[0] * x, self.w[1] * torch.nn.functional.avg_pool2d(x, 2)]


def test_hinge_loss_and_r1_match_the_formula_in_float64():
    torch.manual_seed(1)
    x_g, x_r = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    disc = FixedMaps()
    loss, stats = HingeDiscriminatorLoss(r1_gamma=0.3)(disc, x_g, None, x_r)
    w0, w1 = 0.7, -1.3
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 2)  # noqa: E731
    expect = []
    for i in range(4):
        real = [w0 * x_r[i], w1 * pool(x_r[i:i + 1])[0]]
        fake = [w0 * x_g[i], w1 * pool(x_g[i:i + 1])[0]]
        hinge = sum(torch.clamp(1 - m, min=0).mean() for m in real) + sum(torch.clamp(1 + m, min=0).mean() for m in fake)
        # d/dx of sum_k mean D_k(x): w0 / 16 per pixel + w1 / 4 * (1/4 per pixel of each 2x2 cell) = w0/16 + w1/16
        r1 = 16 * ((w0 + w1) / 16) ** 2
        expect.append(hinge + 0.3 / 2 * r1)
    torch.testing.assert_close(loss, torch.stack(expect).to(loss.dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats["loss_r1"], torch.tensor(16 * ((w0 + w1) / 16) ** 2, dtype=torch.float64))
    loss.sum().backward()
    assert disc.w.grad is not None and torch.isfinite(disc.w.grad).all()  # R1 is differentiated w.r.t. the heads


def test_generator_loss_matches_the_formula_in_float64_for_both_weightings():
    torch.manual_seed(2)
    teacher = nn.Identity()

    class Denoiser(nn.Module):  # D(x; sigma) = x / (1 + sigma^2): a closed form to check the target against
        def forward(self, x, sigma, labels=None):
            return x / (1 + edm.expand_sigma(sigma, x) ** 2)

    teacher = Denoiser()
    disc = FixedMaps()
    x_g = torch.randn(3, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    for weighting in ("exponential", "sds"):
        loss_fn = ADDGeneratorLoss(lambda_adv=0.5, lambda_distill=2.5, weighting=weighting, t_max=800.0)
        g = torch.Generator().manual_seed(7)
        loss, stats = loss_fn(teacher, disc, x_g, None, Stage.ADD, generator=g)
        g = torch.Generator().manual_seed(7)  # the same draws, in the loss's order: sigma, then noise
        sigma = edm.sample_sid_sigma(3, 800.0, generator=g).double()
        n = torch.randn(x_g.shape, generator=g, dtype=torch.float64)
        s = sigma.reshape(-1, 1, 1, 1)
        target = (x_g.detach() + s * n) / (1 + s ** 2)
        c = 1 / (1 + sigma ** 2) if weighting == "exponential" else sigma / (2 * (1 + sigma ** 2))
        distill = 2.5 * c * (x_g.detach() - target).square().flatten(1).mean(1)
        adv = -0.5 * (0.7 * x_g.detach().flatten(1).mean(1) - 1.3 * x_g.detach().flatten(1).mean(1))
        # the loss computes in float32 (as in training, whatever the input dtype): float32 tolerance
        torch.testing.assert_close(loss.detach(), adv + distill, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(stats["loss_distill"], distill.mean().to(stats["loss_distill"].dtype), rtol=2e-5,
                                   atol=1e-7)


def test_sds_weighting_gives_the_sds_gradient():
    """grad_x c(sigma) ||x - x_hat||^2 (pixel sum) = omega(sigma) (eps_hat - eps), omega = sigma^2 / (1 + sigma^2)."""
    sigma = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    eps, eps_hat = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    s = sigma[:, None]
    x_hat = x.detach() + s * eps - s * eps_hat  # x_t = x + sigma eps, x_hat = x_t - sigma eps_hat
    (distill_weight(sigma, "sds").double()[:, None] * (x - x_hat).square()).sum().backward()
    torch.testing.assert_close(x.grad, (s ** 2 / (1 + s ** 2)) * (eps_hat - eps))
    assert distill_weight(sigma, "exponential")[0] > distill_weight(sigma, "exponential")[-1]  # noisier counts less
    with pytest.raises(ValueError, match="distill_weighting"):
        distill_weight(sigma, "nfsd")


def test_each_add_loss_reaches_only_its_own_parameters():
    """Critic loss: the heads only (x_g detached, the feature network frozen). Generator loss: G only, through x_g
    into the distillation target's difference and through the frozen features into the heads' logits (the heads are
    frozen during the theta update, as the Distiller does)."""
    teacher = unet_teacher()
    h = add_hyper()
    G, D = init_method_networks(h, teacher)
    critic_loss, gen_loss = get_method("add").implementation().build_losses(h)
    z, x_r = torch.randn(4, 1, 8, 8), torch.rand(4, 1, 8, 8) * 2 - 1
    x_g = G(2.5 * z, torch.full((4,), 2.5), None)
    critic_loss(D, x_g, None, x_r, None, generator=torch.Generator().manual_seed(0))[0].sum().backward()
    # every head parameter gets a gradient; a head's output bias gets exactly 0 while all hinges are active
    # (d/db of relu(1 - D_real) + relu(1 + D_fake) = -1 + 1), so nonzero is asked of the weights
    assert all(p.grad is not None for p in D.parameters())
    assert all(p.grad.abs().sum() > 0 for n, p in D.named_parameters() if n.endswith("weight"))
    assert all(p.grad is None for p in G.parameters()) and all(p.grad is None for p in teacher.parameters())
    D.zero_grad(set_to_none=True)
    D.requires_grad_(False)
    x_g = G(2.5 * z, torch.full((4,), 2.5), None)
    loss, stats = gen_loss(teacher, D, x_g, None, Stage.ADD, generator=torch.Generator().manual_seed(0))
    loss.sum().backward()
    assert stats["loss_distill"] > 0
    grads = [p.grad for p in G.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    assert all(p.grad is None for p in D.parameters()) and all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------- the step
def test_add_step_trains_heads_and_generator_never_the_feature_network():
    teacher = unet_teacher()
    h = add_hyper(fake_score_only_kimg=0.008)  # one discriminator-only step, then ADD
    G, D = init_method_networks(h, teacher)
    real = torch.rand(64, 1, 8, 8) * 2 - 1
    d = Distiller(h, teacher, G, D, real, None)
    t0, g0, d0 = digest(teacher.parameters()), digest(G.parameters()), digest(D.parameters())
    s1 = d.step()
    assert s1["stage"] == Stage.FAKE_SCORE.value and "loss_G" not in s1
    assert digest(G.parameters()) == g0 and digest(D.parameters()) != d0  # warm-up: the heads alone
    d1 = digest(D.parameters())
    s2 = d.step()
    assert s2["stage"] == "add" and {"loss_distill", "loss_adv_theta", "d_real", "d_fake"} <= set(s2)
    assert digest(G.parameters()) != g0 and digest(D.parameters()) != d1
    assert digest(teacher.parameters()) == t0  # the frozen feature network (= the teacher) never moves
    state = d.state_dict()
    assert "discriminator" in state and "fake_score" not in state
    assert set(state["discriminator"]) == set(D.state_dict())

    # resume: a fresh Distiller loaded from the state continues exactly like the original
    G2, D2 = init_method_networks(h, teacher)
    d2 = Distiller(h, teacher, G2, D2, real, None)
    d2.load_state_dict(copy.deepcopy(state))  # as from disk: no tensor shared with the running Distiller
    a, b = d.step(), d2.step()
    assert a["loss_G"] == b["loss_G"] and a["loss_psi"] == b["loss_psi"]
    assert digest(G.parameters()) == digest(G2.parameters())


def test_discriminator_heads_start_from_the_run_seed_not_the_process_random_state():
    teacher = unet_teacher()
    torch.manual_seed(123)
    a = init_method_networks(add_hyper(seed=5), teacher)[1]
    torch.manual_seed(456)
    b = init_method_networks(add_hyper(seed=5), teacher)[1]
    c = init_method_networks(add_hyper(seed=6), teacher)[1]
    assert digest(a.parameters()) == digest(b.parameters()) != digest(c.parameters())


def test_add_has_no_sid_stage_and_needs_real_images():
    add = get_method("add")
    assert add.stage_at(0, 1.0, 5.0) is Stage.FAKE_SCORE
    assert add.stage_at(1000, 1.0, 5.0) is Stage.ADD  # no SiD stage between the warm-up and ADD
    assert get_method("sida").stage_at(1000, 1.0, 5.0) is Stage.SID
    teacher = unet_teacher()
    h = add_hyper()
    G, D = init_method_networks(h, teacher)
    with pytest.raises(ValueError, match="needs real images"):
        Distiller(h, teacher, G, D, None, None)


def test_add_config_options_and_refusals():
    cfg = RunConfig(method="add", add={"lambda_distill": 1.0, "distill_weighting": "sds"})
    assert cfg.add.lambda_distill == 1.0 and cfg.psi_grad_clip is None
    with pytest.raises(ValueError, match="distill_weighting"):
        RunConfig(method="add", add={"distill_weighting": "nfsd"})
    with pytest.raises(ValueError, match="extra|lambda_dist"):
        RunConfig(method="add", add={"lambda_dist": 1.0})
    with pytest.raises(ValueError, match="fake_score_logvar applies to methods with a fake-score net"):
        RunConfig(method="add", loss={"fake_score_logvar": True})


def test_add_conditional_teacher_feeds_labels_to_the_feature_network():
    teacher = unet_teacher(label_dim=3)
    with torch.no_grad():  # EDM's initialisation zeroes layers the label passes through: at init the class moves the
        for p in teacher.parameters():  # features by ~4e-6, which the heads' float sums can round away entirely
            p.add_(0.05 * torch.randn_like(p))
    disc = FeatureDiscriminator(teacher, hidden=4)
    x = torch.randn(2, 1, 8, 8)
    c0, c1 = torch.eye(3)[[0, 0]], torch.eye(3)[[1, 1]]
    a, b = logit_sum(disc(x, c0)), logit_sum(disc(x, c1))
    assert not torch.equal(a, b)  # the class reaches the discriminator through the teacher's features
    assert torch.equal(logit_sum(disc(x, c0)), a)  # and nothing else varies between calls


def test_sida_distill_runs_add_into_a_run_folder_and_resumes(tmp_path):
    """The single-process host runs ADD through the same loop: metric rows with ADD's losses, a checkpoint whose
    critic is the discriminator's heads, resume continuing from it."""
    from pipelines.distill import run_distill, run_store_of
    from schemas.loader import load_run_config
    from sida_core import checkpoint as ckpt
    from tests.test_distill import ROOT, tiny_overrides

    def cfg_of(**kw):
        return load_run_config(ROOT / "configs" / "digits.yaml",
                               tiny_overrides(**{"method": "add", "add.distill_weighting": "sds", **kw}))

    cfg = cfg_of()
    store = run_store_of(cfg, str(tmp_path / "add"))
    out = run_distill(cfg, store, progress=False, log=lambda m: None)
    rows = store.read_metrics().to_pylist()
    assert [r["stage"] for r in rows] == ["add"] * len(rows) and len(rows) == 4
    assert all(r["loss_distill"] > 0 and r["loss_adv_theta"] is not None and r["d_real"] is not None for r in rows)
    state, manifest = ckpt.load_checkpoint(out["checkpoint"])
    assert manifest["method"] == "add" and "discriminator" in state and "fake_score" not in state
    assert all(k.startswith("heads.") for k in state["discriminator"])
    out2 = run_distill(cfg_of(total_kimg=0.768), store, progress=False, log=lambda m: None)
    assert out2["kimg"] == 0.768 and [r["kimg"] for r in store.read_metrics().to_pylist()][-2:] == [0.64, 0.768]
