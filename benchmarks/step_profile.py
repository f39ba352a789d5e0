#!/usr/bin/env python
"""Where one SiDA step's time goes: torch profiler over a few ``Distiller.step`` calls, grouped by the phases the
step marks (``record_function``: real batch, the psi update's G forward / psi forward / backward / optimiser, the
theta update's G forward / teacher forward / psi forward / backward / optimiser, EMA) plus the top operators.

Prints one JSON object (stdout) and the same as markdown tables (stderr), for docs/performance.md. Takes
``step_throughput.py``'s network and option flags, e.g.::

    python benchmarks/step_profile.py --model-channels 16 --channel-mult 1,2,2 --resolution 8 --batch 128
    python benchmarks/step_profile.py --net cifar10-ddpmpp --batch 32 --steps 2 --channels-last --fused-adam
"""
from __future__ import annotations

import copy
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import step_throughput as st  # noqa: E402
from sida_core.distill import Distiller, init_networks  # noqa: E402

PHASES = ("data: real batch", "psi step: G forward (no grad)", "psi step: psi forward", "psi step: backward (+ DDP sync)",
          "psi step: optimizer", "theta step: G forward", "teacher forward", "psi forward",
          "theta step: backward (+ DDP sync)", "theta step: optimizer", "EMA")


def main(argv=None) -> dict:
    a = st.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if (a.device == "auto" and torch.cuda.is_available()) or a.device == "cuda" else "cpu")
    torch.manual_seed(a.seed)
    teacher, kwargs = st.build_teacher(a, device)
    real = torch.rand((max(4 * a.batch, 256), a.channels, a.resolution, a.resolution)) * 2 - 1
    labels = (torch.nn.functional.one_hot(torch.randint(a.label_dim, (real.shape[0],)), a.label_dim).float()
              if a.label_dim else None)
    G, psi = init_networks(teacher)
    d = Distiller(st.hyper("sida", a), copy.deepcopy(teacher), G.to(device), psi.to(device), real, labels, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(max(a.warmup, 1)):
            d.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(a.steps):
                d.step()
            st.sync(device)
    events = {e.key: e for e in prof.key_averages()}
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    phases = {k: getattr(events[k], attr) / 1e3 / a.steps for k in PHASES if k in events}
    total = sum(phases.values())
    ops = sorted((e for e in events.values() if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:12]
    out = {"benchmark": "SiDA step profile", "device": device.type, "device_name": st.device_name(device),
           "threads": torch.get_num_threads(), "network": {"net": a.net, "arch": a.arch, "kwargs": kwargs},
           "batch": a.batch, "options": st.performance(a).describe(), "precision": a.precision, "steps": a.steps,
           "time": "CUDA kernel time" if device.type == "cuda" else "CPU time (inclusive)",
           "phases_ms_per_step": {k: round(v, 2) for k, v in phases.items()}, "phases_total_ms": round(total, 2),
           "top_ops_self_cpu_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / a.steps, 2) for e in ops}}
    lines = [f"| phase ({out['options']}) | ms / step | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.1f} | {100 * v / total:.1f}% |" for k, v in phases.items()]
    lines += [f"| **total** | **{total:.1f}** | |", "", "| operator | self CPU ms / step |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in out["top_ops_self_cpu_ms_per_step"].items()]
    print("\n".join(lines), file=sys.stderr)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
