"""One distillation optimisation step (SiD / SiDA / SiD²A, ADD), framework-free (SiDA Algorithm 1; SPEC.md).

:class:`Distiller` owns G_theta, the method's critic (SiD family: f_psi, whose encoder is SiDA's discriminator;
ADD: discriminator heads on the frozen teacher's features), the frozen teacher f_phi, both
Adam optimisers, the generator EMA and the fp16 loss scalers. :meth:`Distiller.step` performs one step:
the psi update (eqs. 5 / 9-10) then, outside the fake-score-only stage, the theta update (eq. 6 or 8), each
over ``rounds`` gradient-accumulation micro-batches of ``per_worker`` images; then the EMA update.

The same step serves the single-process engine (``sida distill``) and the Ray workers: pass DDP-wrapped
``generator`` / ``fake_score`` modules and the data-parallel ``rank`` / ``world_size``; accumulation rounds
skip gradient sync (``no_sync``) except on the last one.

Randomness is a pure function of (seed, step, global micro-batch index, purpose): micro-batch ``r`` on
worker ``k`` has global index ``k * rounds + r``. Hence a run is reproducible, resumes exactly from
(weights, optimiser state, step) alone, and two workers x batch b draw the same numbers as one process
with the same total batch split into the same micro-batches.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch
from torch import nn
from torch.profiler import record_function

from sida_core.data import EpochOrder
from sida_core.losses import check_logvar_head, generate
from sida_core.methods import Stage, get_method
from sida_core.networks.edm2 import force_weight_norm_
from sida_core.performance import (Performance, adam, check_single_forward, compile_networks, graph_breaks,
                                   prepare_network, set_tf32, to_memory_format)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True if no element of any tensor is NaN or Inf (one host sync: the max-norms of all tensors at once)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors, float("inf")))).all())


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the message names the step, kimg and which update."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of values (stable across processes and Python versions)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(device, *parts) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(derive_seed(*parts))
    return g


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under a DistributedDataParallel (or similar ``.module``) wrapper."""
    return getattr(module, "module", module)


@dataclass
class StepHyper:
    """Everything one step needs, named as in the paper; built from a RunConfig by :func:`hyper_from_config`."""

    method: str
    alpha: float
    lambda_sid: float
    lambda_adv_theta: float
    lambda_adv_psi: float
    sigma_init: float
    t_max: float
    p_mean: float
    p_std: float
    fake_score_only_kimg: float
    sid_until_kimg: float
    lr_psi: float
    lr_theta: float
    betas: tuple[float, float]
    eps: float
    total_batch: int
    per_worker: int
    ema_mimg: float
    ema_rampup: Optional[float]
    precision: str
    seed: int
    psi_grad_clip: Optional[float]
    max_fp16_skips: int = 20
    fake_score_logvar: bool = False
    performance: Performance = Performance()
    xflip: bool = False  # mirror each real image with probability 1/2 (data.xflip; drawn from the batch's rng)
    method_options: dict = field(default_factory=dict)  # the method's own config section (Method.options), validated


def hyper_from_config(cfg) -> StepHyper:
    """Map a validated ``schemas.run.RunConfig`` onto :class:`StepHyper`."""
    return StepHyper(
        method=cfg.method, alpha=cfg.loss.alpha, lambda_sid=cfg.loss.lambda_sid,
        lambda_adv_theta=cfg.loss.lambda_adv_theta, lambda_adv_psi=cfg.loss.lambda_adv_psi,
        sigma_init=cfg.loss.sigma_init, t_max=cfg.loss.t_max, p_mean=cfg.loss.p_mean, p_std=cfg.loss.p_std,
        fake_score_only_kimg=cfg.stages.fake_score_only_kimg, sid_until_kimg=cfg.stages.sid_until_kimg,
        lr_psi=cfg.optimizer.lr_psi, lr_theta=cfg.optimizer.lr_theta,
        betas=(cfg.optimizer.beta1, cfg.optimizer.beta2), eps=cfg.optimizer.eps,
        total_batch=cfg.batch.total, per_worker=cfg.batch.per_worker,
        ema_mimg=cfg.ema.ema_mimg, ema_rampup=cfg.ema.rampup, precision=cfg.precision, seed=cfg.seed,
        psi_grad_clip=cfg.psi_grad_clip, fake_score_logvar=cfg.loss.fake_score_logvar,
        performance=performance_from_config(cfg.performance), xflip=cfg.data.xflip,
        method_options=method_options_of(cfg),
    )


def method_options_of(cfg) -> dict:
    """The chosen method's own options (its config section, e.g. ``add:``) as a plain dict; {} if it has none."""
    section = get_method(cfg.method).options
    return getattr(cfg, section).model_dump() if section else {}


def performance_from_config(p) -> Performance:
    """Map a validated ``schemas.run.PerformanceConfig`` onto :class:`~sida_core.performance.Performance`."""
    return Performance(compile=tuple(p.compile), compile_mode=p.compile_mode, channels_last=p.channels_last,
                       adam=p.adam, single_psi_forward=p.single_psi_forward, tf32=p.tf32,
                       activation_checkpointing=p.activation_checkpointing)


class Distiller:
    """G_theta, f_psi, f_phi and their optimisers; :meth:`step` is one SiD/SiDA iteration."""

    def __init__(self, hyper: StepHyper, teacher: nn.Module, generator: nn.Module, fake_score: nn.Module,
                 real_images: Optional[torch.Tensor] = None, real_labels: Optional[torch.Tensor] = None,
                 *, rank: int = 0, world_size: int = 1, device="cpu", real_encode=None):
        h = hyper
        if h.total_batch % (h.per_worker * world_size):
            raise ValueError(f"batch.total ({h.total_batch}) must be divisible by batch.per_worker x workers "
                             f"({h.per_worker} x {world_size})")
        self.h, self.rank, self.world_size = h, rank, world_size
        self.betas = (float(h.betas[0]), float(h.betas[1]))
        self.device = torch.device(device)
        self.rounds = h.total_batch // (h.per_worker * world_size)
        self.method = get_method(h.method)
        self.use_adv = self.method.needs_real  # the critic update takes a real batch
        if self.use_adv and real_images is None:
            raise ValueError(f"method {h.method!r} needs real images for the discriminator")
        self.real_images = real_images
        self.real_labels = real_labels
        self.real_order = EpochOrder(real_images.shape[0], h.seed) if real_images is not None else None
        self.real_encode = real_encode  # e.g. SD-VAE moments -> latents with fresh noise (sida_core.latents)

        perf = self.perf = h.performance
        self.perf_notes: list[str] = []  # what the speed options did (compile fallback, fused Adam missing), to log once
        set_tf32(perf.tf32)
        for net in (teacher, unwrap(generator), unwrap(fake_score)):
            prepare_network(net, perf)  # idempotent; hosts with DDP apply it before wrapping (build_distiller)
        if perf.single_psi_forward and self.method.adversarial_psi:
            check_single_forward(fake_score)
        elif perf.single_psi_forward:
            self.perf_notes.append(f"performance.single_psi_forward has no effect for method {h.method!r} (it is "
                                   f"SiDA's joint fake/real fake-score pass)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.G, self.psi = generator, fake_score
        unwrap(self.G).train()
        unwrap(self.psi).train()
        self.G_ema = copy.deepcopy(unwrap(generator)).eval().requires_grad_(False)
        net = unwrap(generator)
        self.img_shape = cast(tuple[int, int, int], (net.img_channels, net.img_resolution, net.img_resolution))
        self.label_dim = cast(int, net.label_dim)

        self.opt_psi = adam(self.psi.parameters(), lr=h.lr_psi, betas=self.betas, eps=h.eps, perf=perf, notes=self.perf_notes)
        self.opt_G = adam(self.G.parameters(), lr=h.lr_theta, betas=self.betas, eps=h.eps, perf=perf, notes=self.perf_notes)
        # compiled after G_ema is copied (the EMA net stays eager); nn.Module.compile keeps names and state dicts
        self.compiled = compile_networks({"generator": self.G, "fake_score": self.psi, "teacher": self.teacher}, perf,
                                         self.device, self.perf_notes)
        if h.fake_score_logvar:
            check_logvar_head(fake_score)
        # the method's two losses: critic (f_psi: eqs. 5 / 9-10; ADD: hinge) and generator (eqs. 6 / 8; ADD)
        self.fake_loss, self.gen_loss = self.method.implementation().build_losses(h)

        if h.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {h.precision!r}")
        self.amp_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[h.precision]
        fp16 = h.precision == "fp16"
        self.scaler_psi = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.scaler_G = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.fp16_skips = 0  # fp16 updates skipped for overflow so far (both updates together)
        self._nonfinite_msg: Optional[str] = None  # why this worker's last loss was non-finite
        self._fp16_streak: dict[str, int] = {}  # consecutive skips per update ("fake-score", "generator")

        self.step_idx = 0
        self.cur_nimg = 0
        self._first_step_s: Optional[float] = None  # wall time of this process's first step (compile happens there)
        self._reported = False

    # ------------------------------------------------------------------ helpers
    def stage(self) -> Stage:
        return self.method.stage_at(self.cur_nimg, self.h.fake_score_only_kimg, self.h.sid_until_kimg)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _sync(self, module: nn.Module, last_round: bool):
        # no_sync: DistributedDataParallel's (or a similar wrapper's) method, present when hasattr says so
        return contextlib.nullcontext() if last_round or not hasattr(module, "no_sync") else cast(Any, module).no_sync()

    def _rng(self, r: int, purpose: str) -> torch.Generator:
        return make_generator(self.device, self.h.seed, self.step_idx, self.rank * self.rounds + r, purpose)

    def _fake_batch(self, rng: torch.Generator):
        n = self.h.per_worker
        z = to_memory_format(torch.randn((n, *self.img_shape), device=self.device, generator=rng), self.perf)
        labels = None
        if self.label_dim:
            idx = torch.randint(self.label_dim, (n,), device=self.device, generator=rng)
            labels = torch.nn.functional.one_hot(idx, self.label_dim).float()
        return z, labels

    def _real_batch(self, rng: torch.Generator, r: int):
        # Real images without replacement within an epoch (sida_core.data.EpochOrder): micro-batch r of this
        # worker takes the positions after the images consumed so far and the micro-batches before it, so the
        # split among workers and rounds does not change which images a step sees, and resume continues the epoch.
        n = self.h.per_worker
        start = self.cur_nimg + (self.rank * self.rounds + r) * n
        assert self.real_order is not None and self.real_images is not None  # use_adv requires real images (__init__)
        idx = torch.from_numpy(self.real_order.indices(start, n))
        if isinstance(self.real_images, torch.Tensor):
            idx = idx.to(self.real_images.device)
        x = self.real_images[idx].to(self.device, non_blocking=True)
        if self.h.xflip:
            flip = torch.rand(x.shape[0], generator=rng, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.real_encode is not None:
            x = self.real_encode(x, rng)
        c = None
        if self.real_labels is not None:
            c = self.real_labels[idx].to(self.device)
            if c.ndim == 1:  # class indices (a large dataset's labels are kept as ints, one-hot per batch)
                c = torch.nn.functional.one_hot(c, self.label_dim).float()
        return to_memory_format(x, self.perf), c

    def _check_finite(self, loss_vec: torch.Tensor, what: str) -> bool:
        """True if finite; else remember why (the decision is taken in :meth:`_apply`, on all workers at once)."""
        if torch.isfinite(loss_vec).all():
            return True
        bad = int((~torch.isfinite(loss_vec)).sum())
        self._nonfinite_msg = (f"non-finite {what} loss in {bad} of {loss_vec.numel()} samples at step {self.step_idx} "
                               f"(kimg {self.cur_nimg / 1000:.1f}, stage {self.stage().value})")
        return False

    def _all_workers(self, ok: bool) -> bool:
        """``ok`` on every data-parallel worker: they must skip, or raise, together (else DDP hangs or drifts)."""
        if self.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _apply(self, opt, scaler, module, clip: Optional[float], what: str, finite: bool) -> bool:
        """Unscale, check gradients, clip, step. Returns True if the parameters were updated.

        fp16: a non-finite loss or gradient skips the update (the scaler lowers its scale); fp32/bf16: raises
        :class:`NonFiniteError`. Decided jointly by all workers.
        """
        scaler.unscale_(opt)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        grads_finite = self._all_workers(finite and all_finite(grads))
        if not grads_finite:
            if self.h.precision != "fp16":
                reason = self._nonfinite_msg if not finite else None
                raise NonFiniteError(reason or f"non-finite {what} loss or gradient at step {self.step_idx} "
                                     f"(kimg {self.cur_nimg / 1000:.1f}, on this or another worker)")
            self.fp16_skips += 1
            self._fp16_streak[what] = self._fp16_streak.get(what, 0) + 1
            warnings.warn(f"fp16 overflow in {what} update at step {self.step_idx}: step skipped, loss scale reduced",
                          stacklevel=2)
            if self._fp16_streak[what] > self.h.max_fp16_skips:
                raise NonFiniteError(f"{what}: more than {self.h.max_fp16_skips} consecutive fp16 overflows "
                                     f"at step {self.step_idx}: training diverged")
            for g in grads:
                g.zero_()
        elif clip is not None and grads:
            torch._foreach_clamp_min_(grads, -clip)  # = g.clamp_(-clip, clip) for each g, in two kernels
            torch._foreach_clamp_max_(grads, clip)
        scaler.step(opt)  # skipped by the scaler itself when it saw inf (fp16)
        scaler.update()
        if grads_finite:
            self._fp16_streak[what] = 0
        return grads_finite

    # ------------------------------------------------------------------ the step
    def step(self) -> dict:
        """One iteration: psi update, then (outside the fake-score-only stage) theta update, then EMA."""
        if self._first_step_s is None:
            t0 = time.perf_counter()
            stats = self._step()
            self._first_step_s = time.perf_counter() - t0
            return stats
        return self._step()

    def performance_report(self) -> list[str]:
        """Once, after the first step: the speed options in force and what they did (compile fallbacks, graph
        breaks, the first step's time, which includes compilation); then an empty list. The hosts log it."""
        if self._reported or self._first_step_s is None:
            return []
        self._reported = True
        lines = [f"performance: {self.perf.describe()}", *self.perf_notes]
        if self.compiled:
            lines.append(f"torch.compile: {graph_breaks()} graph break(s) so far; first step took "
                         f"{self._first_step_s:.1f} s (compilation; later steps reuse the graphs)")
        return lines

    def _step(self) -> dict:
        h = self.h
        stage = self.stage()
        b_total = h.per_worker * self.rounds  # per-worker total batch (SPEC: loss = sum_i L_i / B_worker_total)
        stats: dict[str, float | str] = {}  # losses and counters; "stage" is the stage's name
        sums: dict[str, float] = {}

        def acc(d, scale=1.0):
            for k, v in d.items():
                sums[k] = sums.get(k, 0.0) + float(v) * scale / self.rounds

        # psi: fake-score (+ discriminator) update, eqs. 5 / 9-10
        force_weight_norm_(unwrap(self.psi))  # EDM2 forced weight norm before psi's forwards (no-op for non-EDM2 nets)
        self.opt_psi.zero_grad(set_to_none=True)
        finite = True
        for r in range(self.rounds):
            rng = self._rng(r, "psi")
            z, labels = self._fake_batch(rng)
            with record_function("data: real batch"):
                x_real, c_real = self._real_batch(rng, r) if self.use_adv else (None, None)
            with torch.no_grad(), self._autocast(), record_function("psi step: G forward (no grad)"):
                x_g = generate(self.G_forward, z, labels, h.sigma_init)
            with self._sync(self.psi, r == self.rounds - 1), self._autocast(), record_function("psi step: psi forward"):
                loss_vec, st = self.fake_loss(self.psi, x_g.float(), labels, x_real, c_real, generator=rng)
            finite &= self._check_finite(loss_vec, "fake-score")
            loss = loss_vec.nan_to_num().sum() / b_total
            with record_function("psi step: backward (+ DDP sync)"):
                self.scaler_psi.scale(loss).backward()
            acc({"loss_psi": loss_vec.detach().mean(), **st})
        with record_function("psi step: optimizer"):
            stats["psi_updated"] = float(self._apply(self.opt_psi, self.scaler_psi, self.psi, h.psi_grad_clip,
                                                     "fake-score", finite))

        # theta: generator update, eq. 6 (SiD stage) or eq. 8 (SiDA stage) or the method's own
        if stage is not Stage.FAKE_SCORE:
            psi_plain = unwrap(self.psi)
            psi_plain.requires_grad_(False)
            try:
                force_weight_norm_(unwrap(self.G))  # EDM2 forced weight normalisation, before theta's forwards
                self.opt_G.zero_grad(set_to_none=True)
                finite = True
                for r in range(self.rounds):
                    rng = self._rng(r, "theta")
                    z, labels = self._fake_batch(rng)
                    with self._sync(self.G, r == self.rounds - 1), self._autocast():
                        with record_function("theta step: G forward"):
                            x_g = generate(self.G, z, labels, h.sigma_init)
                        with record_function("theta step: teacher + psi forwards"):
                            loss_vec, st = self.gen_loss(self.teacher, psi_plain, x_g.float(), labels, stage,
                                                         generator=rng)
                    finite &= self._check_finite(loss_vec, "generator")
                    loss = loss_vec.nan_to_num().sum() / b_total
                    with record_function("theta step: backward (+ DDP sync)"):
                        self.scaler_G.scale(loss).backward()
                    acc({"loss_G": loss_vec.detach().mean(), **st})
                with record_function("theta step: optimizer"):
                    stats["G_updated"] = float(self._apply(self.opt_G, self.scaler_G, self.G, None, "generator", finite))
            finally:
                psi_plain.requires_grad_(True)
                self.opt_psi.zero_grad(set_to_none=True)

        self.step_idx += 1
        self.cur_nimg += h.total_batch
        with record_function("EMA"):
            self.update_ema()
        stats.update(sums)
        stats.update(stage=stage.value, step=self.step_idx, cur_nimg=self.cur_nimg, kimg=self.cur_nimg / 1000)
        return stats

    @property
    def G_forward(self) -> nn.Module:
        """The generator as used for fake samples of the psi step (no gradient, no DDP sync needed)."""
        return unwrap(self.G)

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA with half-life ema_mimg * 1e6 images, ramped up as min(h, rampup * cur_nimg) (SPEC.md)."""
        beta = ema_beta(self.h.total_batch, self.h.ema_mimg, self.cur_nimg, self.h.ema_rampup)
        src = unwrap(self.G)
        ema: list[torch.Tensor]
        ema, cur = list(self.G_ema.parameters()), [p.detach() for p in src.parameters()]
        torch._foreach_copy_(ema, torch._foreach_lerp(cur, ema, beta))  # p_ema <- lerp(p, p_ema, beta), all at once
        ema_b, cur_b = list(self.G_ema.buffers()), list(src.buffers())
        if ema_b:
            torch._foreach_copy_(ema_b, cur_b)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "generator": unwrap(self.G).state_dict(),
            "generator_ema": self.G_ema.state_dict(),
            self.method.critic: unwrap(self.psi).state_dict(),  # "fake_score" (SiD family), "discriminator" (ADD)
            "opt_G": self.opt_G.state_dict(),
            "opt_psi": self.opt_psi.state_dict(),
            "scaler_G": self.scaler_G.state_dict(),
            "scaler_psi": self.scaler_psi.state_dict(),
            "progress": {"step": torch.tensor(self.step_idx), "cur_nimg": torch.tensor(self.cur_nimg)},
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.G).load_state_dict(state["generator"])
        self.G_ema.load_state_dict(state["generator_ema"])
        unwrap(self.psi).load_state_dict(state[self.method.critic])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_psi.load_state_dict(state["opt_psi"])
        if state.get("scaler_G"):
            self.scaler_G.load_state_dict(state["scaler_G"])
        if state.get("scaler_psi"):
            self.scaler_psi.load_state_dict(state["scaler_psi"])
        self.step_idx = int(state["progress"]["step"])
        self.cur_nimg = int(state["progress"]["cur_nimg"])


def init_networks(teacher: nn.Module, sid_generator: Optional[nn.Module] = None, *, use_logvar: bool = False):
    """Initialisation (SPEC.md): psi <- phi; theta <- phi (SiD, SiDA) or theta <- a SiD generator (SiD²A).

    Parameters no loss reaches stay frozen (:func:`freeze_unused`): G never uses EDM2's logvar head, f_psi only with
    ``use_logvar`` (``loss.fake_score_logvar``)."""
    return init_generator_net(teacher, sid_generator), init_fake_score(teacher, use_logvar=use_logvar)


def init_fake_score(teacher: nn.Module, *, use_logvar: bool = False) -> nn.Module:
    """f_psi <- f_phi (SPEC "Initialisation"), trainable except the parts no loss reaches (:func:`freeze_unused`)."""
    return freeze_unused(copy.deepcopy(teacher).train().requires_grad_(True), use_logvar=use_logvar)


def init_generator_net(teacher: nn.Module, sid_generator: Optional[nn.Module] = None) -> nn.Module:
    """theta <- phi, or <- a SiD generator (SiD²A); trainable except the parts no loss reaches."""
    source = sid_generator if sid_generator is not None else teacher
    return freeze_unused(copy.deepcopy(source).train().requires_grad_(True), use_logvar=False)


def init_method_networks(hyper: StepHyper, teacher: nn.Module, sid_generator: Optional[nn.Module] = None):
    """(G_theta, critic) for ``hyper.method``: the generator as :func:`init_generator_net`, the critic as the
    method builds it (SiD family: f_psi <- phi; ADD: discriminator heads on the frozen teacher)."""
    critic = get_method(hyper.method).implementation().build_critic(teacher, hyper)
    return init_generator_net(teacher, sid_generator), critic


#: Submodules of published teachers that no SiD / SiDA loss uses: EDM's augmentation-label embedding (EDM trained its
#: nets with an augment pipe; distillation feeds no augment labels) and EDM2's logvar head (see ``use_logvar``).
AUGMENT_MODULES = ("map_augment",)
LOGVAR_MODULES = ("logvar_fourier", "logvar_linear")


def freeze_unused(net: nn.Module, *, use_logvar: bool = False) -> nn.Module:
    """Freeze the parameters of ``net`` that take no part in the distillation losses, in place; returns ``net``.

    Numerically a no-op (they would get no gradient and Adam skips them), but DDP requires every trainable parameter
    to receive a gradient in each backward: without this a 2-worker run of a published EDM teacher (augment_dim 9)
    fails at its second step ("Expected to have finished reduction in the prior iteration")."""
    frozen = AUGMENT_MODULES + (() if use_logvar else LOGVAR_MODULES)
    for name, module in net.named_modules():
        if name.rsplit(".", 1)[-1] in frozen:
            module.requires_grad_(False)
    return net


def ema_beta(total_batch: int, ema_mimg: float, cur_nimg: int, rampup: Optional[float]) -> float:
    """beta = 0.5^(batch / h), h = ema_mimg * 1e6 images, ramped up as min(h, rampup * cur_nimg)."""
    h = ema_mimg * 1e6
    if rampup is not None:
        h = min(h, cur_nimg * rampup)
    return 0.5 ** (total_batch / h) if h > 0 else 0.0


__all__ = ["Distiller", "NonFiniteError", "StepHyper", "derive_seed", "ema_beta", "freeze_unused",
           "hyper_from_config", "init_fake_score", "init_generator_net", "init_method_networks", "init_networks",
           "make_generator", "method_options_of", "unwrap"]
