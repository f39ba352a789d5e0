"""Plain-torch DistributedDataParallel (no Ray): two gloo CPU workers running :class:`Distiller` with DDP-wrapped
generator and fake score end with the same weights as one process running the same global micro-batches as
gradient-accumulation rounds (SiDA Algorithm 1; SPEC.md "per-worker batch" semantics).

Layouts compared (b = per-worker batch; micro-batch r of worker k has global index k * rounds + r):
  * 2 workers x rounds 1 (total 2b)  vs  1 process x rounds 2 (total 2b): worker k's batch = micro-batch k;
  * 2 workers x rounds 2 (total 4b)  vs  1 process x rounds 4: exercises ``no_sync`` on the non-final round.
Each run takes 4 steps that cross the stage boundaries (fake-score only, SiD, then SiDA for method "sida"; ADD:
discriminator-only, then ADD, its critic being heads on the frozen teacher that DDP never sees).
A different split (1 process, one micro-batch of 2b) must NOT match: it shows the comparison can fail.

The workers are spawned once per module (torch.multiprocessing, start method "spawn", gloo over a file store);
children write their traceback to a file that the parent raises with; a timeout ends hung children.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from schemas.run import AddOptions
from sida_core.distill import Distiller, StepHyper, init_method_networks
from sida_core.methods import get_method
from sida_core.networks import build_denoiser
from sida_core.performance import Performance

B = 4                 # per-worker batch
WORLD = 2
STEPS = 4
LR = 1e-3            # lr_psi = lr_theta: one Adam step moves a weight by up to about LR
TIMEOUT_S = 240       # for the whole spawned run (it takes a few seconds)
UNET_KW = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0, "augment_dim": 9}
LABEL_DIM = 10
STATE_KEYS = ("generator", "generator_ema", "critic")  # critic: f_psi (SiD family) or ADD's discriminator heads

# the speed options that change how a step runs under DDP: one f_psi forward per micro-batch, fused Adam, NHWC
FAST = Performance(single_psi_forward=True, adam="fused", channels_last=True)
# name -> (method, total batch, speed options); every DDP run has per_worker B and 2 workers
DDP_RUNS = {"sid_r1": ("sid", 2 * B, Performance()), "sida_r1": ("sida", 2 * B, Performance()),
            "sida_r2": ("sida", 4 * B, Performance()), "sida_r2_fast": ("sida", 4 * B, FAST),
            "add_r2": ("add", 4 * B, Performance())}


def hyper(method: str, total: int, per_worker: int, perf: Performance = Performance()) -> StepHyper:
    """Stage boundaries at 1 and 2 steps of ``total`` images: steps 0 / 1 / 2-3 = fake-score / SiD / SiDA (sida)."""
    return StepHyper(method=method, alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0,
                     sigma_init=2.5, t_max=800.0, p_mean=-1.2, p_std=1.2, fake_score_only_kimg=total / 1000,
                     sid_until_kimg=2 * total / 1000, lr_psi=LR, lr_theta=LR, betas=(0.0, 0.999), eps=1e-8,
                     total_batch=total, per_worker=per_worker, ema_mimg=0.01, ema_rampup=0.05, precision="fp32",
                     seed=3, psi_grad_clip=1.0 if method != "sid" else None, performance=perf,
                     method_options=AddOptions().model_dump() if method == "add" else {})


def expected_stages(method: str) -> list[str]:
    if method == "add":  # no SiD stage
        return ["fake_score"] + ["add"] * (STEPS - 1)
    return ["fake_score", "sid"] + ["sida" if method == "sida" else "sid"] * (STEPS - 2)


def build_teacher(state: dict) -> torch.nn.Module:
    net = build_denoiser("songunet", 8, 1, LABEL_DIM, UNET_KW)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def run_distiller(inputs: dict, method: str, total: int, per_worker: int, *, rank: int = 0, world_size: int = 1,
                  wrap=None, after_step=None, perf: Performance = Performance()) -> tuple[dict, list[str]]:
    """STEPS steps from the teacher in ``inputs``; returns (generator / EMA / fake-score weights, stages).

    ``wrap(net, role)`` wraps G (role "G") and psi (role "psi"), e.g. in DDP; ``after_step()`` runs after each step.
    """
    teacher = build_teacher(inputs["teacher"])
    h = hyper(method, total, per_worker, perf)
    G, psi = init_method_networks(h, teacher)
    if perf.channels_last:  # before DDP wraps them, as training_loop.build_distiller does
        G, psi, teacher = (n.to(memory_format=torch.channels_last) for n in (G, psi, teacher))
    if wrap is not None:
        G, psi = wrap(G, "G"), wrap(psi, "psi")
    d = Distiller(h, teacher, G, psi, inputs["images"], inputs["labels"], rank=rank, world_size=world_size)
    stages = []
    for _ in range(STEPS):
        stages.append(d.step()["stage"])
        if after_step is not None:
            after_step()
    state = d.state_dict()
    state["critic"] = state[get_method(method).critic]
    return {k: {n: v.detach().clone() for n, v in state[k].items()} for k in STATE_KEYS}, stages


def _counting_allreduce(state: dict, bucket):
    """DDP's default gradient averaging (divide by world size, allreduce), counting the buckets it reduces.
    Same arithmetic as DDP without a hook (halving is exact for 2 workers)."""
    state["buckets"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _worker(rank: int, world_size: int, work_dir: str) -> None:
    """Child process: join the gloo group, run every DDP_RUNS entry with DDP-wrapped G and psi, save the weights
    and, per step, how many gradient buckets each DDP module all-reduced."""
    work = Path(work_dir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{work / 'pg-store'}", rank=rank, world_size=world_size)
        try:
            inputs = torch.load(work / "inputs.pt", weights_only=True)
            out = {}
            for name, (method, total, perf) in DDP_RUNS.items():
                counters = {"G": {"buckets": 0}, "psi": {"buckets": 0}}
                per_step = []

                def wrap(net, role):
                    ddp = DDP(net)  # the defaults, as ray.train.torch.prepare_model uses them
                    ddp.register_comm_hook(counters[role], _counting_allreduce)
                    return ddp

                def after_step():
                    per_step.append({role: c["buckets"] for role, c in counters.items()})
                    for c in counters.values():
                        c["buckets"] = 0

                state, stages = run_distiller(inputs, method, total, B, rank=rank, world_size=world_size, wrap=wrap,
                                              after_step=after_step, perf=perf)
                out[name] = (state, stages, per_step)
            torch.save(out, work / f"rank{rank}.pt")
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        (work / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def spawn_workers(work: Path, timeout_s: float = TIMEOUT_S) -> float:
    """Run :func:`_worker` on WORLD spawned processes; raise with the children's tracebacks. Returns seconds taken."""
    t0 = time.monotonic()
    ctx = mp.start_processes(_worker, args=(WORLD, str(work)), nprocs=WORLD, join=False, start_method="spawn")
    failure = None
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() - t0 > timeout_s:
                failure = f"DDP workers did not finish within {timeout_s} s"
                break
    except Exception as e:  # noqa: BLE001 - a child died; its own traceback file says why
        failure = f"DDP worker failed: {type(e).__name__}: {e}"
    finally:
        for p in ctx.processes:  # only the processes this test started
            if p.is_alive():
                p.terminate()
            p.join(5)
    if failure is not None:
        details = "".join(f"\n--- {f.name} ---\n{f.read_text()}" for f in sorted(work.glob("error-rank*.txt")))
        raise AssertionError(failure + (details or "\n(no child traceback file was written)"))
    return time.monotonic() - t0


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Seeded tiny conditional SongUNet teacher and the built-in digits with one-hot labels (shared with workers)."""
    from schemas.run import DataConfig
    from sida_core.data import load_dataset

    train, _ = load_dataset(DataConfig(kind="digits"))
    torch.manual_seed(0)
    teacher = build_denoiser("songunet", 8, 1, LABEL_DIM, UNET_KW)
    data = {"teacher": teacher.state_dict(), "images": train.images.contiguous(),
            "labels": torch.nn.functional.one_hot(train.labels, LABEL_DIM).float()}
    work = tmp_path_factory.mktemp("ddp")
    torch.save(data, work / "inputs.pt")
    return work, data


@pytest.fixture(scope="module")
def ddp_results(inputs):
    work, _ = inputs
    seconds = spawn_workers(work)
    ranks = [torch.load(work / f"rank{k}.pt", weights_only=False) for k in range(WORLD)]
    return ranks, seconds


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k][n].double() - b[k][n].double()).abs().max()) for k in STATE_KEYS for n in a[k])


def assert_weights_close(a: dict, b: dict, **tol) -> None:
    for k in STATE_KEYS:
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            torch.testing.assert_close(a[k][n], b[k][n], msg=lambda m: f"{k}.{n}: {m}", **tol)


# ----------------------------------------------------------------------------------------------- tests
# 2 workers x rounds 1 vs 1 process x rounds 2: the same float operations (a + b of two micro-batch gradients, and
# halvings, which are exact), so the weights agree bit for bit; this tolerance only allows for platform quirks.
TOL_R1 = dict(rtol=1e-6, atol=1e-7)
# 2 workers x rounds 2 vs rounds 4: (g0 + g1) + (g2 + g3) against ((g0 + g1) + g2) + g3. The gradients then agree to
# ~1e-5 of each tensor's scale, but Adam divides every element by its own RMS, so elements whose gradient is tiny
# (or cancels across micro-batches) turn that rounding into a visible part of a step: measured up to 2.6e-5
# (2.6% of one Adam step) over hyper seeds 0-8. Tolerance: a tenth of one Adam step.
TOL_R2 = dict(rtol=1e-4, atol=0.1 * LR)
TOLERANCE = {"sid_r1": TOL_R1, "sida_r1": TOL_R1, "sida_r2": TOL_R2, "sida_r2_fast": TOL_R2, "add_r2": TOL_R2}


def test_ddp_replicas_identical_and_gradient_sync_once_per_update(ddp_results):
    """DDP keeps both workers' weights bit-identical; each update all-reduces its gradients once (``no_sync`` on the
    other accumulation rounds), G only when it is trained, psi never during the theta step."""
    (r0, r1), seconds = ddp_results
    for name in DDP_RUNS:
        assert r0[name][1] == r1[name][1] == expected_stages(DDP_RUNS[name][0])
        for k in STATE_KEYS:
            for n in r0[name][0][k]:
                assert torch.equal(r0[name][0][k][n], r1[name][0][k][n]), (name, k, n)
        assert r0[name][2] == r1[name][2]
    for name in DDP_RUNS:
        counts = r0[name][2]
        assert counts[0]["G"] == 0 and counts[0]["psi"] > 0            # fake-score-only step: no generator pass
        assert counts[1]["G"] > 0
        # psi reduces as much in a step with a theta update as in one without (it is not synced by the theta step)
        assert all(c == {"G": counts[1]["G"], "psi": counts[0]["psi"]} for c in counts[1:])
    # rounds 2 reduces exactly as often as rounds 1 (it would be twice as often without no_sync)
    assert r0["sida_r2"][2] == r0["sida_r1"][2]
    print(f"DDP workers: {seconds:.1f} s; buckets reduced per step (sida_r2): {r0['sida_r2'][2]}")


@pytest.mark.parametrize("name", list(DDP_RUNS))
def test_ddp_equals_single_process_accumulation(name, inputs, ddp_results):
    """2 workers x rounds R == 1 process x rounds 2R, same total batch, every weight (G, G_ema, psi)."""
    _, data = inputs
    (r0, _), _ = ddp_results
    method, total, perf = DDP_RUNS[name]
    ddp_state, ddp_stages, _ = r0[name]
    single_state, single_stages = run_distiller(data, method, total, B, perf=perf)
    assert single_stages == ddp_stages == expected_stages(method)
    moved = max(float((single_state[k][n].double() - data["teacher"][n].double()).abs().max())
                for k in ("generator", "generator_ema") for n in single_state[k])
    assert moved > 2 * LR  # the weights did move away from the teacher, so the comparison says something
    diff = max_abs_diff(ddp_state, single_state)
    print(f"{name}: max |DDP - single| = {diff:.3g} (weights moved up to {moved:.3g})")
    assert_weights_close(ddp_state, single_state, **TOLERANCE[name])


def test_different_split_does_not_match(inputs, ddp_results):
    """Negative control: one process with ONE micro-batch of 2b (other random draws, and SiDA's fakeness mean over
    2b instead of b) ends elsewhere, far outside even the looser tolerance used above."""
    _, data = inputs
    (r0, _), _ = ddp_results
    ddp_state = r0["sida_r1"][0]
    other_state, stages = run_distiller(data, "sida", 2 * B, 2 * B)
    assert stages == expected_stages("sida")
    diff = max_abs_diff(ddp_state, other_state)
    print(f"different split: max |DDP - single(one micro-batch of 2b)| = {diff:.3g}")
    assert diff > 2 * LR
    with pytest.raises(AssertionError):
        assert_weights_close(ddp_state, other_state, **TOL_R2)


def test_speed_options_keep_the_ddp_result(ddp_results):
    """Single psi forward + fused Adam + channels-last under DDP end where the plain DDP run ends (same 2 x rounds 2
    layout; float reassociation only, hence rounds 2's tolerance)."""
    (r0, _), _ = ddp_results
    assert r0["sida_r2_fast"][1] == r0["sida_r2"][1]
    assert r0["sida_r2_fast"][2] == r0["sida_r2"][2]  # gradient buckets: still one all-reduce per update
    print(f"fast vs plain DDP: max diff = {max_abs_diff(r0['sida_r2_fast'][0], r0['sida_r2'][0]):.3g}")
    assert_weights_close(r0["sida_r2_fast"][0], r0["sida_r2"][0], **TOL_R2)
