#!/usr/bin/env python
"""Where a checkpoint score's time goes, and what live scoring costs training. Prints ONE JSON object as the last
line of stdout; progress goes to stderr.

1. **Per feature space, one end-to-end** ``CheckpointScorer.score`` (ray_jobs/scoring.py, in this process, on the
   current device: CUDA when present, else the CPU) of a real checkpoint in a run folder this benchmark writes:
   ``build_distiller`` + one distillation step (so the Adam moments are in it, as in a trained run's checkpoint)
   + ``save_distill_checkpoint`` + ``RunStore.upload_checkpoint``, with ``--size``'s network (``digits``: the
   configs/digits.yaml teacher, SongUNet 16 ch, 8x8x1, the CPU default; ``cifar10``: EDM's CIFAR-10 DDPM++,
   32x32x3, 55.7M parameters, the CUDA default; weights random: speed does not depend on them). The reference
   statistics (with features, for KID and precision / recall) are written first through the real
   ``compute_reference`` / ``write_reference`` (digits: the digits train split; cifar10: synthetic images of the
   right shape), one per space, from as many images as the score generates (digits: at most the train split's).

   The scorer's own calls are timed, not re-implemented: ``load_network`` (fetch, sha256 check, load),
   ``generate_images`` (the one-step samples, per batch), each feature space's ``features`` and
   ``compute_metrics``; "other" is the rest of ``score`` (config validation, rows written). The first score of
   a scorer also loads its feature space and reads and prepares the reference (``first_score_s``); the figures
   are of the warm scores after it (``--repeats``, medians). Each metric group (FD, KID, precision + recall) is
   then timed alone on the features that score produced (``metric_seconds``). ``fd_digits`` is always scored;
   ``fid_inception`` when the Inception weights are present (``resolve_weights``), else a ``skipped`` reason.
   Each space is scored separately (its own ``metric.num_images``) so that Inception's CPU speed does not
   dictate the digits space's image count; a live scorer with both in ``metric.names`` generates once for both.
   No gallery (``metric.gallery = 0``): a live score writes one (64 more one-step samples) besides.

2. **Training slow-down** caused by live scoring: ``benchmarks/async_fid_overhead.py``'s ``main`` (``sida train``
   with the scorer actors on vs off, steady-state training images/s), its result under ``training_slowdown``
   (``--slowdown-args`` are passed to it; ``--no-slowdown`` skips it). It trains on the CPU with the digits config.

Examples::

    python benchmarks/scoring_throughput.py                       # CPU: digits net, 2000 + 48 images, slow-down
    python benchmarks/scoring_throughput.py --size cifar10        # the GPU size (10k images per space)
    python benchmarks/scoring_throughput.py --num-images 200 --inception-images 8 --no-slowdown   # the test's
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray_overhead  # noqa: E402  (same folder: the JSON-on-stdout wrapper the Ray benchmarks share)

#: per --size: the network and the images per score (fd_digits space, fid_inception space)
SIZES: dict[str, dict[str, Any]] = {
    "digits": {"config": REPO / "configs" / "digits.yaml", "num_images": 2000, "inception_images": 48,
               "network": None},  # configs/digits.yaml's own teacher network
    "cifar10": {"config": REPO / "configs" / "cifar10_uncond.yaml", "num_images": 10000, "inception_images": 10000,
                "network": "cifar10-ddpmpp"},  # benchmarks/step_throughput.py NETS
}
DIGITS_METRICS = ["fd_digits", "kid_digits", "precision_digits", "recall_digits"]
INCEPTION_METRICS = ["fid_inception", "kid_inception", "precision_inception", "recall_inception"]


def log(msg: str) -> None:
    print(f"[scoring_throughput] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="network and image counts (default: cifar10 on CUDA, digits on the CPU)")
    p.add_argument("--num-images", type=int, default=None, help="metric.num_images of the fd_digits score")
    p.add_argument("--inception-images", type=int, default=None, help="metric.num_images of the fid_inception score")
    p.add_argument("--batch-size", type=int, default=500, help="metric.batch_size (generator/extractor batch)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the scorer (default 1 on the CPU, as a live scorer's cpus_per_scorer)")
    p.add_argument("--repeats", type=int, default=1, help="warm scores per space after the first (medians)")
    p.add_argument("--skip-inception", action="store_true", help="score fd_digits only")
    p.add_argument("--no-slowdown", action="store_true", help="skip the training slow-down (async_fid_overhead)")
    p.add_argument("--slowdown-args", default="--kimg 12 --checkpoint-every-kimg 2",
                   help="arguments for benchmarks/async_fid_overhead.py (one string)")
    a = p.parse_args(argv)
    import torch

    a.cuda = torch.cuda.is_available()
    a.size = a.size or ("cifar10" if a.cuda else "digits")
    size = SIZES[a.size]
    a.num_images = a.num_images or size["num_images"]
    a.inception_images = a.inception_images or size["inception_images"]
    a.threads = a.threads or (torch.get_num_threads() if a.cuda else 1)
    if min(a.num_images, a.inception_images) < 4 or a.repeats < 1 or a.batch_size < 1:
        p.error("--num-images and --inception-images must be >= 4 (precision / recall take k = 3 neighbours), "
                "--repeats and --batch-size >= 1")
    return a


# ------------------------------------------------------------------------------------------ the run folder
def run_config(a):
    """The run's RunConfig (the preset of --size; paths are not checked: nothing is read from them)."""
    from schemas.loader import load_config
    from schemas.run import RunConfig

    size = SIZES[a.size]
    overrides = ["batch.total=2", "batch.per_worker=2", "scaling.num_workers=1",  # the one step before saving
                 "stages.fake_score_only_kimg=0", "stages.sid_until_kimg=0", "metric.gallery=0"]
    if size["network"]:
        from step_throughput import NETS

        arch, res, ch, labels, kwargs = NETS[size["network"]]
        overrides += ["teacher.path=null", f"teacher.network.arch={arch}", f"teacher.network.kwargs={json.dumps(kwargs)}",
                      f"data.resolution={res}", f"data.channels={ch}", f"data.num_classes={labels}"]
    return load_config(RunConfig, size["config"], overrides)


def train_set_for(cfg, n_synthetic: int):
    """The digits train split (the digits size) or synthetic images of the data's shape (no dataset is read)."""
    import torch

    from sida_core.data import ImageDataset, load_dataset

    if cfg.data.kind == "digits":
        return load_dataset(cfg.data)[0]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n_synthetic, cfg.data.channels, cfg.data.resolution, cfg.data.resolution, generator=g) * 2 - 1
    return ImageDataset(images=images, name="synthetic")


def make_run(cfg, train_set, runs: Path, device) -> tuple[Any, str, dict]:
    """A run folder with config.json and one checkpoint as training writes it; (storage, checkpoint name, facts)."""
    import torch

    from ray_jobs.train import public_config
    from sida_core.networks import count_parameters
    from sida_core.training_loop import build_distiller, build_from_spec, network_spec, save_distill_checkpoint
    from store.run_store import RunStore
    from store.storage import Storage

    torch.manual_seed(0)
    spec = network_spec(cfg, train_set)
    teacher = build_from_spec(spec).to(device).eval().requires_grad_(False)
    distiller = build_distiller(cfg, teacher, train_set, device)
    t0 = time.perf_counter()
    distiller.step()
    step_s = time.perf_counter() - t0
    store = RunStore(Storage(str(runs)).child("bench"))
    store.write_config(public_config(cfg))
    local = save_distill_checkpoint(distiller, runs / "local", cfg, spec, config=public_config(cfg), run=store.name)
    name = local.name
    store.upload_checkpoint(local, name)
    size_mb = sum(f.stat().st_size for f in Path(store.storage.path_of(name)).rglob("*") if f.is_file()) / 2 ** 20
    facts = {"arch": spec["arch"], "resolution": spec["img_resolution"], "channels": spec["img_channels"],
             "label_dim": spec["label_dim"], "parameters": count_parameters(teacher),
             "checkpoint_mb": round(size_mb, 2), "one_step_s": round(step_s, 3)}
    del distiller, teacher
    return store.storage, name, facts


def write_reference_for(scorer, cfg, metric: dict, key: str, train_set, n: int, uri: Path) -> dict:
    """``sida fid-stats --features``'s result for space ``key`` from ``n`` images of ``train_set`` (the space as the
    scorer builds it for ``metric``: same protocol); {images, seconds}."""
    from schemas.run import MetricConfig
    from sida_core.metrics.reference import compute_reference
    from store.reference import write_reference

    m = MetricConfig.model_validate({**cfg.metric.model_dump(), **metric})
    space = scorer._space(key, m)
    images = train_set.images[:n]
    t0 = time.perf_counter()
    ref = compute_reference(images, space, dataset_desc={"name": train_set.name or "digits", "kind": cfg.data.kind},
                            device=scorer._device(), keep_features=True)
    write_reference(ref, str(uri))
    return {"images": int(len(images)), "seconds": round(time.perf_counter() - t0, 3)}


# ------------------------------------------------------------------------------------------ timing the scorer
class Clock:
    """Seconds spent in the scorer's own calls during one ``score``, and what ``compute_metrics`` was given."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.metric_calls: list[tuple[list[str], Any, dict]] = []

    def add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()


class TimedSpace:
    """A feature space whose ``features`` are timed; everything else is the space's own."""

    def __init__(self, space, clock: Clock):
        self._space, self._clock = space, clock

    def __getattr__(self, name):
        return getattr(self._space, name)

    def features(self, images, device="cpu"):
        t0 = self._clock.now()
        try:
            return self._space.features(images, device)
        finally:
            self._clock.add(f"features:{self._space.name}", self._clock.now() - t0)


def timed_scorer(threads: int, clock: Clock):
    from ray_jobs.scoring import CheckpointScorer

    class TimedScorer(CheckpointScorer):
        def _space(self, key, metric=None):
            return TimedSpace(super()._space(key, metric), clock)

    return TimedScorer(threads=threads)


@contextmanager
def timing(clock: Clock):
    """Wrap the module functions ``CheckpointScorer.score`` calls (looked up at call time) for the duration."""
    import sida_core.metrics.catalog as catalog
    import sida_core.metrics.score as score_mod
    import sida_core.training_loop as training_loop

    real = (training_loop.load_network, score_mod.source_images, catalog.compute_metrics)  # source_images: what
    #                                                     image_features draws every sampled batch from

    def load_network(*args, **kw):
        t0 = clock.now()
        try:
            return real[0](*args, **kw)
        finally:
            clock.add("load_checkpoint", clock.now() - t0)

    def source_images(*args, **kw) -> Iterator:
        it = real[1](*args, **kw)
        while True:
            t0 = clock.now()
            try:
                x = next(it)
            except StopIteration:
                clock.add("generation", clock.now() - t0)
                return
            clock.add("generation", clock.now() - t0)
            yield x

    def compute_metrics(names, features, **kw):
        t0 = clock.now()
        try:
            return real[2](names, features, **kw)
        finally:
            clock.add("metrics", clock.now() - t0)
            clock.metric_calls.append((list(names), features, kw))

    training_loop.load_network, score_mod.source_images, catalog.compute_metrics = (
        load_network, source_images, compute_metrics)
    try:
        yield
    finally:
        training_loop.load_network, score_mod.source_images, catalog.compute_metrics = real


def metric_groups(names: list[str]) -> list[list[str]]:
    """FD, KID, precision + recall (one computation) of one space's metric names, each timed alone."""
    pr = [n for n in names if n.split("_", 1)[0] in ("precision", "recall")]
    return [[n] for n in names if n not in pr] + ([pr] if pr else [])


def time_metric_groups(clock: Clock) -> dict[str, float]:
    from sida_core.metrics.catalog import compute_metrics

    out: dict[str, float] = {}
    for names, features, kw in clock.metric_calls:
        for group in metric_groups(names):
            t0 = time.perf_counter()
            compute_metrics(group, features, **kw)
            out["+".join(group)] = round(time.perf_counter() - t0, 4)
    return out


def measure_space(a, scorer, clock: Clock, storage, name: str, metric: dict, key: str) -> dict:
    """One cold and ``a.repeats`` warm scores of checkpoint ``name`` with ``metric``; the warm medians."""
    n = metric["num_images"]
    with timing(clock):
        t0 = time.perf_counter()
        row = scorer.score(storage, name, metric=metric, kind="final")
        first_s = time.perf_counter() - t0
        log(f"{key}: first score {first_s:.2f} s ({row['metric']} = {row['value']:.4f})")
        warm: list[dict[str, float]] = []
        for i in range(a.repeats):
            clock.seconds, clock.metric_calls = {}, []
            t0 = time.perf_counter()
            row = scorer.score(storage, name, metric=metric, kind="final")
            total = time.perf_counter() - t0
            warm.append({**clock.seconds, "total": total})
            parts = json.dumps({k: round(v, 3) for k, v in clock.seconds.items()})
            log(f"{key}: warm score {i + 1}/{a.repeats} {total:.2f} s {parts}")
    med = {k: statistics.median(w.get(k, 0.0) for w in warm) for k in warm[-1]}
    feats = {k.split(":", 1)[1]: v for k, v in med.items() if k.startswith("features:")}
    timed = ("load_checkpoint", "generation", "metrics")
    seconds = {"load_checkpoint": med.get("load_checkpoint", 0.0), "generation": med.get("generation", 0.0),
               **{f"features_{k}": v for k, v in feats.items()}, "metrics": med.get("metrics", 0.0)}
    seconds["other"] = med["total"] - sum(med.get(k, 0.0) for k in timed) - sum(feats.values())
    return {
        "metrics": [row["metric"], *row["also"]], "values": {row["metric"]: row["value"], **row["also"]},
        "num_images": n, "batch_size": metric["batch_size"], "first_score_s": round(first_s, 3),
        "score_s": round(med["total"], 3), "images_per_s_end_to_end": round(n / med["total"], 2),
        "generation_img_s": round(n / seconds["generation"], 2),
        "features_img_s": {k: round(n / v, 2) for k, v in feats.items()},
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "metric_seconds": time_metric_groups(clock),
    }


def inception_available() -> tuple[bool, str]:
    from sida_core.metrics.inception import InceptionWeightsError, resolve_weights

    try:
        source, path = resolve_weights()
    except InceptionWeightsError as exc:
        return False, str(exc)
    return True, f"{source}: {path}"


def device_name(cuda: bool) -> str:
    import torch

    from step_throughput import device_name as name  # same folder: the one owner of the device's description

    return name(torch.device("cuda" if cuda else "cpu"))


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    t_start = time.time()
    device = torch.device("cuda" if a.cuda else "cpu")
    torch.set_num_threads(a.threads)
    cfg = run_config(a)
    scratch = Path(tempfile.mkdtemp(prefix="sida-scoring-bench-"))
    out: dict[str, Any] = {
        "benchmark": "where a checkpoint score's time goes (CheckpointScorer.score), and training with live scoring "
                     "on vs off",
        "device": device.type, "device_name": device_name(a.cuda), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "loadavg_1min_start": round(os.getloadavg()[0], 2), "size": a.size,
        "repeats": a.repeats}
    try:
        train_set = train_set_for(cfg, max(a.num_images, a.inception_images))
        log(f"size {a.size}: building the run folder (one distillation step, then the checkpoint)")
        storage, name, out["network"] = make_run(cfg, train_set, scratch / "runs", device)
        clock = Clock(a.cuda)
        scorer = timed_scorer(a.threads, clock)
        refs = scratch / "refs"
        scores: dict[str, Any] = {}
        spaces = [("fd_digits", DIGITS_METRICS, a.num_images)]
        ok, why = (False, "--skip-inception") if a.skip_inception else inception_available()
        if ok:
            spaces.append(("fid_inception", INCEPTION_METRICS, a.inception_images))
        else:
            scores["fid_inception"] = {"skipped": why}
        for key, names, n in spaces:
            metric = {"name": key, "names": names, "num_images": n, "batch_size": a.batch_size, "gallery": 0,
                      "reference": str(refs / key), "references": {}}
            log(f"{key}: reference statistics (with features) of {min(n, len(train_set))} images")
            ref = write_reference_for(scorer, cfg, metric, key, train_set, n, refs / key)
            scores[key] = {"reference": ref, **measure_space(a, scorer, clock, storage, name, metric, key)}
        out["scores"] = scores
        out["inception_weights"] = why
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if a.no_slowdown:
        out["training_slowdown"] = {"skipped": "--no-slowdown"}
    else:
        import async_fid_overhead  # same folder: `sida train` with the scorers on vs off

        log(f"training slow-down: async_fid_overhead.py {a.slowdown_args}")
        r = async_fid_overhead.main(shlex.split(a.slowdown_args))
        out["training_slowdown"] = {
            "source": "benchmarks/async_fid_overhead.py " + a.slowdown_args,
            "slowdown_fraction": r["slowdown_fraction"],
            "speed_ratio_on_over_off": r["images_per_s_scoring_on"] / r["images_per_s_scoring_off"],
            **{k: r[k] for k in ("images_per_s_scoring_off", "images_per_s_scoring_on", "workers", "scorers",
                                 "kimg_per_run", "checkpoint_every_kimg", "num_images_per_score", "pairs",
                                 "total_benchmark_s")},
            "scored_during_training": r["runs"]["on"][0].get("scored_during_training"),
            "score_seconds_median": r["runs"]["on"][0].get("score_seconds_median")}
    out["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    out["total_benchmark_s"] = round(time.time() - t_start, 1)
    return out


if __name__ == "__main__":
    ray_overhead.print_json_last(main)
