"""Ray Tune wiring for sweeps: the trial (a Tune function trainable around one TorchTrainer), the divergence
stopper, per-trial resources and the ``Tuner`` itself. Nothing here knows sweep files; ``pipelines/sweep.py``
prepares the trials' run folders and calls :func:`run_tuner`.

A trial is one run folder ``EXPERIMENT_URI/<trial name>`` laid out exactly like a ``sida train`` run
(:class:`RunStore`), so ``sida leaderboard``, ``sida evaluate`` and ``sida train --resume`` work on it unchanged.
Under Ray Train V2 a ``TorchTrainer`` cannot be a Tune trainable itself; the trial function builds one with
``TuneReportCallback`` (rank 0's reports reach Tune) and calls ``fit()``, with its own scorer actors and
:class:`ScoringCoordinator`. The score Tune optimises comes from the leaderboard: rank 0 adds the run's newest live
scores to every report (:class:`ray_jobs.train.LiveScores`), and after ``fit`` and the scorers' drain the trial
reports its final best once more.

Resources: the trial's placement group holds the trial driver (``trial_cpus``) and one bundle per scorer, so the
scorer actors (child actors, captured by the trial's group) fit inside it; the Train workers get their own group
from Ray Train. :func:`trial_resources` is the whole footprint, which :func:`run_tuner` uses to bound concurrency.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Optional

from ray.tune.stopper import Stopper

from sida_core.loop import kimg_to_nimg
from store.lease import TTL_S as LEASE_TTL_S, RunLease
from store.run_store import TERMINAL_STATES, RunState, RunStore
from store.storage import Storage



def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def final_metrics(store: RunStore, cfg) -> dict:
    """The trial's last report, from storage: its state and best live score (after the scorers' drain)."""
    status = store.read_status() or {}
    rows = [r for r in store.read_rows() if r["kind"] == "live" and r["metric"] == cfg.metric.name]
    best = store.best_live_row(cfg.metric.name, rows)
    newest = max(rows, key=lambda r: r["cur_nimg"], default=None)
    out = {"run": store.name, "final": 1.0, "state": status.get("state", "unknown"), "kimg": float(status.get("kimg") or 0.0),
           "fid_metric": cfg.metric.name, "best_fid": best["value"] if best else float("inf")}
    if best:
        out.update(best_checkpoint=best["checkpoint"], best_fid_kimg=best["kimg"], fid=newest["value"],
                   fid_kimg=newest["kimg"])
    return out


def trial_main(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = one Ray Train run with its own asynchronous scorers.

    ``config["trial"]``: {"name", "run": public run config (JSON), "axes": {axis: value}}. The run folder was
    prepared by the sweep driver (config.json, teacher, SiD²A's init_generator). A trial whose run already ended
    (finished, diverged, stopped) reports its stored result and returns: a re-run sweep continues, it does not redo.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.scoring import ScoringCoordinator, make_scorers
    from ray_jobs.tracking import Tracker
    from ray_jobs.train import build_trainer
    from schemas.run import RunConfig

    trial = config["trial"]
    cfg = RunConfig.model_validate(trial["run"])
    root = Storage.from_config(cfg.storage)
    store = RunStore(root.child(trial["name"]))
    status = store.read_status()
    if status and status.get("state") in TERMINAL_STATES:
        tune.report(final_metrics(store, cfg))
        return
    m = cfg.metric
    scoring = tracker = None
    # one writer per run: a trial resumed right after its sweep's driver died on another node waits for the
    # dead holder's lease to go stale (on this node a dead holder is seen at once)
    # (the token the driver chose: once Tune has ended the trial, the driver removes a lease the trial left behind)
    lease = RunLease(store.storage, log=lambda s: _log(f"[{trial['name']}] {s}"),
                     token=trial.get("lease_token")).acquire(wait_s=1.5 * LEASE_TTL_S)
    try:
        if m.enabled:
            scoring = ScoringCoordinator(store, make_scorers(m), m, trial=trial["name"],
                                         log=lambda s: _log(f"[{trial['name']}] {s}")).start()
        tracker = Tracker.for_run(store, cfg, log=lambda s: _log(f"[{trial['name']}] {s}"))
        if tracker is not None:
            tracker.start()
        build_trainer(cfg, trial["name"], root, callbacks=[TuneReportCallback()]).fit()
        if scoring is not None:
            scoring.finish()
        store.compact_at_end(lambda s: _log(f"[{trial['name']}] {s}"))
    except Exception as exc:
        from ray_jobs.train import root_cause

        if (store.read_status() or {}).get("state") not in TERMINAL_STATES:  # stopped by the stopper: Tune ending the
            reason = root_cause(exc)                                  # trial is what breaks fit(); keep its reason
            store.record_end(RunState.FAILED, cur_nimg=None, reason=reason)
        raise
    finally:
        if scoring is not None:
            scoring.close()
        if tracker is not None:
            tracker.close()
        lease.release()
    tune.report(final_metrics(store, cfg))


class DivergenceStopper(Stopper):
    """Ends trials that diverge; the others go on (a ``ray.tune.Stopper``; see :class:`DivergenceConfig`).

    - the Ray Train loop reported ``diverged`` (NaN/Inf in a step: it already wrote status ``diverged``);
    - a loss in ``losses`` is not finite, or its magnitude exceeds ``loss_factor`` x its first non-zero magnitude;
    - a live score exceeds ``fid_factor`` x the trial's best so far.

    The reason goes to the trial's ``status.json`` (state ``stopped``) and ``events/`` before Tune ends the trial;
    its checkpoints, leaderboard rows and pinned best stay where they are.
    """

    def __init__(self, divergence, root: Storage):
        self.d, self.root = divergence, root
        self.first: dict[tuple[str, str], float] = {}
        self.best: dict[str, float] = {}
        self.reasons: dict[str, str] = {}

    def stop_all(self) -> bool:
        return False

    def check(self, name: str, result: dict) -> Optional[str]:
        """Why trial ``name`` must stop given this report, or None."""
        if result.get("final"):
            return None
        if result.get("diverged"):
            return str(result.get("reason") or "non-finite loss")
        kimg = result.get("kimg")
        for key in self.d.losses:
            v = result.get(key)
            if not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                return f"{key} = {v} at {kimg} kimg"
            if self.d.loss_factor is None or v == 0:
                continue
            ref = self.first.setdefault((name, key), abs(v))
            if abs(v) > self.d.loss_factor * ref:
                return (f"{key} blew up: |{v:.4g}| > loss_factor {self.d.loss_factor:g} x its first value "
                        f"{ref:.4g}, at {kimg} kimg")
        fid = result.get("fid")
        if isinstance(fid, (int, float)) and self.d.fid_factor is not None:
            metric = result.get("fid_metric", "fid")
            if not math.isfinite(fid):
                return f"{metric} = {fid} (checkpoint at {result.get('fid_kimg')} kimg)"
            best = self.best[name] = min(self.best.get(name, fid), fid)
            if fid > self.d.fid_factor * best:
                return (f"{metric} blew up: {fid:.4g} at {result.get('fid_kimg')} kimg > fid_factor "
                        f"{self.d.fid_factor:g} x the trial's best {best:.4g}")
        return None

    def __call__(self, trial_id: str, result: dict) -> bool:
        name = result.get("run") or (result.get("config") or {}).get("trial", {}).get("name", trial_id)
        if name in self.reasons:
            return True
        reason = self.check(name, result)
        if reason is None:
            return False
        self.reasons[name] = reason
        store = RunStore(self.root.child(name))
        if not result.get("diverged"):  # the Ray Train loop records its own NaN/Inf end
            kimg = result.get("kimg")
            store.record_end(RunState.STOPPED, cur_nimg=None if kimg is None else kimg_to_nimg(kimg), reason=reason,
                             by="divergence stopper")
        _log(f"[{name}] stopped: {reason}")
        return True


def trial_resources(cfg, trial_cpus: float) -> dict:
    """{"bundles": the trial's placement group (driver + scorers), "cpus"/"gpus": the whole footprint incl. workers}."""
    m, s = cfg.metric, cfg.scaling
    bundles = [{"CPU": trial_cpus}]
    if m.enabled:
        scorer = {"CPU": m.cpus_per_scorer, **({"GPU": m.gpus_per_scorer} if m.gpus_per_scorer else {}),
                  **m.scorer_resources}
        bundles += [dict(scorer) for _ in range(m.num_scorers)]
    cpus = sum(b["CPU"] for b in bundles) + s.max_workers * s.cpus_per_worker  # elastic: its full size
    gpus = sum(b.get("GPU", 0) for b in bundles) + (s.max_workers if s.use_gpu else 0)
    return {"bundles": bundles, "cpus": cpus, "gpus": gpus}


def concurrency(footprint: dict, available: dict, wanted: Optional[int]) -> int:
    """How many trials fit at once: floor(CPUs / per-trial CPUs) (and GPUs), at most ``wanted``, at least 1."""
    fits = math.floor(available.get("CPU", 0) / footprint["cpus"] + 1e-9)
    if footprint["gpus"]:
        fits = min(fits, math.floor(available.get("GPU", 0) / footprint["gpus"] + 1e-9))
    return max(1, min(fits, wanted) if wanted else fits)


def keep_secrets_out_of_trial_runtime_env() -> None:
    """Tune copies the driver's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN into every trial
    actor's runtime_env (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``, Ray 2.60), and Ray writes a
    runtime_env in clear to the node's runtime_env_agent.log. The trial processes inherit the keys from their
    node instead (a local Ray from this driver, a cluster's nodes from their own environment: ray_jobs.cluster);
    tests/test_secrets.py fails if a Ray upgrade brings the copy back under another name."""
    from ray.tune.execution import class_cache

    from schemas.job import SECRET_ENV

    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, set):
        propagated.difference_update({*SECRET_ENV, "AWS_SECURITY_TOKEN"})


def run_tuner(trials: list[dict], root: Storage, *, trial_cpus: float, divergence, early_stopping=None,
              max_concurrent: Optional[int] = None, total_kimg: float, log: Callable[[str], None] = _log) -> dict:
    """Run ``trials`` (dicts as :func:`trial_main` takes them) as one Tune experiment under ``root/tune``.

    Returns {"reasons": {trial: why the stopper ended it}, "errors": {trial: error}, "concurrency": n}.
    """
    import ray
    from ray import tune

    from schemas.run import RunConfig

    cfgs = {t["name"]: RunConfig.model_validate(t["run"]) for t in trials}
    prints = {name: trial_resources(c, trial_cpus) for name, c in cfgs.items()}
    biggest = max(prints.values(), key=lambda f: f["cpus"])
    n = concurrency(biggest, ray.available_resources(), max_concurrent)
    log(f"tune: {len(trials)} trial(s), {biggest['cpus']:g} CPU(s) each (driver {trial_cpus:g} + scorers + workers), "
        f"{n} at a time")

    def resources(config):
        return tune.PlacementGroupFactory(prints[config["trial"]["name"]]["bundles"])

    scheduler = None
    if early_stopping is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="kimg", max_t=early_stopping.max_kimg or total_kimg,
                                  grace_period=early_stopping.grace_kimg,
                                  reduction_factor=early_stopping.reduction_factor)
    stopper = DivergenceStopper(divergence, root)
    scored = all(c.metric.enabled for c in cfgs.values())  # else no score to optimise: Tune just runs the trials
    storage_path, fs = root.ray_storage()
    keep_secrets_out_of_trial_runtime_env()
    tuner = tune.Tuner(
        tune.with_resources(trial_main, resources),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(metric="best_fid" if scored else None, mode="min" if scored else None,
                                    scheduler=scheduler, max_concurrent_trials=n,
                                    trial_name_creator=lambda t: t.config["trial"]["name"],
                                    trial_dirname_creator=lambda t: t.config["trial"]["name"]),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=fs,
                                  stop=stopper, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )
    t0 = time.time()
    grid = tuner.fit()
    errors = {}
    for result in grid:
        if result.error is not None:
            name = (result.config or {}).get("trial", {}).get("name", "?")
            errors[name] = " ".join(str(result.error).split())[-500:]
    log(f"tune: done in {time.time() - t0:.0f} s ({len(errors)} trial error(s), {len(stopper.reasons)} stopped)")
    return {"reasons": dict(stopper.reasons), "errors": errors, "concurrency": n}
