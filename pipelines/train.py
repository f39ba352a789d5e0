"""``sida train``: one distillation run on Ray Train, new or resumed, local or on a cluster.

The driver validates the config, prepares the run folder in storage (config, teacher), connects to Ray
(a local Ray started for the job unless ``address`` is given), runs the TorchTrainer and returns a summary.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

from schemas.loader import ConfigError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# The sections every stored config.json has had: a resume without one would run on defaults the run never had.
STORED_SECTIONS = ("loss", "stages", "optimizer", "batch", "scaling", "teacher", "data", "storage")


def refuse_a_distill_run(store, resume: str) -> None:
    """``sida train --resume`` continues Ray Train runs only: a folder ``sida distill`` trained in (one process, its
    own cadence and lease) is continued by ``sida distill``, never mixed with a Ray run."""
    if store.trained_by_distill():
        raise ConfigError(f"--resume {resume}: written by `sida distill` (one process, no Ray); continue it with "
                          f"`sida distill CONFIG --run-dir {resume}`, not `sida train --resume`")


def _split_run_uri(uri: str) -> tuple[str, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or not parent or parent.endswith(":/"):
        raise ConfigError(f"--resume {uri!r}: expected a run folder STORAGE_URI/RUN_NAME, e.g. runs/digits-20261123-101500 "
                          f"or s3://bucket/prefix/digits-20261123-101500")
    return parent, name


def resolve_run(config: Optional[str], overrides: Sequence[str] = (), *, workers: Optional[int | str] = None,
                resume: Optional[str] = None, name: Optional[str] = None, endpoint_url: Optional[str] = None):
    """(cfg, run name, root Storage, resumed?) for a new run from ``config`` or a stopped one at ``resume``."""
    from store.run_store import RunStore
    from store.storage import Storage
    from schemas.loader import apply_overrides, load_run_config, validate
    from schemas.run import RunConfig

    extra = [*overrides, *([f"scaling.num_workers={workers}"] if workers else [])]
    if resume:
        parent, run_name = _split_run_uri(resume)
        store = RunStore(Storage(parent, endpoint_url=endpoint_url).child(run_name))
        stored = store.read_config()
        source = store.storage.uri_of("config.json")
        missing = [k for k in STORED_SECTIONS if not isinstance(stored, dict) or not isinstance(stored.get(k), dict)]
        if missing:
            raise ConfigError(f"{source}: missing the {', '.join(missing)} section{'s' if len(missing) > 1 else ''}; expected "
                              f"the run config `sida train` wrote (the file is damaged or not a sida run's)")
        refuse_a_distill_run(store, resume)
        stored["storage"]["uri"] = parent
        if endpoint_url:
            stored["storage"]["endpoint_url"] = endpoint_url
        stored["storage"] = {k: v for k, v in stored["storage"].items() if v is not None}
        cfg = validate(RunConfig, apply_overrides(stored, extra), source=source)
    else:
        if config is None:
            raise ConfigError("give a run config (e.g. configs/digits.yaml) or --resume RUN_URI")
        if name is not None:
            from schemas.run import check_name

            try:
                check_name(name)
            except ValueError as exc:
                raise ConfigError(f"--name {name!r}: {exc}") from None
        cfg = load_run_config(config, extra)
        run_name = name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = Storage.from_config(cfg.storage)
    cfg.storage.uri = root.uri  # absolute: Ray workers run in their own working directory
    return cfg, run_name, root, bool(resume)


def run_train(config: Optional[str] = None, overrides: Sequence[str] = (), *, workers: Optional[int | str] = None,
              resume: Optional[str] = None, name: Optional[str] = None, address: Optional[str] = None,
              endpoint_url: Optional[str] = None, steal_lease: bool = False,
              log: Callable[[str], None] = _log) -> dict:
    """Run (or resume) one distillation on Ray Train; returns the summary printed by ``sida train``.
    The run's lease (store.lease) is held from the first write to the end: one writer per run."""
    from ray_jobs.scoring import check_reference
    from pipelines.checks import check_before_writes
    from store.lease import RunLease
    from store.run_store import RunStore

    t0 = time.time()
    cfg, run_name, root, resumed = resolve_run(config, overrides, workers=workers, resume=resume, name=name,
                                               endpoint_url=endpoint_url)
    check_before_writes(cfg, address)
    check_reference(cfg)
    root.check()
    store = RunStore(root.child(run_name))

    def refuse_an_existing_run() -> None:
        if not resumed and store.exists():
            raise ConfigError(f"run {store.uri} already exists: continue it with --resume {store.uri}, "
                              f"or pick another --name")

    refuse_an_existing_run()
    lease = RunLease(store.storage, log=log).acquire(steal=steal_lease)
    try:
        refuse_an_existing_run()  # again: created by a process whose lease ended before ours began
        return _train_holding_lease(cfg, run_name, root, store, resumed, address=address, log=log, t0=t0)
    finally:
        lease.release()


def _train_holding_lease(cfg, run_name: str, root, store, resumed: bool, *, address: Optional[str],
                         log: Callable[[str], None], t0: float) -> dict:
    import torch

    from ray_jobs.cluster import connect, worker_env
    from ray_jobs.datasets import load_run_dataset, run_teacher
    from ray_jobs.scoring import ScoringCoordinator, make_scorers
    from ray_jobs.tracking import Tracker
    from ray_jobs.train import build_trainer, public_config, root_cause
    from store.storage import StorageError

    if not resumed or not store.storage.exists("teacher/manifest.json"):
        train_set, _ = load_run_dataset(cfg, log)
        _, teacher_path = run_teacher(cfg, train_set, torch.device("cpu"), log)
    else:
        teacher_path = None  # a resumed run keeps its own copy
    # the workers read f_phi and theta's start (SiD²A; the schema allows init_generator only there) from the run folder
    store.prepare(public_config(cfg), teacher_path, init_generator=cfg.init_generator)
    s = cfg.scaling
    rounds = (f"{cfg.rounds_with(s.min_workers)}-{cfg.rounds}" if s.elastic else str(cfg.rounds))
    log(f"run {store.uri}: {cfg.method}, {s.describe()} worker(s){' (elastic)' if s.elastic else ''} x "
        f"{cfg.batch.per_worker} images x {rounds} round(s) = batch {cfg.batch.total}, to {cfg.total_kimg} kimg")
    if s.elastic and cfg.metric.enabled:  # measured on Ray 2.60: see README, "Elastic workers"
        log("elastic workers: Ray counts the workers a node holds from its total resources, the scorer actors' "
            "included; where scorers share a node with workers, that node must still hold every worker Ray counts "
            "there, or the group's start is retried without end")

    m = cfg.metric
    started = connect(address, num_cpus=cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
                      + (m.num_scorers * m.cpus_per_scorer if m.enabled else 0), env=worker_env(), storage_cfg=cfg.storage)
    scoring = tracker = None
    try:
        if m.enabled:  # asynchronous scorers: training never waits for them
            scoring = ScoringCoordinator(store, make_scorers(m), m, log=log).start()
        tracker = Tracker.for_run(store, cfg, log)  # logging: TensorBoard / MLflow / W&B mirrors of the rows
        if tracker is not None:
            tracker.start()
        result = build_trainer(cfg, run_name, root).fit()
        scores = scoring.finish() if scoring is not None else None
    except Exception as exc:  # Ray wraps worker errors; surface the root cause as one line
        cause = root_cause(exc)
        if root.is_s3 and "object store" not in cause:
            try:  # Ray's own storage I/O fails with raw pyarrow errors: say so if the store is the culprit
                root.check()
            except StorageError as down:
                cause = " ".join(str(down).split())
        raise TrainingError(f"run {store.uri} failed: {cause}") from exc
    finally:
        if scoring is not None:
            scoring.close()
        if tracker is not None:  # after the scorers' drain: the last scores are mirrored too
            tracker.close()
        if started:
            import ray

            ray.shutdown()
    store.compact_at_end(log)
    status = store.read_status() or {}
    metrics = store.read_metrics()
    return {"run_uri": store.uri, "status": status.get("state", "unknown"), "reason": status.get("reason"),
            "kimg": status.get("kimg"), "checkpoints": store.checkpoint_names(),
            "metric_rows": 0 if metrics is None else metrics.num_rows,
            "ray_checkpoint": result.checkpoint.path if result.checkpoint else None, "scoring": scores,
            "seconds": round(time.time() - t0, 1)}


class TrainingError(RuntimeError):
    """The Ray run failed after its retries; the message names the run and the root cause in one line."""
