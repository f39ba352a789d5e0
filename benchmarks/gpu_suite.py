#!/usr/bin/env python
"""Driver of ``benchmarks/gpu_suite.sh`` (see there): runs each check as its own process, prints one JSON object.

Every part is a subprocess with its own time limit; a part that fails or times out is reported with its error and
the others still run. ``--small``: CPU, small sizes (what CI runs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py")]
DIGITS_NET = ["--model-channels", "16", "--channel-mult", "1,2,2", "--resolution", "8"]
BEST_GPU = ["--channels-last", "--fused-adam", "--single-psi-forward"]


def parts(small: bool, device: str) -> list[tuple[str, list[str], float]]:
    """(name, command, time limit in s). GPU sizes sum to about 7 minutes on an H100-class GPU."""
    dev = ["--device", device]
    if small:
        tiny = ["--model-channels", "8", "--channel-mult", "1,2", "--resolution", "8", "--steps", "2", "--warmup", "1"]
        return [
            ("matrix_digits", STEP + dev + tiny + ["--batch", "16", "--matrix"], 300),
            ("step_small_eager", STEP + dev + tiny + ["--batch", "16"], 120),
            ("step_small_best", STEP + dev + tiny + ["--batch", "16"] + BEST_GPU, 120),
        ]
    return [
        ("matrix_digits", STEP + dev + DIGITS_NET + ["--batch", "128", "--matrix", "--steps", "20"], 120),
        ("matrix_cifar10", STEP + dev + ["--net", "cifar10-ddpmpp", "--batch", "32", "--matrix", "--steps", "10"], 150),
        ("cifar10_eager_fp32", STEP + dev + ["--net", "cifar10-ddpmpp", "--batch", "32", "--steps", "10"], 60),
        ("cifar10_best_bf16_compile", STEP + dev + ["--net", "cifar10-ddpmpp", "--batch", "32", "--steps", "10",
                                                     "--precision", "bf16", "--compile"] + BEST_GPU, 150),
        ("edm2s_eager_fp16", STEP + dev + ["--net", "edm2-s", "--batch", "64", "--steps", "5", "--precision", "fp16"], 90),
        ("edm2s_best_fp16", STEP + dev + ["--net", "edm2-s", "--batch", "64", "--steps", "5", "--precision", "fp16"]
         + BEST_GPU, 90),
    ]


def train_part(small: bool, device: str, out_dir: Path) -> tuple[str, list[str], float]:
    """A 1-worker `sida train` of the digits config: on CUDA with nccl and a scorer on a quarter GPU."""
    sets = ["total_kimg=2", "checkpoint_every_kimg=1", "log_every_kimg=0.5", "teacher.train.kimg=2",
            "batch.total=64", "batch.per_worker=64", "stages.fake_score_only_kimg=0.5", "stages.sid_until_kimg=1",
            "metric.num_images=500", f"storage.uri={out_dir}", "scaling.num_workers=1"]
    if device == "cuda":
        sets += ["scaling.use_gpu=true", "metric.gpus_per_scorer=0.25", "device=cuda",
                 "performance.channels_last=true", "performance.adam=fused", "performance.single_psi_forward=true"]
    if small:
        sets += ["total_kimg=0.5", "checkpoint_every_kimg=0.25", "log_every_kimg=0.25", "teacher.train.kimg=0.5",
                 "batch.total=32", "batch.per_worker=32", "stages.fake_score_only_kimg=0.1",
                 "stages.sid_until_kimg=0.2", "metric.num_images=256"]
    cmd = [sys.executable, "-m", "pipelines.cli", "train", str(ROOT / "configs" / "digits.yaml"), "--name", "gpu-suite"]
    for s in sets:
        cmd += ["--set", s]
    return ("sida_train_1worker", cmd, 300 if small else 180)


def run(name: str, cmd: list[str], limit: float) -> dict:
    print(f"[gpu_suite] {name} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {limit:.0f} s", "seconds": round(time.time() - t0, 1)}
    seconds = round(time.time() - t0, 1)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"ok": False, "returncode": p.returncode, "error": (p.stderr or p.stdout).strip().splitlines()[-5:],
                "seconds": seconds}
    print(f"[gpu_suite] {name}: {seconds} s", file=sys.stderr, flush=True)
    return {"ok": True, "seconds": seconds, "result": json.loads(lines[-1])}


def summary(results: dict) -> dict:
    """The headline numbers of each part (the full JSON of each part stays under ``parts``)."""
    out = {}
    for name, r in results.items():
        res = r.get("result") or {}
        if "matrix" in res:
            out[name] = {"best": res["matrix"]["best"],
                         "best_sida_speedup_over_eager": round(res["matrix"]["best_sida_speedup_over_eager"], 3),
                         "best_sida_over_sid_time": round(res["matrix"]["best_sida_over_sid_time"], 3)}
        elif "sida" in res:
            mem = res["sida"]["memory"]
            out[name] = {"options": res.get("options"), "precision": res.get("precision"),
                         "sida_images_per_s": round(res["sida"]["images_per_s"], 1),
                         "sid_images_per_s": round(res["sid"]["images_per_s"], 1),
                         "sida_peak_gb": round((mem.get("peak_allocated_bytes") or mem.get("peak_rss_bytes") or 0) / 1e9, 2)}
        elif res:
            out[name] = {k: res.get(k) for k in ("status", "kimg", "metric_rows", "scoring", "seconds", "run_uri")
                         if k in res}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the GPU checks of the step; one JSON summary")
    ap.add_argument("--small", action="store_true", help="CPU, small sizes (CI)")
    a = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.small else "cpu"
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    t0 = time.time()
    results = {}
    with tempfile.TemporaryDirectory(prefix="sida-gpu-suite-") as tmp:
        for name, cmd, limit in parts(a.small, device) + [train_part(a.small, device, Path(tmp) / "runs")]:
            results[name] = run(name, cmd, limit)
    report = {"suite": "benchmarks/gpu_suite.sh", "small": a.small, "device": device, "gpu": gpu,
              "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
              "all_ok": all(r["ok"] for r in results.values()), "summary": summary(results), "parts": results}
    print(json.dumps(report))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
