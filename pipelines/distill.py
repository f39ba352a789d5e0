"""``sida distill``: one distillation in this process, no Ray: the debugging host of the shared cadence.

It runs the loop the Ray worker runs (:func:`sida_core.loop.cadence` over the same :class:`Distiller`) and
writes the same run folder (:class:`store.run_store.RunStore`, local or ``s3://``): ``config.json``, the
teacher, ``ckpt-*`` checkpoints rotated to ``keep_checkpoints``, Parquet metric rows keyed by images seen,
events and ``status.json``. So ``sida leaderboard`` / ``report`` / ``evaluate`` / ``export`` read it like a
``sida train`` run, and the two hosts give the same rows and checkpoints for one config (tests/test_ray_train.py).
With ``score`` each checkpoint is scored in this process, synchronously, into the run's leaderboard, and the
best one pinned (``sida train`` does this asynchronously in scorer actors).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

# What a run folder holds besides config.json and the teacher: cleared by ``resume=False`` ("start afresh").
TRAINING_OUTPUTS = ("metrics", "leaderboard", "pinned", "pins", "scoring", "events", "status.json", "tensorboard")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_store_of(cfg, run_dir: Optional[str] = None):
    """The RunStore of ``run_dir`` (a folder or ``s3://`` URI), else of ``storage.uri / name``; credentials and
    endpoint from ``cfg.storage``."""
    from store.run_store import RunStore
    from store.storage import Storage

    if run_dir is None:
        return RunStore(Storage.from_config(cfg.storage).child(cfg.name))
    parent, _, name = str(run_dir).rstrip("/").rpartition("/")
    storage_cfg = cfg.storage.model_copy(update={"uri": parent or "."})
    return RunStore(Storage.from_config(storage_cfg).child(name))


def run_distill(cfg, store, *, resume: bool = True, progress: bool = True, log: Callable[[str], None] = _log,
                score: bool = False, on_checkpoint: Optional[Callable[[str, object], None]] = None,
                train_set=None, device=None, steal_lease: bool = False) -> dict:
    """Run ``cfg`` to ``total_kimg`` in this process into the run folder ``store``; returns a summary.

    Resumes from the newest checkpoint that verifies unless ``resume`` is False (then the run's checkpoints,
    rows and events are deleted first). ``on_checkpoint(name, distiller)`` is called after each checkpoint is
    committed. ``train_set``: the real images already loaded (else staged and loaded from ``cfg.data``).
    Raises ``NonFiniteError`` after recording the divergence in the run's status. Inputs it would reject
    (``score`` without a metric, unreadable reference statistics) are refused before the run folder is touched.
    """
    import torch
    from tqdm.auto import tqdm

    from ray_jobs.datasets import load_run_dataset, run_teacher
    from pipelines.checks import check_teacher_network
    from ray_jobs.tracking import check_logging
    from schemas.loader import ConfigError
    from sida_core.training_loop import resolve_device
    from store.lease import RunLease

    t0 = time.time()
    check_teacher_network(cfg)  # a kwargs typo or an impossible resolution, before data or the run folder
    check_logging(cfg.logging)  # a missing package stops here, before the run folder is touched
    if score and not cfg.metric.enabled:
        raise ConfigError("--score needs a metric, but metric.enabled is false in the config "
                          "(--set metric.enabled=true, or drop --score)")
    if score:
        from ray_jobs.scoring import check_reference

        check_reference(cfg)  # unreadable or mismatched statistics stop here, not at the first checkpoint
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    if train_set is None:
        train_set, _ = load_run_dataset(cfg, log)
    bars = (lambda total, desc: tqdm(total=total, desc=desc, unit="img", unit_scale=True, leave=False)) if progress else None
    store.storage.check()  # a missing bucket is one line, before anything is written
    lease = RunLease(store.storage, log=log).acquire(steal=steal_lease)  # one writer per run (store.lease)
    try:
        # the state to resume from, read under the lease: a run whose every checkpoint is damaged stops here, before
        # the teacher is trained or the folder is touched
        loaded = store.load_latest_valid(map_location=device) if resume else None
        _, teacher_path = run_teacher(cfg, train_set, torch.device("cpu"), log, bars)
        return _distill_holding_lease(cfg, store, resume=resume, progress=progress, log=log, score=score,
                                      on_checkpoint=on_checkpoint, train_set=train_set, device=device,
                                      teacher_path=teacher_path, loaded=loaded, t0=t0)
    finally:
        lease.release()


def _distill_holding_lease(cfg, store, *, resume: bool, progress: bool, log, score: bool, on_checkpoint, train_set,
                           device, teacher_path, loaded, t0: float) -> dict:
    import torch

    from ray_jobs.tracking import Tracker
    from ray_jobs.train import public_config
    from sida_core.training_loop import build_distiller, load_network
    from store.run_store import DISTILL_HOST

    if score:
        from ray_jobs.scoring import CheckpointScorer

    if not resume:
        old = store.checkpoint_names()
        if old:
            log(f"starting {store.uri} afresh: deleting its checkpoints {', '.join(old)}")
        for name in [*old, *TRAINING_OUTPUTS]:
            store.storage.delete(name)
    store.prepare(public_config(cfg), teacher_path, init_generator=cfg.init_generator)  # (SiD²A only, by the schema)

    scorer = previous_best = None
    if score:
        scorer = CheckpointScorer(threads=torch.get_num_threads())
        previous_best = store.best_live_row(cfg.metric.name)

    with tempfile.TemporaryDirectory(prefix="sida-distill-") as scratch:
        # f_phi (hence theta and psi) from the run folder's own copy, exactly as the Ray workers do
        teacher, manifest = load_network(store.fetch_checkpoint("teacher", Path(scratch)), "net", device)
        spec = manifest["network"]
        init = store.fetch_checkpoint("init_generator", Path(scratch)) if cfg.init_generator else None
        distiller = build_distiller(cfg, teacher, train_set, device, init_generator=init)
    last = None
    if loaded is not None:
        state, _, last = loaded
        distiller.load_state_dict(state)
        log(f"resumed from {store.storage.uri_of(last)} at kimg {distiller.cur_nimg / 1000:.3f}")
    store.record_start(cur_nimg=distiller.cur_nimg, workers=1, checkpoint=last, host=DISTILL_HOST)
    tracker = Tracker.for_run(store, cfg, log)  # logging: TensorBoard / MLflow / W&B mirrors of the rows
    if tracker is not None:
        tracker.start()
    try:
        return _distill_loop(cfg, store, distiller, scorer, previous_best, last, spec, progress=progress, log=log,
                             on_checkpoint=on_checkpoint, t0=t0)
    finally:
        if tracker is not None:
            tracker.close()


def _distill_loop(cfg, store, distiller, scorer, previous_best, last, spec, *, progress, log, on_checkpoint, t0) -> dict:
    """The steps, checkpoints and in-process scores of :func:`run_distill` (its run folder is prepared)."""
    from tqdm.auto import tqdm

    from ray_jobs.train import public_config
    from store.run_store import RunState
    from sida_core.distill import NonFiniteError
    from sida_core.loop import cadence, kimg_to_nimg
    from sida_core.training_loop import save_distill_checkpoint

    bar = tqdm(total=kimg_to_nimg(cfg.total_kimg), initial=distiller.cur_nimg, desc=cfg.method, unit="img",
               unit_scale=True, disable=not progress)
    try:
        for tick in cadence(distiller, total_kimg=cfg.total_kimg, log_every_kimg=cfg.log_every_kimg,
                            checkpoint_every_kimg=cfg.checkpoint_every_kimg, num_workers=1):
            for line in tick.notes:
                log(line)
            bar.update(tick.images)
            if tick.row is not None:
                store.append_metrics(tick.row)
                bar.set_postfix(stage=tick.stats["stage"], loss_psi=f"{tick.stats.get('loss_psi', 0):.3g}",
                                loss_G=f"{tick.stats.get('loss_G', 0):.3g}")
            if not tick.checkpoint:
                continue
            with tempfile.TemporaryDirectory(prefix="sida-ckpt-") as tmp:
                path = save_distill_checkpoint(distiller, Path(tmp), cfg, spec, config=public_config(cfg), run=store.name)
                last = path.name
                store.upload_checkpoint(path, last)
            for gone in store.rotate_checkpoints(cfg.keep_checkpoints):
                log(f"rotated away {gone} (keep_checkpoints={cfg.keep_checkpoints})")
            if scorer is not None:
                row = scorer.score(store.storage, last)
                log(f"kimg {row['kimg']:.3f}: {row['metric']} {row['value']:.4f}")
                if cfg.metric.pin_best and (previous_best is None or row["value"] < previous_best["value"]):
                    store.pin_best(row, previous_best)
                    previous_best = row
            if on_checkpoint is not None:
                on_checkpoint(last, distiller)
    except NonFiniteError as exc:
        store.record_end(RunState.DIVERGED, cur_nimg=distiller.cur_nimg, reason=str(exc))
        raise
    finally:
        bar.close()
    store.record_end(RunState.FINISHED, cur_nimg=distiller.cur_nimg)
    store.compact_at_end(log)
    return {"run_dir": store.uri, "checkpoint": store.storage.uri_of(last) if last else None,
            "kimg": distiller.cur_nimg / 1000, "teacher": store.storage.uri_of("teacher"),
            "seconds": time.time() - t0, "generator_ema": distiller.G_ema}
