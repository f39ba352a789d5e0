"""Ray Train wiring for one distillation run: ``train_loop_per_worker`` and the ``TorchTrainer`` around it.

The worker is a thin shell around :class:`sida_core.distill.Distiller` and the cadence both hosts share
(:func:`sida_core.loop.cadence`; ``sida distill`` is the other host): it builds the nets from the validated
config, wraps G_theta and f_psi in DDP (``ray.train.torch.prepare_model``: gloo on CPU, nccl on CUDA), resumes
from the newest checkpoint that verifies, steps, and reports. Each worker draws its own real
and fake micro-batches (so the discriminator's fakeness mean is per worker batch, eq. 7); randomness is a
pure function of (seed, step, global micro-batch index, purpose), the global index of worker ``k``'s round
``r`` being ``k * rounds + r``. Hence 2 workers x b equal one process with rounds of b (tests/test_ray_train.py),
and a run may resume on a different number of workers with the same total batch.

Elastic workers (``scaling.num_workers: [min, max]``) rest on that: Ray Train restarts the worker group from the
newest registered checkpoint whenever it resizes it (a node lost, or capacity back), each worker rebuilds the
Distiller with the live world size, so the rounds become ``batch.total / (per_worker x world)`` and every step still
consumes ``batch.total`` images. Rank 0 records each restart on another worker count as a ``resize`` event
(RunStore.record_start) and every metric row carries its ``num_workers`` (tests/test_ray_elastic.py).

Rank 0 writes metric rows (Parquet) and checkpoints (uploaded with ``manifest.json`` last, registered with
Ray through ``checkpoint_upload_fn``); every rank calls ``ray.train.report`` at the same steps.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from store.run_store import RunState, RunStore
from store.storage import Storage


def public_config(cfg) -> dict:
    """The run config as JSON with secrets removed: what goes to storage and to the workers."""
    d = cfg.model_dump(mode="json")
    d["storage"]["access_key_id"] = d["storage"]["secret_access_key"] = None
    return d


class LiveScores:
    """Rank 0's view of the run's asynchronous scores (written by the scorer actors, not by the workers), added to
    each report so that Tune sees the leaderboard metric with kimg: ``fid`` (the newest score), ``fid_kimg`` (the
    kimg of the checkpoint it scored) and ``best_fid`` (the lowest so far; +inf until the first score). The names say
    "fid" whatever ``metric.name`` is (``fid_metric`` names it). One listing per report, plus the new rows."""

    def __init__(self, store: RunStore, metric):
        self.store, self.metric = store, metric
        self.seen: dict[str, tuple[float, float]] = {}

    def fields(self) -> dict:
        try:
            self.seen = self.store.live_scores(self.metric.name, self.metric.seed, self.seen)
        except Exception as exc:  # noqa: BLE001 -- a storage hiccup must not end training; the next report retries
            print(f"live scores unavailable this report: {exc}", flush=True)
        out = {"run": self.store.name, "fid_metric": self.metric.name,
               "best_fid": float("inf")}
        if self.seen:
            kimg, value = max(self.seen.values())
            out.update(fid=value, fid_kimg=kimg, best_fid=min(v for _, v in self.seen.values()))
        return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config``: {"run": public_config(cfg), "run_name": str, "threads": int}."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    from schemas.run import RunConfig
    from sida_core import checkpoint as ckpt
    from ray_jobs.datasets import load_run_dataset
    from sida_core.distill import NonFiniteError
    from sida_core.loop import cadence, kimg_to_nimg
    from sida_core.training_loop import build_distiller, load_network, save_distill_checkpoint

    torch.set_num_threads(int(config.get("threads", 1)))
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    store = RunStore(Storage.from_config(cfg.storage).child(config["run_name"]))

    train_set, _ = load_run_dataset(cfg, log=lambda m: print(m, file=sys.stderr, flush=True) if rank == 0 else None)
    with tempfile.TemporaryDirectory(prefix="sida-teacher-") as scratch:
        teacher, teacher_manifest = load_network(store.fetch_checkpoint("teacher", Path(scratch)), "net", device)
        # SiD²A: theta starts from the run's own verified copy of the SiD generator (see RunStore.ensure_init_generator)
        init = store.fetch_checkpoint("init_generator", Path(scratch)) if cfg.init_generator else None
        spec = teacher_manifest["network"]  # G_theta and f_psi are copies of f_phi (imported teachers bring theirs)
        distiller = build_distiller(cfg, teacher, train_set, device, rank=rank, world_size=world, init_generator=init,
                                    wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))

    registered = ray.train.get_checkpoint()
    loaded = store.load_latest_valid(map_location=device, prefer=Path(registered.path).name if registered else None)
    if loaded is not None:
        state, _, name = loaded
        distiller.load_state_dict(state)
        if rank == 0:
            print(f"resumed from {store.storage.uri_of(name)} at kimg {distiller.cur_nimg / 1000:.3f}", flush=True)
    if rank == 0:
        store.record_start(cur_nimg=distiller.cur_nimg, workers=world, checkpoint=loaded[2] if loaded else None)
    scores = LiveScores(store, cfg.metric) if rank == 0 and cfg.metric.enabled else None

    def upload(checkpoint, dir_name):
        store.upload_checkpoint(Path(checkpoint.path), dir_name)
        return ray.train.Checkpoint(path=store.storage.path_of(dir_name), filesystem=store.storage.fs)

    bar = tqdm(total=kimg_to_nimg(cfg.total_kimg), desc=f"{cfg.method} {config['run_name']}") if rank == 0 else None
    if bar is not None:
        bar.update(distiller.cur_nimg)
    ticks = cadence(distiller, total_kimg=cfg.total_kimg, log_every_kimg=cfg.log_every_kimg,
                    checkpoint_every_kimg=cfg.checkpoint_every_kimg, num_workers=world)
    while True:
        try:
            tick = next(ticks, None)
        except NonFiniteError as exc:  # deterministic: a restart would diverge again, so end the run cleanly
            if rank == 0:
                store.record_end(RunState.DIVERGED, cur_nimg=distiller.cur_nimg, reason=str(exc))
            ray.train.report({"diverged": 1.0, "kimg": distiller.cur_nimg / 1000, "reason": str(exc),
                              **(scores.fields() if scores else {})})
            return
        if tick is None:
            break
        if rank == 0 and tick.notes:
            print("\n".join(tick.notes), file=sys.stderr, flush=True)  # the driver's stdout ends with its JSON line
        if bar is not None:
            bar.update(tick.images)
        if tick.row is None:
            continue
        if rank == 0:
            store.append_metrics(tick.row)
        # what Tune sees (TuneReportCallback: rank 0's); timesteps_total is the x-axis of Tune's own TensorBoard files
        report = {**tick.row, "timesteps_total": tick.row["cur_nimg"], **(scores.fields() if scores else {})}
        if not tick.checkpoint:
            ray.train.report(report)
            continue
        name = ckpt.checkpoint_name(distiller.cur_nimg)
        with tempfile.TemporaryDirectory(prefix="sida-ckpt-") as tmp:
            checkpoint = None
            if rank == 0:
                path = save_distill_checkpoint(distiller, Path(tmp), cfg, spec, config=public_config(cfg),
                                               run=config["run_name"])
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report({**report, "checkpoint": name}, checkpoint=checkpoint, checkpoint_dir_name=name,
                             checkpoint_upload_fn=upload)
    if bar is not None:
        bar.close()
    if rank == 0:
        store.record_end(RunState.FINISHED, cur_nimg=distiller.cur_nimg)


def build_trainer(cfg, run_name: str, storage: Storage, *, threads: Optional[int] = None, callbacks: Optional[list] = None):
    """A TorchTrainer for ``cfg`` whose experiment folder is ``storage/run_name`` (= the RunStore).

    ``callbacks``: Ray Train user callbacks, e.g. ``TuneReportCallback()`` when the trainer runs inside a Tune trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from ray_jobs.cluster import worker_env

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    storage_path, fs = storage.ray_storage()
    threads = threads or int(os.environ.get("SIDA_NUM_THREADS", max(1, int(s.cpus_per_worker))))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": public_config(cfg), "run_name": run_name, "threads": threads},
        # elastic: num_workers (min, max); Ray restarts the group from the newest checkpoint on each resize
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=s.elastic_resize_monitor_interval_s),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=fs, callbacks=callbacks or None,
            worker_runtime_env={"env_vars": worker_env()},
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # keep-last-K by Ray; pinned checkpoints (best FID) are copies under pinned/, outside the rotation
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )


def root_cause(exc: BaseException) -> str:
    """The innermost meaningful message of a (Ray-wrapped) exception chain, on one line."""
    from store.storage import StorageError

    seen, cur, best = set(), exc, exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, StorageError):
            return " ".join(str(cur).split())
        best = cur
        cur = cur.__cause__ or cur.__context__
    text = str(exc)
    for marker in ("StorageError: ", "CheckpointError: ", "DataError: "):
        if marker in text:
            return " ".join(text.split(marker, 1)[1].strip().splitlines()[0].split())
    last = [line for line in str(best).strip().splitlines() if line.strip()]
    return " ".join((last[-1] if last else type(best).__name__).split())
