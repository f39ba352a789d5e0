"""``sida sweep SWEEP.yaml``: an ablation sweep as one Ray Tune experiment, every trial a ``sida train``-style run.

Layout (local folder or S3, ``SWEEP_URI = storage.uri / sweep name``)::

    SWEEP_URI/sweep.json        the sweep file as validated, the trial plan (name, axis values) and, once done,
                                each trial's outcome (state, reason, best score)
    SWEEP_URI/<trial name>/     one run folder per trial (RunStore layout: config, teacher, checkpoints, metrics,
                                leaderboard, pinned best, status, events)
    SWEEP_URI/tune/             Ray Tune's own experiment state and per-trial results

Every trial point is validated as a RunConfig before anything starts. A sweep run again on the same folder
continues: trials that ended (finished, diverged, stopped) report their stored result, the others resume from
their newest valid checkpoint.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any, Callable, Optional, Sequence

from store.run_store import TERMINAL_STATES, RunState


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def storage_root(base: dict, layers: Sequence[dict[str, Any]]):
    """The Storage of the base config's ``storage`` section after the dotted overrides in ``layers``."""
    from store.storage import Storage
    from schemas.sweep import storage_config

    return Storage.from_config(storage_config(base, layers))


def prepare_trials(plans, exp_root, *, lineage: Optional[dict] = None, log: Callable[[str], None] = _log) -> list[dict]:
    """Write each trial's run folder (config.json, the teacher, SiD²A's init generator + lineage.json) unless the
    trial already ended; return the trial dicts :func:`ray_jobs.tune.trial_main` takes.

    The teacher is resolved (trained or taken from the cache) once per sweep and copied into every trial, so each
    trial folder stays a self-contained run (``sida train --resume`` works on it); for the digits teacher that is
    a few MB per trial.
    """
    import torch

    from store.run_store import RunStore
    from ray_jobs.train import public_config
    from ray_jobs.datasets import load_run_dataset, run_teacher

    teachers: dict[str, Any] = {}
    out = []
    for plan in plans:
        cfg = plan.cfg
        store = RunStore(exp_root.child(plan.name))
        status = store.read_status() if store.exists() else None
        if not (status and status.get("state") in TERMINAL_STATES):
            key = json.dumps([cfg.teacher.model_dump(mode="json"), cfg.data.model_dump(mode="json")], sort_keys=True)
            if key not in teachers:
                train_set, _ = load_run_dataset(cfg, log)
                teachers[key] = run_teacher(cfg, train_set, torch.device("cpu"), log)[1]
            store.prepare(public_config(cfg), teachers[key], init_generator=cfg.init_generator, lineage=lineage)
        out.append({"name": plan.name, "axes": plan.axes, "run": public_config(cfg), "lease_token": uuid.uuid4().hex})
    return out


def remove_dead_leases(trials: list[dict], exp_root, log: Callable[[str], None] = _log) -> None:
    """After the Tune experiment: delete the run leases its trials left behind. A trial Tune stopped (divergence
    stopper, ASHA) is killed without running its ``finally``, so its lease would block the next writer until its
    heartbeat goes stale. Removed: a lease holding the token this driver gave the trial (Tune has ended every
    trial by now), or one whose holder is dead (e.g. a trial of an earlier, killed run of this sweep)."""
    from store.lease import remove_dead_lease

    for t in trials:
        try:
            gone = remove_dead_lease(exp_root.child(t["name"]), token=t["lease_token"])
        except Exception as exc:  # noqa: BLE001 -- a leftover lease only delays the next writer: say so, go on
            log(f"warning: [{t['name']}] could not check its lease: {' '.join(str(exc).split())[:200]}")
            continue
        if gone is not None:
            log(f"[{t['name']}] removed the lease its ended trial left ({gone.get('owner')})")


def trial_outcomes(plans, exp_root) -> list[dict]:
    """Each trial's outcome from storage (the truth, whatever Tune's in-memory view was)."""
    from store.run_store import RunStore

    out = []
    for plan in plans:
        store = RunStore(exp_root.child(plan.name))
        status = store.read_status() or {}
        rows = [r for r in store.read_rows() if r["kind"] == "live"] if store.exists() else []
        best = store.best_live_row(rows=rows)
        out.append({"name": plan.name, "run_uri": store.uri, "axes": plan.axes, "state": status.get("state", "unknown"),
                    "reason": status.get("reason"), "kimg": status.get("kimg"), "scored": len(rows),
                    "best": None if best is None else {k: best[k] for k in ("checkpoint", "kimg", "metric", "value",
                                                                             "checkpoint_hash")}})
    return out


def run_experiment(plans, search, exp_root, *, trial_cpus: float, lineage: Optional[dict] = None,
                   log: Callable[[str], None] = _log) -> list[dict]:
    """Prepare the trials' folders and run them as one Tune experiment under ``exp_root``; their outcomes."""
    from ray_jobs.tune import run_tuner

    trials = prepare_trials(plans, exp_root, lineage=lineage, log=log)
    tuned = run_tuner(trials, exp_root, trial_cpus=trial_cpus, divergence=search.divergence,
                      early_stopping=search.early_stopping, max_concurrent=search.max_concurrent_trials,
                      total_kimg=max(p.cfg.total_kimg for p in plans), log=log)
    remove_dead_leases(trials, exp_root, log)
    score_leftovers(plans, exp_root, log)
    outcomes = trial_outcomes(plans, exp_root)
    for o in outcomes:
        if o["name"] in tuned["errors"] and o["state"] not in TERMINAL_STATES:
            o.update(state=RunState.FAILED.value, reason=o["reason"] or tuned["errors"][o["name"]])
    return outcomes


def score_leftovers(plans, exp_root, log: Callable[[str], None] = _log) -> None:
    """Score the committed, still unscored checkpoints of every trial that ended (same coordinator and backlog
    policy), so its rows and pinned best are complete: a trial the stopper ended took its scorers with it, and a
    driver killed after a trial finished training but before its scorers drained left that trial finished and
    partly scored (a sweep run again does not run an ended trial again). Trials with nothing owed start no scorer."""
    from store.run_store import RunStore
    from ray_jobs.scoring import ScoringCoordinator, make_scorers, unscored

    for plan in plans:
        m = plan.cfg.metric
        store = RunStore(exp_root.child(plan.name))
        if not m.enabled or (store.read_status() or {}).get("state") not in TERMINAL_STATES:
            continue  # a trial still to run scores its own checkpoints when it resumes
        owed = unscored(store, m)
        if not owed:
            continue
        log(f"[{plan.name}] scoring {len(owed)} checkpoint(s) its trial left unscored")
        coord = ScoringCoordinator(store, make_scorers(m, n=1), m, trial=plan.name, poll_s=0.5,
                                   log=lambda s, n=plan.name: log(f"[{n}] {s}"))
        try:
            coord.finish(timeout_s=min(m.drain_timeout_s, 600))
        finally:
            coord.close()


def connect_for(plans, trial_cpus: float, wanted: Optional[int], address: Optional[str]) -> bool:
    """Start a local Ray big enough for ``wanted`` trials at once (logical CPUs may exceed cores: the small CPU
    runs are single-threaded and mostly wait), or join ``address``. True if this call started Ray."""
    from ray_jobs.cluster import connect, worker_env
    from ray_jobs.tune import trial_resources

    footprint = max((trial_resources(p.cfg, trial_cpus) for p in plans), key=lambda f: f["cpus"])
    at_once = min(wanted or 1, len(plans))
    return connect(address, num_cpus=footprint["cpus"] * at_once, env=worker_env(), storage_cfg=plans[0].cfg.storage)


def best_of(outcomes: list[dict]) -> Optional[dict]:
    scored = [o for o in outcomes if o["best"] is not None]
    if not scored:
        return None
    o = min(scored, key=lambda o: o["best"]["value"])
    return {"trial": o["name"], "run_uri": o["run_uri"], "axes": o["axes"], **o["best"]}


def refuse_methods_that_start_from_a_generator(plans, path) -> None:
    """SiD²A starts from the best generator of a finished SiD run, which only a staged pipeline provides (a later
    stage with ``init_from``): a sweep trial of it could never start."""
    from schemas.loader import ConfigError
    from sida_core.methods import get_method

    for p in plans:
        method = get_method(p.cfg.method)
        if method.starts_from_generator:
            raise ConfigError(f"invalid sweep {path}: trial {p.name}: method {method.name!r} ({method.display}) starts "
                              f"from a finished SiD run's best generator, which a sweep cannot give; run it as a "
                              f"stage with init_from in `sida pipeline` (e.g. configs/pipelines/digits_sid_then_sid2a.yaml)")


def run_sweep(path: str, overrides: Sequence[str] = (), *, address: Optional[str] = None,
              log: Callable[[str], None] = _log) -> dict:
    """Run (or continue) the sweep in ``path``; returns the summary ``sida sweep`` prints."""
    from pipelines.checks import check_before_writes, check_references
    from schemas.sweep import load_sweep, parse_overrides, plan_trials

    t0 = time.time()
    sweep, base, _ = load_sweep(path)
    ov = parse_overrides(overrides)
    root = storage_root(base, [sweep.set, ov])
    exp_root = root.child(sweep.name)
    plans = plan_trials(sweep, base, source=str(path), storage_uri=exp_root.uri, layers=[sweep.set, ov])
    refuse_methods_that_start_from_a_generator(plans, path)
    for p in plans:  # before sweep.json or any trial folder is written
        check_before_writes(p.cfg, address)
    check_references([p.cfg for p in plans])
    root.check()
    record = {"kind": "sweep", "name": sweep.name, "file": str(path), "sweep": sweep.model_dump(mode="json"),
              "trials": [{"name": p.name, "axes": p.axes} for p in plans], "time": time.time()}
    exp_root.write_json("sweep.json", record)
    log(f"sweep {exp_root.uri}: {len(plans)} trial(s): {', '.join(p.name for p in plans)}")
    started = connect_for(plans, sweep.trial_cpus, sweep.max_concurrent_trials, address)
    try:
        outcomes = run_experiment(plans, sweep, exp_root, trial_cpus=sweep.trial_cpus, log=log)
    finally:
        if started:
            import ray

            ray.shutdown()
    record.update(outcomes=outcomes, best=best_of(outcomes), seconds=round(time.time() - t0, 1))
    exp_root.write_json("sweep.json", record)
    return {"sweep_uri": exp_root.uri, "trials": outcomes, "best": record["best"], "seconds": record["seconds"]}

