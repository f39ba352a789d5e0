"""The one cadence both hosts run (sida_core.loop): budget, log and checkpoint boundaries, rounding, resume."""
from __future__ import annotations

from sida_core.loop import cadence, kimg_to_nimg, metrics_row, next_boundary


class Counter:
    """The part of a Distiller the cadence uses: step() advances cur_nimg by the batch; one performance report."""

    def __init__(self, batch: int, cur_nimg: int = 0):
        self.batch, self.cur_nimg, self.steps, self.reported = batch, cur_nimg, 0, False

    def step(self) -> dict:
        self.cur_nimg += self.batch
        self.steps += 1
        return {"step": self.steps, "cur_nimg": self.cur_nimg, "kimg": self.cur_nimg / 1000, "stage": "sida",
                "loss_G": 1}

    def performance_report(self) -> list[str]:
        if self.reported:
            return []
        self.reported = True
        return ["performance: eager fp32"]


def run(d, **kw) -> list:
    return [(t.stats["cur_nimg"], t.row is not None, t.checkpoint, t.done) for t in cadence(d, **kw)]


def test_rounding_is_to_the_nearest_image():
    assert kimg_to_nimg(1.005) == 1005 and int(1.005 * 1000) == 1004  # what the old `int(...)` budget got wrong
    assert kimg_to_nimg(0.128) == 128 and kimg_to_nimg(140) == 140_000
    assert next_boundary(0, 1.005) == 1005 and next_boundary(1005, 1.005) == 2010 and next_boundary(1004, 1.005) == 1005


def test_rows_at_log_boundaries_and_checkpoints_checkpoint_at_the_end():
    d = Counter(batch=30)
    ticks = run(d, total_kimg=0.2, log_every_kimg=0.05, checkpoint_every_kimg=0.12)
    assert [t[0] for t in ticks] == [30, 60, 90, 120, 150, 180, 210]  # runs until cur_nimg >= 200
    assert [n for n, row, _, _ in ticks if row] == [60, 120, 150, 210]  # crossed 50, 100 (+ckpt 120), 150, end
    assert [n for n, _, ck, _ in ticks if ck] == [120, 210]
    assert [n for n, _, _, done in ticks if done] == [210]


def test_resume_mid_run_keeps_the_same_boundaries_and_a_finished_run_yields_nothing():
    straight = run(Counter(batch=32), total_kimg=0.256, log_every_kimg=0.064, checkpoint_every_kimg=0.128)
    resumed = run(Counter(batch=32, cur_nimg=128), total_kimg=0.256, log_every_kimg=0.064, checkpoint_every_kimg=0.128)
    assert resumed == [t for t in straight if t[0] > 128]
    assert run(Counter(batch=32, cur_nimg=256), total_kimg=0.256, log_every_kimg=0.064, checkpoint_every_kimg=0.128) == []


def test_rows_carry_throughput_workers_and_the_notes_come_once():
    clock = iter(range(100)).__next__
    ticks = list(cadence(Counter(batch=10), total_kimg=0.03, log_every_kimg=0.01, checkpoint_every_kimg=0.03,
                         num_workers=2, clock=lambda: float(clock())))
    assert [t.notes for t in ticks] == [["performance: eager fp32"], [], []]
    assert [t.images for t in ticks] == [10, 10, 10]
    row = ticks[-1].row
    assert row["num_workers"] == 2 and row["images_per_s"] > 0 and row["loss_G"] == 1.0 and isinstance(row["loss_G"], float)
    assert isinstance(row["step"], int) and isinstance(row["cur_nimg"], int)
    assert metrics_row({"step": 3, "x": 2}, images_per_s=1.0, num_workers=1, now=5.0) == {
        "step": 3, "x": 2.0, "images_per_s": 1.0, "num_workers": 1, "time": 5.0}
