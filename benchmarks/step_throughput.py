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

Example::

    python benchmarks/step_throughput.py --model-channels 16 --channel-mult 1,2 --resolution 8 --batch 16
"""
from __future__ import annotations

import argparse
import gc
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
from sida_core.networks import build_denoiser, count_parameters  # noqa: E402


def int_list(text: str) -> list[int]:
    text = text.strip().strip("[]")
    return [int(v) for v in text.replace(",", " ").split()] if text else []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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


def hyper(method: str, a) -> StepHyper:
    return StepHyper(method=method, alpha=1.0, lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0,
                     sigma_init=2.5, t_max=800.0, p_mean=-1.2, p_std=1.2, fake_score_only_kimg=0.0, sid_until_kimg=0.0,
                     lr_psi=1e-5, lr_theta=1e-5, betas=(0.0, 0.999), eps=1e-8 if a.precision == "fp32" else 1e-6,
                     total_batch=a.batch, per_worker=a.per_worker, ema_mimg=0.5, ema_rampup=0.05,
                     precision=a.precision, seed=a.seed, psi_grad_clip=1.0 if method == "sida" else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method: str, a, teacher, real, real_labels, device, meter) -> dict:
    G, psi = init_networks(teacher)
    meter.start()
    d = Distiller(hyper(method, a), teacher, G.to(device), psi.to(device), real if method == "sida" else None,
                  real_labels if method == "sida" else None, device=device)
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
    expected = "sid" if method == "sid" else "sida"
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


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu")
    torch.manual_seed(a.seed)
    if a.arch == "songunet":
        kwargs = {"model_channels": a.model_channels, "channel_mult": a.channel_mult, "num_blocks": a.num_blocks,
                  "attn_resolutions": a.attn_resolutions, "dropout": 0.0}
    else:
        kwargs = {"hidden": a.model_channels}
    teacher = build_denoiser(a.arch, a.resolution, a.channels, a.label_dim, kwargs).to(device).eval().requires_grad_(False)
    n_params = count_parameters(teacher)
    # the real batch for SiDA's discriminator: host memory, as the engine keeps the dataset
    gen = torch.Generator().manual_seed(a.seed)
    real = torch.rand((max(4 * a.batch, 256), a.channels, a.resolution, a.resolution), generator=gen) * 2 - 1
    real_labels = None
    if a.label_dim:
        idx = torch.randint(a.label_dim, (real.shape[0],), generator=gen)
        real_labels = torch.nn.functional.one_hot(idx, a.label_dim).float()
    meter = CudaPeak(device) if device.type == "cuda" else CpuPeakRSS()
    results = {m: measure(m, a, teacher, real, real_labels, device, meter) for m in ("sid", "sida")}
    report = {
        "benchmark": "Distiller.step throughput (psi update + theta update + EMA)",
        "torch": torch.__version__, "python": platform.python_version(),
        "device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
        "precision": a.precision,
        "network": {"arch": a.arch, "resolution": a.resolution, "channels": a.channels, "label_dim": a.label_dim,
                    "kwargs": kwargs},
        "parameters_per_network": n_params, "parameters_trainable": 2 * n_params, "parameters_all_networks": 3 * n_params,
        "batch": a.batch, "per_worker": a.per_worker, "rounds": a.batch // a.per_worker,
        "warmup_steps": a.warmup, "timed_steps": a.steps,
        "memory_method": meter.method,
        **({"memory_note": "CPU: compare peak_rss_bytes; the later method's rss_before_bytes already holds heap "
                           "freed by the earlier one (the allocator keeps it), so its increase is understated"}
           if device.type == "cpu" else {}),
        "sid": results["sid"], "sida": results["sida"],
        "sida_over_sid_time": results["sida"]["sec_per_step_mean"] / results["sid"]["sec_per_step_mean"],
    }
    return report


if __name__ == "__main__":
    print(json.dumps(main()))
