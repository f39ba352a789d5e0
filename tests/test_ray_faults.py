"""Fault tolerance of ``sida train`` as users run it (a real subprocess with its own local Ray): a training
worker killed with SIGKILL mid-run is restarted by Ray from the latest checkpoint, and the run ends exactly where
an uninterrupted run of the same config ends (same weights, optimiser moments, EMA, scaler state and metric rows),
with every metric row exactly once and only verifiable checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from store.run_store import RunStore
from store.storage import Storage
from sida_core import checkpoint as ckpt

from tests.ray_head import train_worker_pids
from tests.recipes import ROOT, TINY_RAY as TINY

SIDA = Path(sys.executable).with_name("sida")
# metric columns that are wall-clock measurements, not results of the computation
TIMING_COLUMNS = ("time", "images_per_s")


def _sida_train(name: str, sets: list[str]) -> subprocess.Popen:
    env = dict(os.environ, SIDA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [str(SIDA), "train", str(ROOT / "configs" / "digits.yaml"), "--workers", "2", "--name", name]
    cmd += [a for s in sets for a in ("--set", s)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _finish(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def assert_same_state(got, want, where: str = "state") -> None:
    """``got`` equals ``want`` exactly: the same keys all the way down, bit-identical tensors (dtype and shape
    included), equal plain values."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} vs {type(want).__name__}"
    if isinstance(want, dict):
        assert got.keys() == want.keys(), f"{where}: keys {sorted(map(str, got))} vs {sorted(map(str, want))}"
        for k in want:
            assert_same_state(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} vs {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_state(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: {got.dtype}{list(got.shape)} vs " \
                                                                    f"{want.dtype}{list(want.shape)}"
        assert torch.equal(got, want), f"{where}: differs, max |diff| " \
                                       f"{(got.double() - want.double()).abs().max().item():.3g}"
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def test_sigkill_of_a_worker_resumes_from_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    total_steps = 40
    sets = TINY + [f"storage.uri={runs}", f"total_kimg={total_steps * 0.032}", "checkpoint_every_kimg=0.32",
                   "keep_checkpoints=3", "max_failures=2"]
    proc = _sida_train("f1", sets)
    store = RunStore(Storage(str(runs)).child("f1"))
    victim = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            names = store.checkpoint_names() if store.storage.exists("") else []
            if any(store.storage.exists(f"{n}/manifest.json") for n in names):
                workers = train_worker_pids(proc.pid)
                if len(workers) == 2:
                    victim = workers[-1]
                    committed = [n for n in store.checkpoint_names() if store.storage.exists(f"{n}/manifest.json")]
                    os.kill(victim, signal.SIGKILL)
                    break
            time.sleep(0.1)
    finally:
        if victim is None and proc.poll() is None:
            proc.kill()
    assert victim is not None, ("never saw a checkpoint and two training workers before the run ended: "
                                + proc.communicate()[1][-3000:])
    summary = _finish(proc, 500)
    assert summary["status"] == "finished" and abs(summary["kimg"] - total_steps * 0.032) < 1e-9, summary
    killed_at = int(ckpt.NAME_RE.match(committed[-1]).group(1))
    assert killed_at < total_steps * 32, "the kill must land before the end of the run"
    # one restart, from the newest committed checkpoint (or the one before it, when the kill came between the
    # newest's upload and Ray registering it: the worker prefers Ray's registered checkpoint), never from scratch
    resumes = [e for e in store.events() if e["kind"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["checkpoint"] in committed[-2:], (committed, store.events())
    assert resumes[0]["cur_nimg"] == int(ckpt.NAME_RE.match(resumes[0]["checkpoint"]).group(1)) >= 320, resumes
    # every metric row exactly once, none lost
    assert store.read_metrics().column("cur_nimg").to_pylist() == list(range(32, total_steps * 32 + 1, 32))
    names = store.checkpoint_names()
    # keep_checkpoints=3, plus at most the one whose upload finished but whose registration with Ray the kill
    # interrupted (Ray's rotation does not know it; it is valid)
    assert names[-1] == ckpt.checkpoint_name(total_steps * 32) and len(names) <= 4, names
    for n in names:
        state, manifest = store.load_checkpoint(n)
        assert int(state["progress"]["cur_nimg"]) == manifest["cur_nimg"]

    # The same run without the kill: randomness is a pure function of (seed, step, micro-batch), so resuming from
    # a checkpoint that holds everything (weights, both Adams, EMA, grad scalers, step) ends bit for bit where the
    # uninterrupted run ends; a lost or stale piece of state (e.g. fresh Adam moments) does not.
    assert _finish(_sida_train("ref", sets), 500)["status"] == "finished"
    ref = RunStore(Storage(str(runs)).child("ref"))
    assert [e["kind"] for e in ref.events()] == ["start", "finished"], ref.events()
    final = ckpt.checkpoint_name(total_steps * 32)
    (state, manifest), (state_ref, manifest_ref) = store.load_checkpoint(final), ref.load_checkpoint(final)
    assert {"generator", "generator_ema", "fake_score", "opt_G", "opt_psi", "scaler_G", "scaler_psi",
            "progress"} <= set(state_ref), sorted(state_ref)
    assert_same_state(state, state_ref)
    assert manifest["step"] == manifest_ref["step"] == total_steps
    rows, rows_ref = (s.read_metrics().drop_columns(list(TIMING_COLUMNS)).to_pylist() for s in (store, ref))
    assert rows == rows_ref
