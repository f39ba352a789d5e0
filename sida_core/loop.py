"""The one training cadence both hosts run: step to the budget, say when to log and when to checkpoint.

``sida distill`` (one process, :mod:`pipelines.distill`) and the Ray Train worker (:mod:`ray_jobs.train`) both
iterate :func:`cadence` and keep only their sinks (where rows, checkpoints and progress go). The budget and the
boundaries are counted in images and rounded the same way for both, so the two write rows and checkpoints at the
same ``cur_nimg`` for the same config.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional


def kimg_to_nimg(kimg: float) -> int:
    """``kimg`` as a whole number of images, rounded (``int(1.005 * 1000)`` would be 1004)."""
    return int(round(kimg * 1000))


def next_boundary(cur_nimg: int, every_kimg: float) -> int:
    """The first multiple of ``every_kimg`` (in images) after ``cur_nimg``: when to log or checkpoint next."""
    every = max(1, kimg_to_nimg(every_kimg))
    return (cur_nimg // every + 1) * every


def metrics_row(stats: dict, *, images_per_s: float, num_workers: int, now: Optional[float] = None) -> dict:
    """One metrics row (the columns of ``store.run_store.METRIC_COLUMNS``) from a step's stats: numbers as
    floats except the counters, plus throughput, the worker count and the wall time."""
    row = {k: (float(v) if isinstance(v, (int, float)) and k not in ("step", "cur_nimg") else v) for k, v in stats.items()}
    row.update(images_per_s=images_per_s, num_workers=num_workers, time=time.time() if now is None else now)
    return row


@dataclass
class Tick:
    """What one step asks of its host."""

    stats: dict  # the step's own numbers (Distiller.step)
    images: int  # images this step consumed (the progress bar's increment)
    row: Optional[dict] = None  # a metrics row to write (a log or checkpoint boundary was crossed, or the end)
    checkpoint: bool = False  # save a checkpoint now (a checkpoint boundary was crossed, or the end)
    done: bool = False  # the budget is reached
    notes: list[str] = field(default_factory=list)  # once, after the first step: what the speed options did


def cadence(distiller, *, total_kimg: float, log_every_kimg: float, checkpoint_every_kimg: float,
            num_workers: int = 1, clock: Callable[[], float] = time.time) -> Iterator[Tick]:
    """Step ``distiller`` from its ``cur_nimg`` until ``total_kimg``, yielding one :class:`Tick` per step.

    A row is due at every log boundary and at every checkpoint (so each checkpoint has its row); a checkpoint at
    every checkpoint boundary and at the end. A run already at its budget yields nothing. Exceptions of the step
    (``NonFiniteError``) propagate to the host, which records them its own way."""
    total = kimg_to_nimg(total_kimg)
    next_log = next_boundary(distiller.cur_nimg, log_every_kimg)
    next_ckpt = next_boundary(distiller.cur_nimg, checkpoint_every_kimg)
    t0, n0 = clock(), distiller.cur_nimg
    while distiller.cur_nimg < total:
        before = distiller.cur_nimg
        stats = distiller.step()
        cur = distiller.cur_nimg
        tick = Tick(stats=stats, images=cur - before, done=cur >= total, notes=distiller.performance_report())
        tick.checkpoint = cur >= next_ckpt or tick.done
        if cur >= next_log or tick.checkpoint:
            next_log = next_boundary(cur, log_every_kimg)
            tick.row = metrics_row(stats, images_per_s=(cur - n0) / max(clock() - t0, 1e-9), num_workers=num_workers)
        if tick.checkpoint:
            next_ckpt = next_boundary(cur, checkpoint_every_kimg)
        yield tick


__all__ = ["Tick", "cadence", "kimg_to_nimg", "metrics_row", "next_boundary"]
