#!/usr/bin/env python
"""Throughput and peak memory of one SiD step and one SiDA step (``Distiller.step``), printed as ONE JSON object.

Each step is the full iteration: the psi (fake-score) update, then the theta (generator) update, then the EMA.
Stages are set so that the generator update runs from the first step: ``fake_score_only_kimg = 0`` for both
methods; SiD then stays in its SiD stage, SiDA (``sid_until_kimg = 0``) is in its SiDA stage (adversarial
psi and generator terms, real-image batch). The teacher is an untrained, randomly initialised SongUNet (or
MLP) of the requested size: throughput does not depend on training. Device-agnostic: the same command runs on
CUDA (``--device cuda`` or ``auto``).

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after
``reset_peak_memory_stats`` (one fresh Distiller per method). On the CPU, peak resident set size, from the
best source available (named in the output as ``memory.method``): Linux ``VmHWM`` reset per method through
``/proc/self/clear_refs``; else psutil's RSS sampled by a thread; else ``resource.getrusage().ru_maxrss``,
which is a process-lifetime peak (the SiDA figure then includes the SiD phase).

Speed options (sida_core.performance; docs/performance.md): ``--compile --channels-last --fused-adam
--single-psi-forward`` apply to both methods. ``--matrix`` builds one Distiller per combination of the options
(``--compile`` joins the matrix only when given, its warm-up reported separately) and times them round-robin in one
process, a step of each in turn, so that machine noise hits all combinations alike; it prints img/s of each, its
speed-up over eager (no options) and the SiDA/SiD step-time ratio. ``--net cifar10-ddpmpp`` / ``edm2-s`` build the
published architectures (EDM's CIFAR-10 DDPM++, 55.7M parameters; EDM2-S on 4x64x64 latents, 1000 classes).

Examples::

    python benchmarks/step_throughput.py --model-channels 16 --channel-mult 1,2 --resolution 8 --batch 16
    python benchmarks/step_throughput.py --model-channels 16 --channel-mult 1,2,2 --resolution 8 --batch 128 --matrix
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

import torch  # noqa: E402

from sida_core.distill import Distiller, StepHyper, init_networks  # noqa: E402
from sida_core.methods import get_method  # noqa: E402
from sida_core.networks import build_denoiser, count_parameters  # noqa: E402
from sida_core.performance import Performance, graph_breaks  # noqa: E402

#: Published architectures (EDM's CIFAR-10 DDPM++ with VP preconditioning; EDM2-S), as (arch, res, ch, labels, kwargs)
NETS = {
    "cifar10-ddpmpp": ("songunet", 32, 3, 0, {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4,
                                              "attn_resolutions": [16], "dropout": 0.13}),
    "edm2-s": ("edm2", 64, 4, 1000, {"model_channels": 192, "channel_mult": [1, 2, 3, 4], "num_blocks": 3,
                                     "attn_resolutions": [16, 8]}),
}
#: the options --matrix combines (compile only when --compile is given: its warm-up is minutes on a CPU)
MATRIX_OPTIONS = ("channels_last", "fused_adam", "single_psi_forward", "compile")


def int_list(text: str) -> list[int]:
    text = text.strip().strip("[]")
    return [int(v) for v in text.replace(",", " ").split()] if text else []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", choices=["custom", *NETS], default="custom",
                   help="a published architecture (overrides --arch/--model-channels/.../--channels/--label-dim)")
    p.add_argument("--arch", choices=["songunet", "mlp"], default="songunet")
    p.add_argument("--model-channels", type=int, default=16, help="SongUNet base channels (MLP: hidden width)")
    p.add_argument("--channel-mult", type=int_list, default=[1, 2], help="SongUNet channel multipliers, e.g. 1,2,2")
    p.add_argument("--num-blocks", type=int, default=1, help="SongUNet residual blocks per resolution")
    p.add_argument("--attn-resolutions", type=int_list, default=[], help="SongUNet attention resolutions, e.g. 16")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--label-dim", type=int, default=0, help="class-conditional with this many classes (0: uncond)")
    p.add_argument("--batch", type=int, default=16, help="total batch per step")
    p.add_argument("--per-worker", type=int, default=None, help="micro-batch (default: --batch, i.e. 1 round)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile G_theta, f_psi and f_phi")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for nets and inputs")
    p.add_argument("--fused-adam", action="store_true", help="fused Adam (foreach where the device has no fused)")
    p.add_argument("--single-psi-forward", action="store_true", help="one f_psi pass over [fake; real] (SiDA)")
    p.add_argument("--matrix", action="store_true",
                   help="every combination of the eager options (+ all with compile if --compile), round-robin timing")
    a = p.parse_args(argv)
    a.per_worker = a.per_worker or a.batch
    if a.batch % a.per_worker:
        p.error(f"--batch ({a.batch}) must be divisible by --per-worker ({a.per_worker})")
    if a.steps < 1 or a.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return a


# ----------------------------------------------------------------------------------------------- memory
class CpuPeakRSS:
    """Peak resident set size of this process over a phase (see the module docstring for the sources)."""

    def __init__(self):
        self._sampler = None
        if self._vmhwm() is not None and self._clear_refs():
            self.method = "linux VmHWM (peak RSS), reset per method via /proc/self/clear_refs"
        else:
            try:
                import psutil  # noqa: F401

                self.method = "psutil RSS sampled every 1 ms (max)"
            except ImportError:
                self.method = "resource.getrusage ru_maxrss (process-lifetime peak, not reset between methods)"

    @staticmethod
    def _vmhwm():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _rss():
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def start(self) -> None:
        self.rss_before = self._rss()
        if self.method.startswith("linux"):
            self._clear_refs()
        elif self.method.startswith("psutil"):
            import psutil

            proc, self._peak, self._stop = psutil.Process(), 0, threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()

    def stop(self) -> dict:
        if self.method.startswith("linux"):
            peak = self._vmhwm()
        elif self.method.startswith("psutil"):
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        out = {"peak_rss_bytes": peak, "rss_before_bytes": self.rss_before}
        if peak is not None and self.rss_before is not None:
            out["peak_rss_increase_bytes"] = peak - self.rss_before
        return out


class CudaPeak:
    method = "torch.cuda.max_memory_allocated / max_memory_reserved after reset_peak_memory_stats"

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> dict:
        torch.cuda.synchronize(self.device)
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                "allocated_before_bytes": self.before}


# ----------------------------------------------------------------------------------------------- benchmark
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def performance(a, **override) -> Performance:
    flags = {o: getattr(a, o) for o in MATRIX_OPTIONS}
    flags.update(override)
    return Performance(compile=("generator", "fake_score", "teacher") if flags["compile"] else (),
                       compile_mode=a.compile_mode, channels_last=flags["channels_last"],
                       adam="fused" if flags["fused_adam"] else "default", single_psi_forward=flags["single_psi_forward"])


def hyper(method: str, a, perf: Performance | None = None) -> StepHyper:
    return StepHyper(performance=perf or performance(a), method=method, alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01,
                     lambda_adv_psi=1.0,
                     sigma_init=2.5, t_max=800.0, p_mean=-1.2, p_std=1.2, fake_score_only_kimg=0.0, sid_until_kimg=0.0,
                     lr_psi=1e-5, lr_theta=1e-5, betas=(0.0, 0.999), eps=1e-8 if a.precision == "fp32" else 1e-6,
                     total_batch=a.batch, per_worker=a.per_worker, ema_mimg=0.5, ema_rampup=0.05,
                     precision=a.precision, seed=a.seed, psi_grad_clip=1.0 if adversarial(method) else None)


def adversarial(method: str) -> bool:
    """The method's psi step also trains the discriminator on real images (then the real branch is timed too)."""
    return get_method(method).adversarial_psi


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, a, teacher, real, real_labels, device, meter) -> dict:
    G, psi = init_networks(teacher)
    meter.start()
    d = Distiller(hyper(method, a), copy.deepcopy(teacher), G.to(device), psi.to(device),
                  *((real, real_labels) if adversarial(method) else (None, None)), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 loss-scale back-offs in the first steps
        for _ in range(a.warmup):
            d.step()
        sync(device)
        times, g_updates = [], 0
        for _ in range(a.steps):
            t0 = time.perf_counter()
            st = d.step()
            sync(device)
            times.append(time.perf_counter() - t0)
            g_updates += int(st.get("G_updated", 0))
    mem = meter.stop()
    expected = get_method(method).final_stage.value
    assert st["stage"] == expected, f"{method}: ran in stage {st['stage']!r}, expected {expected!r}"
    total = sum(times)
    out = {"stage": st["stage"], "images_per_s": a.batch * a.steps / total, "sec_per_step_mean": total / a.steps,
           "sec_per_step_median": statistics.median(times), "sec_per_step_min": min(times),
           "generator_updates_applied": f"{g_updates}/{a.steps}", "memory": mem}
    del d, G, psi
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def matrix(a, teacher, real, real_labels, device) -> dict:
    """Every combination of the eager speed options, plus (with ``--compile``) torch.compile on top of the fastest
    eager combination, timed round-robin: each round runs one step of every (combination, method) in turn.

    Compile joins as one combination, not as a factor of the matrix: each compiled combination that changes the
    graphs (memory format, single psi forward) costs minutes of compilation on a CPU. The fastest eager combination
    is picked by a short round-robin pre-timing (3 rounds) before compiling."""
    names = [o for o in MATRIX_OPTIONS if o != "compile"]
    combos = [dict(zip(names, bits)) for bits in itertools.product([False, True], repeat=len(names))]
    runs = {}
    build(runs, combos, a, teacher, real, real_labels, device)
    if a.compile:
        pre = {k: [] for k in runs}
        time_round_robin(runs, 3, device, into=pre)
        best = max(combos, key=lambda c: a.batch / statistics.median(pre[(key_of(a, c, "sida"), "sida")]))
        combos.append({**best, "compile": True})
        build(runs, combos[-1:], a, teacher, real, real_labels, device)
    time_round_robin(runs, a.steps, device)
    return matrix_report(a, runs, combos)


def key_of(a, combo: dict, method: str) -> str:
    """The options of ``combo`` as run for ``method`` (SiD has no real branch: no single psi forward)."""
    flags = {**{o: combo.get(o, False) for o in MATRIX_OPTIONS},
             **({} if adversarial(method) else {"single_psi_forward": False})}
    return performance(a, **flags).describe()


def build(runs: dict, combos: list[dict], a, teacher, real, real_labels, device) -> None:
    for combo in combos:
        for method in ("sid", "sida"):
            flags = {**{o: combo.get(o, False) for o in MATRIX_OPTIONS},
                     **({} if adversarial(method) else {"single_psi_forward": False})}
            perf = performance(a, **flags)
            key = perf.describe()
            if (key, method) in runs:
                continue
            G, psi = init_networks(teacher)
            d = Distiller(hyper(method, a, perf), copy.deepcopy(teacher), G.to(device), psi.to(device),
                          *((real, real_labels) if adversarial(method) else (None, None)), device=device)
            breaks0, t0 = graph_breaks(), time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(max(a.warmup, 2 if combo.get("compile") else a.warmup)):
                    d.step()
            sync(device)
            runs[(key, method)] = {"d": d, "times": [], "warmup_s": time.perf_counter() - t0,
                                   "graph_breaks": graph_breaks() - breaks0, "combo": combo, "notes": d.perf_notes}
            print(f"[matrix] ready: {method:4s} {key} (warm-up {runs[(key, method)]['warmup_s']:.1f} s)",
                  file=sys.stderr, flush=True)


def time_round_robin(runs: dict, rounds: int, device, into: dict | None = None) -> None:
    """``rounds`` rounds of one step of every run, the starting run rotating; step times go to ``into`` (default:
    each run's ``times``)."""
    keys = list(runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rnd in range(rounds):
            for k in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
                t0 = time.perf_counter()
                runs[k]["d"].step()
                sync(device)
                (into[k] if into is not None else runs[k]["times"]).append(time.perf_counter() - t0)


def matrix_report(a, runs: dict, combos: list[dict]) -> dict:
    rate = {k: a.batch / statistics.median(v["times"]) for k, v in runs.items()}
    base = rate[(Performance().describe(), "sida")]
    rows = []
    for combo in combos:
        key, sid_key = key_of(a, combo, "sida"), key_of(a, combo, "sid")
        r = runs[(key, "sida")]
        rows.append({"options": key, **{o: combo.get(o, False) for o in MATRIX_OPTIONS},
                     "sida_images_per_s": rate[(key, "sida")], "sid_images_per_s": rate[(sid_key, "sid")],
                     "sida_speedup_over_eager": rate[(key, "sida")] / base,
                     "sida_over_sid_time": rate[(sid_key, "sid")] / rate[(key, "sida")],
                     "warmup_s": r["warmup_s"], "graph_breaks": r["graph_breaks"], "notes": r["notes"]})
    best = max(rows, key=lambda row: row["sida_images_per_s"])
    return {"timing": "median of per-step times, round-robin over all combinations in one process",
            "rounds": a.steps, "combinations": rows, "best": best["options"],
            "best_sida_speedup_over_eager": best["sida_speedup_over_eager"],
            "best_sida_over_sid_time": best["sida_over_sid_time"]}


def build_teacher(a, device):
    if a.net != "custom":
        arch, a.resolution, a.channels, a.label_dim, kwargs = NETS[a.net]
        a.arch = arch
    elif a.arch == "songunet":
        kwargs = {"model_channels": a.model_channels, "channel_mult": a.channel_mult, "num_blocks": a.num_blocks,
                  "attn_resolutions": a.attn_resolutions, "dropout": 0.0}
    else:
        kwargs = {"hidden": a.model_channels}
    teacher = build_denoiser(a.arch, a.resolution, a.channels, a.label_dim, kwargs).to(device).eval().requires_grad_(False)
    return teacher, kwargs


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu")
    torch.manual_seed(a.seed)
    teacher, kwargs = build_teacher(a, device)
    n_params = count_parameters(teacher)
    # the real batch for SiDA's discriminator: host memory, as the engine keeps the dataset
    gen = torch.Generator().manual_seed(a.seed)
    real = torch.rand((max(4 * a.batch, 256), a.channels, a.resolution, a.resolution), generator=gen) * 2 - 1
    real_labels = None
    if a.label_dim:
        idx = torch.randint(a.label_dim, (real.shape[0],), generator=gen)
        real_labels = torch.nn.functional.one_hot(idx, a.label_dim).float()
    head = {
        "benchmark": "Distiller.step throughput (psi update + theta update + EMA)",
        "torch": torch.__version__, "python": platform.python_version(),
        "device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "precision": a.precision,
        "network": {"net": a.net, "arch": a.arch, "resolution": a.resolution, "channels": a.channels,
                    "label_dim": a.label_dim, "kwargs": kwargs},
        "parameters_per_network": n_params, "parameters_trainable": 2 * n_params, "parameters_all_networks": 3 * n_params,
        "batch": a.batch, "per_worker": a.per_worker, "rounds": a.batch // a.per_worker,
        "warmup_steps": a.warmup, "timed_steps": a.steps,
    }
    if a.matrix:
        return {**head, "matrix": matrix(a, teacher, real, real_labels, device)}
    meter = CudaPeak(device) if device.type == "cuda" else CpuPeakRSS()
    results = {m: measure(m, a, teacher, real, real_labels, device, meter) for m in ("sid", "sida")}
    return {
        **head, "options": performance(a).describe(),
        "memory_method": meter.method,
        **({"memory_note": "CPU: compare peak_rss_bytes; the later method's rss_before_bytes already holds heap "
                           "freed by the earlier one (the allocator keeps it), so its increase is understated"}
           if device.type == "cpu" else {}),
        "sid": results["sid"], "sida": results["sida"],
        "sida_over_sid_time": results["sida"]["sec_per_step_mean"] / results["sid"]["sec_per_step_mean"],
    }


if __name__ == "__main__":
    print(json.dumps(main()))
