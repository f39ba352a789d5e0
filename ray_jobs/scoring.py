"""Asynchronous checkpoint scoring: a pool of Ray scorer actors fed by a coordinator, one leaderboard row each.

Roles:

- :class:`CheckpointScorer` (a plain class; :func:`make_scorers` runs it as Ray actors with their own CPUs or
  GPU fractions, restarted by Ray if their process dies) loads a checkpoint's EMA generator, generates
  ``metric.num_images`` one-step samples from fixed seeds, computes the Fréchet distance to the reference
  statistics through clean-fid (:mod:`sida_core.metrics`) and writes one :class:`LeaderboardRow` to the run's
  storage. The row is the only record that a checkpoint was scored.
- :class:`ScoringCoordinator` (a thread in the driver) lists the run's committed checkpoints, hands the newest
  unscored one to a free scorer, applies the backlog policy (see :class:`schemas.run.MetricConfig`: at most
  ``max_backlog`` checkpoints wait; older ones are skipped and the skip is recorded with its reason), and pins
  the best checkpoint so far (lowest value) under ``pinned/``, releasing the previous one.

Training never waits on any of this: the coordinator only reads storage and talks to the scorer actors.
Crash safety: rows are written atomically under a key per (checkpoint, metric, kind, seed). A scorer that dies
mid-score loses nothing written; the coordinator re-checks the row and re-dispatches only if it is missing
(up to ``ATTEMPTS`` times), so no checkpoint is scored twice and none is lost. A restarted driver (``--resume``)
starts from the rows already in storage.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from store.run_store import RunStore
from store.storage import Storage
from schemas.leaderboard import row_key
from schemas.run import METRIC_SPACES

ATTEMPTS = 3  # scorer deaths or errors tolerated per checkpoint before it is skipped
NICE = 10  # scorer processes yield the CPU to training on shared cores


def config_summary(cfg) -> str:
    """One line naming the hyper-parameters a sweep varies (paper names)."""
    l, o = cfg.loss, cfg.optimizer
    return (f"{cfg.method} alpha={l.alpha:g} lambda_sid={l.lambda_sid:g} lambda_adv_theta={l.lambda_adv_theta:g} "
            f"lambda_adv_psi={l.lambda_adv_psi:g} lr_theta={o.lr_theta:g} lr_psi={o.lr_psi:g} batch={cfg.batch.total}")


class CheckpointScorer:
    """Scores checkpoints of any run; caches feature spaces and reference statistics between calls."""

    def __init__(self, threads: int = 1, nice: int = 0):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        if nice:
            os.nice(nice)
        self._spaces: dict[tuple, Any] = {}
        self._refs: dict[str, tuple] = {}
        self._decoders: dict[tuple, Any] = {}
        self._vae_folders: dict[tuple, Any] = {}

    def ident(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def _device(self):
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _space(self, key: str, metric=None):
        """The feature space ``key`` (fd_digits, fid_inception, inception_probs, fd_dinov2) as ``metric`` (a
        MetricConfig) asks for it: its protocol for the Inception spaces, its DINOv2 weights (staged to this node)."""
        from sida_core.metrics import feature_space

        protocol = metric.protocol if metric is not None and key in ("fid_inception", "inception_probs") else "clean"
        weights = None
        if key == "fd_dinov2":
            from ray_jobs.datasets import stage_file

            weights = str(stage_file(metric.dinov2, what="dinov2")) if metric is not None and metric.dinov2 else None
        cache = (key, protocol, weights)
        if cache not in self._spaces:
            self._spaces[cache] = feature_space(key, device=self._device(), protocol=protocol, weights=weights)
        return self._spaces[cache]

    def vae_folder(self, cfg, metric):
        """The local folder of ``metric.vae`` (staged to this node once; its config checked, no weights read)."""
        from ray_jobs.datasets import stage_folder
        from sida_core.vae import vae_config

        key = (metric.vae, cfg.storage.endpoint_url)
        if key not in self._vae_folders:
            folder = stage_folder(metric.vae, endpoint_url=cfg.storage.endpoint_url, what="vae")
            vae_config(folder)
            self._vae_folders[key] = folder
        return self._vae_folders[key]

    def decoder(self, cfg, metric):
        """The LatentDecoder of ``metric.vae``, loaded once per scorer (at its first score, not at start-up)."""
        from sida_core.vae import LatentDecoder, load_vae

        key = (metric.vae, cfg.storage.endpoint_url, metric.vae_batch_size)
        if key not in self._decoders:
            self._decoders[key] = LatentDecoder(load_vae(self.vae_folder(cfg, metric), self._device()),
                                                metric.vae_batch_size)
        return self._decoders[key]

    def reference(self, cfg, metric, space, *, features: bool = False) -> tuple[Any, Any, str]:
        """(GaussianReference, reference features (N, D) or None, description) of the reference statistics of
        ``space`` for run config ``cfg``: ``metric.reference`` for the ranking metric's space, ``metric.references``
        for the others, the digits train split for fd_digits without one. ``features``: also the features (KID,
        precision / recall), from the folder's ``sida fid-stats --features`` shards."""
        import json

        from sida_core.metrics.frechet import GaussianReference

        uri = metric.reference if space.name == METRIC_SPACES[metric.name] else metric.references.get(space.name)
        key = json.dumps([space.name, space.mode, uri, features, cfg.data.model_dump(mode="json"),
                          cfg.storage.endpoint_url], sort_keys=True)
        if key not in self._refs:
            if uri is None:  # FD-digits' default: the built-in train split, as the run sees it
                from ray_jobs.datasets import load_run_dataset

                train_set, _ = load_run_dataset(cfg)
                desc = f"digits train split ({len(train_set)} images, {cfg.data.resolution}px)"
                feats = space.features(train_set.images, self._device())
                from sida_core.metrics.frechet import stats_from_features

                self._refs[key] = (GaussianReference.from_stats(*stats_from_features(feats)),
                                   feats if features else None, desc)
            else:
                from store.reference import ReferenceStatsError, read_reference, read_reference_features
                from store.storage import StoredFileError
                from sida_core.metrics.reference import check_compatible

                where = "metric.reference" if uri == metric.reference else f"metric.references.{space.name}"
                try:
                    ref = read_reference(uri, endpoint_url=cfg.storage.endpoint_url)
                    feats = read_reference_features(uri, cfg.storage.endpoint_url) if features else None
                except (ReferenceStatsError, StoredFileError) as exc:
                    raise ReferenceStatsError(f"{where}: {exc}") from None
                from sida_core.vae import upsampling_factor

                factor = upsampling_factor(self.vae_folder(cfg, metric)) if metric.vae else 1  # decoded images' size
                check_compatible(ref.manifest, space, cfg.data.resolution * factor)
                self._refs[key] = (GaussianReference.from_stats(ref.mu, ref.sigma), feats, uri)
        return self._refs[key]

    def _by_space(self, m) -> dict[str, list[str]]:
        from sida_core.metrics.catalog import get_metric

        by_space: dict[str, list[str]] = {}
        for name in m.metric_names:
            by_space.setdefault(get_metric(name).space, []).append(name)
        return by_space

    def generated_features(self, cfg, m, network, net: dict, seed: int, *, start: int = 0,
                           count: Optional[int] = None, heun_steps: Optional[int] = None) -> dict[str, Any]:
        """{feature space: features} of images start..start+count-1 (default: all ``m.num_images``) of the
        ``m.num_images``-image score of ``seed``, in every feature space ``m.metric_names`` needs: one-step samples
        of the generator ``network``, or with ``heun_steps`` the Heun samples of the teacher ``network`` (the same
        latents and labels, spaces and decoder: ``sida evaluate --protocol-check``)."""
        from sida_core.metrics.score import generator_features, teacher_features

        spaces = {key: self._space(key, m) for key in self._by_space(m)}
        common: dict[str, Any] = dict(num_images=m.num_images if count is None else count, seed=seed,
                                      batch_size=m.batch_size, label_dim=net["label_dim"], device=self._device(),
                                      img_shape=(net["img_channels"], net["img_resolution"], net["img_resolution"]),
                                      decode=self.decoder(cfg, m) if m.vae else None)
        if heun_steps is None:
            return generator_features(network, spaces, sigma_init=cfg.loss.sigma_init, start=start,
                                      total=m.num_images, **common)
        if start or count not in (None, m.num_images):
            raise ValueError("teacher samples are scored in one pass")
        return teacher_features(network, spaces, num_steps=heun_steps, **common)

    def metric_values(self, cfg, m, feats: dict[str, Any], seed: int) -> tuple[dict[str, float], dict[str, tuple]]:
        """({metric: value}, {metric: (extractor_id, protocol, reference description)}) of every metric in
        ``m.metric_names`` from the generated images' features (:meth:`generated_features`)."""
        from sida_core.metrics.catalog import compute_metrics, get_metric
        from sida_core.metrics.inception import split_pool_probs

        values: dict[str, float] = {}
        about: dict[str, tuple] = {}
        for key, names in self._by_space(m).items():
            space = self._space(key, m)
            if key == "inception_probs":  # the Inception Score: no reference
                values |= compute_metrics(names, feats[key], probs=split_pool_probs(feats[key])[1], seed=seed)
                about |= {n: (space.extractor_id, space.mode, "none (class probabilities)") for n in names}
                continue
            stats_ref, ref_feats, desc = self.reference(
                cfg, m, space, features=any(get_metric(n).needs == "features" for n in names))
            values |= compute_metrics(names, feats[key], stats_ref=stats_ref, ref_features=ref_feats, seed=seed)
            about |= {n: (space.extractor_id, space.mode, desc) for n in names}
        return values, about

    def _load(self, storage: Storage, source: str, metric: Optional[dict]):
        """(EMA generator, checkpoint manifest, run config, metric config with ``metric`` applied) of ``source``."""
        from schemas.run import MetricConfig, RunConfig
        from sida_core.training_loop import load_network

        with tempfile.TemporaryDirectory(prefix="sida-score-") as scratch:
            generator, manifest = load_network(RunStore(storage).fetch_checkpoint(source, Path(scratch)),
                                               "generator_ema", self._device())
        cfg = RunConfig.model_validate(manifest["config"])
        return generator, manifest, cfg, MetricConfig.model_validate({**cfg.metric.model_dump(), **(metric or {})})

    def features(self, storage: Storage, name: str, *, seed: int, start: int, count: int,
                 metric: Optional[dict] = None, source: Optional[str] = None) -> dict[str, Any]:
        """One scorer's share of a score split over several (:func:`score_split`): the features of images
        start..start+count-1 of checkpoint ``name``'s score with ``seed``."""
        generator, manifest, cfg, m = self._load(storage, source or name, metric)
        return self.generated_features(cfg, m, generator, manifest["network"], seed, start=start, count=count)

    def score(self, storage: Storage, name: str, *, metric: Optional[dict] = None, seed: Optional[int] = None,
              kind: str = "live", source: Optional[str] = None, trial: Optional[str] = None,
              features: Optional[dict[str, Any]] = None) -> dict:
        """Score checkpoint ``name`` of the run at ``storage``; write its leaderboard rows (one per metric of
        ``metric.names``, the ranking one last) and return the ranking one's, with ``also``: {other metric: value}.

        ``metric``: MetricConfig fields overriding the run's own (e.g. ``num_images``); ``source``: the folder
        to read (default ``name``; ``sida evaluate`` reads pinned copies); ``features``: the generated images'
        features already extracted (by several scorers, :func:`score_split`) instead of generating them here.
        """
        from schemas.leaderboard import LeaderboardRow
        from sida_core.sampling import gallery_png

        store = RunStore(storage)
        t0 = time.time()
        source = source or name
        generator, manifest, cfg, m = self._load(storage, source, metric)
        seed = m.seed if seed is None else seed
        if features is None:
            features = self.generated_features(cfg, m, generator, manifest["network"], seed)
        values, about = self.metric_values(cfg, m, features, seed)
        if kind == "live" and m.gallery:  # before the row: whoever sees the row finds the gallery
            store.write_gallery(name, gallery_png(generator, m.gallery, sigma_init=cfg.loss.sigma_init,
                                                  device=self._device(), decode=self.decoder(cfg, m) if m.vae else None))
        l, o = cfg.loss, cfg.optimizer
        rows = [LeaderboardRow(
            run=store.name, run_uri=storage.uri, trial=trial,
            config_summary=config_summary(cfg), method=cfg.method, alpha=l.alpha, lambda_sid=l.lambda_sid,
            lambda_adv_theta=l.lambda_adv_theta, lambda_adv_psi=l.lambda_adv_psi, lr_theta=o.lr_theta, lr_psi=o.lr_psi,
            init_generator=cfg.init_generator, checkpoint=name, checkpoint_uri=storage.uri_of(source),
            checkpoint_hash=manifest["content_hash"], kimg=manifest["kimg"], cur_nimg=manifest["cur_nimg"],
            metric=metric_name, value=values[metric_name], num_images=m.num_images, seed=seed, kind=kind,
            reference=about[metric_name][2], extractor_id=about[metric_name][0], protocol=about[metric_name][1],
            scorer=self.ident(), seconds=round(time.time() - t0, 3), time=time.time()) for metric_name in m.metric_names]
        for row in rows[1:]:  # the ranking metric's row last: the coordinator takes it as "this checkpoint is scored"
            store.write_row(row)
        row = rows[0]
        store.write_row(row)
        return {**row.model_dump(), "also": {r.metric: r.value for r in rows[1:]}}

    def score_teacher(self, storage: Storage, source: str, *, steps: int, seed: int,
                      metric: Optional[dict] = None, reuse: bool = True) -> dict:
        """The run's frozen teacher (``RUN/teacher``) scored under checkpoint ``source``'s protocol: its Heun samples
        (``steps`` steps, 2 steps - 1 NFE) of the latents and labels the generator gets for ``seed``, every metric in
        ``metric.names`` against the same references in the same feature spaces (``metric``: MetricConfig overrides,
        as for :meth:`score`). One seed set: the teacher costs 2 steps - 1 generator scores. Stored as
        ``RUN/evaluate/teacher-<protocol>-<nfe>-<num_images>.json`` and, with ``reuse``, read back instead of
        recomputed while everything it depends on (seed, metrics, references, teacher weights, data) is unchanged.
        Returns {nfe, steps, num_images, seed, metrics: {name: value}, ..., stored, reused}."""
        from schemas.run import MetricConfig, RunConfig
        from sida_core.edm import heun_nfe
        from sida_core.training_loop import load_network

        store = RunStore(storage)
        t0 = time.time()
        if steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {steps}")
        cfg = RunConfig.model_validate(storage.read_json(f"{source}/manifest.json")["config"])
        m = MetricConfig.model_validate({**cfg.metric.model_dump(), **(metric or {})})
        teacher_manifest = storage.read_json("teacher/manifest.json")
        nfe = heun_nfe(steps)
        inputs = {"seed": int(seed), "steps": int(steps), "num_images": m.num_images, "metrics": m.metric_names,
                  "protocol": m.protocol, "reference": m.reference, "references": dict(m.references),
                  "dinov2": m.dinov2, "vae": m.vae, "teacher_hash": teacher_manifest["content_hash"],
                  "data": cfg.data.model_dump(mode="json")}
        ref = store.teacher_score_ref(m.protocol, nfe, m.num_images)
        if reuse:
            stored = store.read_teacher_score(ref)
            if stored is not None and stored.get("inputs") == inputs:
                return {**stored, "stored": storage.uri_of(ref), "reused": True}
        with tempfile.TemporaryDirectory(prefix="sida-teacher-") as scratch:
            teacher, _ = load_network(store.fetch_checkpoint("teacher", Path(scratch)), "net", self._device())
        feats = self.generated_features(cfg, m, teacher, teacher_manifest["network"], seed, heun_steps=steps)
        values, about = self.metric_values(cfg, m, feats, seed)
        result = {"nfe": nfe, "steps": steps, "num_images": m.num_images, "seed": int(seed),
                  "metrics": {n: float(values[n]) for n in m.metric_names},
                  "extractors": {n: about[n][0] for n in m.metric_names},
                  "protocols": {n: about[n][1] for n in m.metric_names},
                  "references": {n: about[n][2] for n in m.metric_names},
                  "teacher_hash": teacher_manifest["content_hash"], "inputs": inputs, "scorer": self.ident(),
                  "seconds": round(time.time() - t0, 3), "time": time.time()}
        store.write_teacher_score(ref, result)
        return {**result, "stored": storage.uri_of(ref), "reused": False}


def check_reference(cfg) -> None:
    """Read ``metric.reference`` and check it against the metric's feature space the way the scorers will,
    so that unreadable or mismatched statistics stop ``sida train`` before training starts, not at the first
    checkpoint. Raises the readers' one-line errors (ReferenceStatsError, ReferenceMismatch, ...)."""
    from sida_core.metrics.catalog import get_metric

    m = cfg.metric
    if not m.enabled:
        return
    scorer = None
    for key in dict.fromkeys(get_metric(n).space for n in m.metric_names):  # each space once, in order
        uri = m.reference if key == METRIC_SPACES[m.name] else m.references.get(key)
        if key == "fd_digits" and not uri:
            continue  # the built-in classifier and train split: nothing here can be missing or mismatched
        scorer = scorer or CheckpointScorer(threads=1)
        space = scorer._space(key, m)  # weights found and checked (Inception, DINOv2)
        if uri:  # (a latent run's VAE folder is staged and its config checked here too)
            scorer.reference(cfg, m, space, features=any(get_metric(n).needs == "features" and get_metric(n).space == key
                                                         for n in m.metric_names))


def score_split(storage: Storage, name: str, scorers: list, *, seed: int, metric: Optional[dict] = None,
                kind: str = "final", source: Optional[str] = None, trial: Optional[str] = None) -> dict:
    """Score checkpoint ``name`` with its ``num_images`` split into one contiguous range per scorer actor (each
    generates and extracts only its range: the per-chunk seeding makes the ranges' features concatenate to exactly
    one pass's), then compute the metrics and write the rows here, as :meth:`CheckpointScorer.score` would."""
    import numpy as np
    import ray

    from schemas.run import MetricConfig

    run_metric = storage.read_json(f"{source or name}/manifest.json")["config"]["metric"]  # what each scorer reads
    total = MetricConfig.model_validate({**run_metric, **(metric or {})}).num_images
    k = max(1, min(len(scorers), total))
    bounds = [total * i // k for i in range(k + 1)]
    parts = ray.get([actor.features.remote(storage, name, seed=seed, start=lo, count=hi - lo, metric=metric,
                                           source=source)
                     for actor, lo, hi in zip(scorers, bounds[:-1], bounds[1:])])
    merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return CheckpointScorer(threads=1).score(storage, name, metric=metric, seed=seed, kind=kind, source=source,
                                             trial=trial, features=merged)


def make_scorers(metric, n: Optional[int] = None) -> list:
    """``n`` (default ``metric.num_scorers``) scorer actors with the resources ``metric`` asks for."""
    import ray

    actor = ray.remote(CheckpointScorer).options(
        num_cpus=metric.cpus_per_scorer, num_gpus=metric.gpus_per_scorer, resources=dict(metric.scorer_resources) or None,
        max_restarts=-1, max_task_retries=0)
    nice = NICE if not metric.gpus_per_scorer else 0
    return [actor.remote(threads=max(1, int(metric.cpus_per_scorer)), nice=nice)
            for _ in range(n or metric.num_scorers)]


def live_row_key(metric, name: str) -> str:
    """The leaderboard key of checkpoint ``name``'s live score in the run's ranking metric: present = scored."""
    return row_key(name, metric.name, "live", metric.seed)


def unscored(store: RunStore, metric) -> list[str]:
    """The run's committed checkpoints with neither a live score nor a skip record: what its scoring still owes it
    (a driver killed after training ended, before its scorers drained, leaves some). Storage reads only, no Ray."""
    keys, skipped = store.row_keys(), set(store.skipped())
    return [n for n in store.checkpoint_names()
            if live_row_key(metric, n) not in keys and n not in skipped and store.storage.exists(f"{n}/manifest.json")]


class ScoringCoordinator:
    """Feeds one run's new checkpoints to the scorers; see the module docstring for the policy."""

    def __init__(self, store: RunStore, scorers: list, metric, *, trial: Optional[str] = None, poll_s: float = 2.0,
                 log: Callable[[str], None] = print):
        self.store, self.scorers, self.metric = store, list(scorers), metric
        self.trial, self.poll_s, self.log = trial, poll_s, log
        self.in_flight: dict[Any, tuple[str, Any]] = {}  # ObjectRef -> (checkpoint, actor)
        self.attempts: dict[str, int] = {}
        self.dispatches: dict[str, int] = {}
        self.recovering: dict[Any, Any] = {}  # actor whose process died -> ping ObjectRef (no work until it answers)
        self.seen: set[str] = set()
        keys = store.row_keys()
        self.done = {n for n in store.checkpoint_names() if live_row_key(metric, n) in keys}
        self.skipped = set(store.skipped())
        self.best = self._best_row()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _best_row(self) -> Optional[dict]:
        return self.store.best_live_row(self.metric.name)

    # ------------------------------------------------------------------ one round
    def poll(self) -> None:
        """Collect finished scores, discover committed checkpoints, skip per policy, dispatch to free scorers."""
        self._collect()
        names = set(self.store.checkpoint_names())
        for gone in sorted(self.seen - names - self.done - self.skipped - self._busy_names()):
            self._skip(gone, "deleted by the keep-last-K rotation before it was scored")
        new = [n for n in names - self.seen if self.store.storage.exists(f"{n}/manifest.json")]  # committed only
        self.seen |= set(new)
        waiting = sorted(self.seen & names - self.done - self.skipped - self._busy_names(),
                         key=lambda n: int(n.split("-")[1]), reverse=True)
        busy = {actor for _, actor in self.in_flight.values()} | set(self.recovering)
        for actor in [a for a in self.scorers if a not in busy]:
            if not waiting:
                break
            self._dispatch(waiting.pop(0), actor)
        for old in waiting[self.metric.max_backlog:]:
            self._skip(old, f"scoring fell behind: {len(waiting)} checkpoints waiting, newest first "
                            f"(metric.max_backlog={self.metric.max_backlog})")

    def _due(self) -> bool:
        """Checkpoints still to score (waiting for a scorer that is restarting, say)."""
        return bool(self.seen - self.done - self.skipped - self._busy_names())

    def _busy_names(self) -> set[str]:
        return {name for name, _ in self.in_flight.values()}

    def _dispatch(self, name: str, actor) -> None:
        ref = actor.score.remote(self.store.storage, name, seed=self.metric.seed, trial=self.trial)
        self.in_flight[ref] = (name, actor)
        self.dispatches[name] = self.dispatches.get(name, 0) + 1

    def _skip(self, name: str, reason: str) -> None:
        self.skipped.add(name)
        self.store.record_skip(name, reason)
        self.log(f"scoring: skipped {name}: {reason}")

    def _collect(self) -> None:
        import ray
        from ray.exceptions import RayActorError

        for actor, ping in list(self.recovering.items()):  # restarted by Ray (max_restarts): usable once it answers
            if ray.wait([ping], timeout=0)[0]:
                try:
                    ray.get(ping)
                    del self.recovering[actor]
                except RayActorError:
                    self.recovering[actor] = actor.ident.remote()
        if not self.in_flight:
            return
        ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0)
        for ref in ready:
            name, actor = self.in_flight.pop(ref)
            try:
                row = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 -- a scorer died or raised: decide from storage, not memory
                died = isinstance(exc, RayActorError)
                if died:
                    self.recovering[actor] = actor.ident.remote()
                self._failed(name, "scorer process died" if died else _one_line(exc))
                continue
            self.done.add(name)
            also = "".join(f", {k} = {v:.4f}" for k, v in (row.get("also") or {}).items())
            self.log(f"scoring: {name} ({row['kimg']:.1f} kimg) {row['metric']} = {row['value']:.4f}{also} "
                     f"[{row['num_images']} images, {row['seconds']:.1f} s]")
            if self.best is None or row["value"] < self.best["value"]:
                self._pin(row)

    def _failed(self, name: str, why: str) -> None:
        if live_row_key(self.metric, name) in self.store.row_keys():  # the scorer wrote its row before it died: nothing to redo
            self.done.add(name)
            return
        self.attempts[name] = self.attempts.get(name, 0) + 1
        self.errors.append(f"{name}: {why}")
        self.log(f"scoring: {name} failed (attempt {self.attempts[name]}/{ATTEMPTS}): {why}")
        if not self.store.storage.exists(f"{name}/manifest.json"):
            self._skip(name, "deleted by the keep-last-K rotation while it was being scored")
        elif self.attempts[name] >= ATTEMPTS:
            self._skip(name, f"scoring failed {ATTEMPTS} times; last error: {why}")
        # else: still waiting, dispatched again by the next poll

    def _pin(self, row: dict) -> None:
        previous, self.best = self.best, row
        if not self.metric.pin_best:
            return
        try:
            self.store.pin_best(row, previous)
        except Exception as exc:  # noqa: BLE001 -- rotation may have deleted it meanwhile; the row stands
            self.log(f"scoring: could not pin {row['checkpoint']}: {_one_line(exc)}")

    # ------------------------------------------------------------------ the thread
    def start(self) -> "ScoringCoordinator":
        self._thread = threading.Thread(target=self._loop, name="sida-scoring", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 -- storage hiccups must not end scoring; logged, retried
                self.errors.append(_one_line(exc))
                self.log(f"scoring: poll failed, retrying: {_one_line(exc)}")
            self._stop.wait(self.poll_s)

    def stop(self) -> None:
        """Stop polling (scores in flight are abandoned; their checkpoints stay unscored, not half-scored)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stop and release the scorer actors."""
        import ray

        self.stop()
        for actor in self.scorers:
            ray.kill(actor)

    def finish(self, timeout_s: Optional[float] = None) -> dict:
        """After training: score what is still due (the final checkpoint always), then stop; a summary."""
        self.stop()
        timeout_s = self.metric.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self.poll()
            if not self.in_flight and not self._due():
                break
            time.sleep(min(self.poll_s, 0.5))
        else:
            self.log(f"scoring: gave up waiting after {timeout_s} s; {len(self.in_flight)} score(s) unfinished")
        return self.summary()

    def summary(self) -> dict:
        best = self.best
        return {"scored": len(self.done), "skipped": len(self.skipped), "in_flight": len(self.in_flight),
                "best": None if best is None else {k: best[k] for k in ("checkpoint", "kimg", "metric", "value")}}


def _one_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return " ".join((lines[-1] if lines else type(exc).__name__).split())
