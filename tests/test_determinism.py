"""Reproducibility across machines: the CPU kernel caps reach torch, each kernel family changes a trained
network's bits (so each cap is needed), and the cached built-in teacher does not depend on the thread count."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ray_jobs.cluster import worker_env
from sida_core.determinism import KERNEL_LEVELS, PINNED_VARS, cpu_kernel_env, cpu_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few EDM training steps of the digits teacher's network, then a hash of its weights and the capability in use.
TRAIN_HASH = """
import hashlib, sys
import pipelines.cli as cli
cli.pin_cpu_kernels()          # what `sida` does first
import torch
from sida_core.teacher import train_teacher
from sida_core.training_loop import build_from_spec
torch.set_num_threads(1)
torch.manual_seed(0)
net = build_from_spec({"arch": "songunet", "img_resolution": 8, "img_channels": 1, "label_dim": 0,
                       "kwargs": {"model_channels": 16, "channel_mult": [1, 2, 2], "num_blocks": 1, "attn_resolutions": [],
                                  "dropout": 0.0}})
x = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
ema = train_teacher(net, x, None, kimg=0.384, batch=128, lr=2e-3, lr_rampup_kimg=0.1, ema_halflife_kimg=0.1, seed=0)
h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in ema.parameters())).hexdigest()[:16]
print(torch.backends.cpu.get_cpu_capability(), h)
"""


def _run(env_extra: dict) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*PINNED_VARS, "SIDA_CPU_KERNELS")}
    env.update(env_extra, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", TRAIN_HASH], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cap, digest = out.stdout.split()[-2:]
    return cap, digest


def _has_avx2() -> bool:
    return bool(cpu_kernel_env("avx2", {}))


def test_kernel_env_levels_and_precedence():
    assert cpu_kernel_env("native", {}) == {}
    compat = cpu_kernel_env("compatible", {})
    if compat:  # x86
        assert compat == KERNEL_LEVELS["compatible"]
        # a variable the user set wins
        assert "MKL_CBWR" not in cpu_kernel_env("compatible", {"MKL_CBWR": "COMPATIBLE"})
    with pytest.raises(ValueError, match="SIDA_CPU_KERNELS='avx9'"):
        cpu_kernel_env("avx9", {})


@pytest.mark.skipif(not _has_avx2(), reason="needs an x86 CPU with AVX2")
def test_pinned_kernels_reach_torch_and_every_family_matters():
    """`sida`'s entry point applies SIDA_CPU_KERNELS before torch loads: capping at compatible selects ATen's scalar
    kernels and gives exactly the weights the three variables set by hand give. Uncapping any one family alone
    (this AVX2 machine's native kernel in it) changes the trained weights: all three caps are needed."""
    pinned = _run({"SIDA_CPU_KERNELS": "compatible"})
    assert pinned[0] == "DEFAULT"
    assert pinned == _run({"SIDA_CPU_KERNELS": "native", **KERNEL_LEVELS["compatible"]})
    native = _run({"SIDA_CPU_KERNELS": "native"})
    assert native[0] != "DEFAULT" and native[1] != pinned[1]
    for family in KERNEL_LEVELS["compatible"]:
        others = {k: v for k, v in KERNEL_LEVELS["compatible"].items() if k != family}
        assert _run({"SIDA_CPU_KERNELS": "native", **others})[1] != pinned[1], f"{family} made no difference"


def test_caps_are_forwarded_to_ray_workers(monkeypatch):
    monkeypatch.setenv("SIDA_CPU_KERNELS", "compatible")
    for k, v in KERNEL_LEVELS["compatible"].items():
        monkeypatch.setenv(k, v)
    env = worker_env()
    assert env["SIDA_CPU_KERNELS"] == "compatible"
    assert all(env[k] == v for k, v in KERNEL_LEVELS["compatible"].items())


def test_builtin_teacher_does_not_depend_on_thread_count(tmp_path, monkeypatch):
    from schemas.loader import load_run_config
    from sida_core.data import load_dataset
    from sida_core.training_loop import get_teacher

    monkeypatch.setenv("SIDA_CACHE", str(tmp_path))
    cfg = load_run_config(os.path.join(REPO, "configs", "digits.yaml"),
                          ["teacher.train.kimg=0.256", "teacher.train.lr_rampup_kimg=0.1"])
    train_set, _ = load_dataset(cfg.data)
    weights = []
    for threads in (1, 2):
        with cpu_threads(threads):
            net, path = get_teacher(cfg, train_set, "cpu", log=lambda m: None)
            assert torch.get_num_threads() == threads  # restored after training
        weights.append({k: v.clone() for k, v in net.state_dict().items()})
        shutil.rmtree(path)  # train again, not reuse
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
