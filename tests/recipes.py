"""Tiny run recipes shared by the tests: an MLP teacher trained for 1 kimg and batches of a few dozen images,
so each run costs seconds of compute (most of a Ray test's time is Ray starting its workers)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits.yaml"

TINY_TEACHER = ["teacher.network.arch=mlp",
                "teacher.network.kwargs={hidden: 32, enc_layers: 1, dec_layers: 1, emb_channels: 16}",
                "teacher.train.kimg=1", "teacher.train.batch=64", "device=cpu"]
TINY_STEPS = ["batch.total=32", "batch.per_worker=16", "stages.fake_score_only_kimg=0.032",
              "stages.sid_until_kimg=0.064", "log_every_kimg=0.032"]
# The single-process engine (sida distill / demo): 4 steps, 2 checkpoints.
TINY_DISTILL = TINY_TEACHER + TINY_STEPS + ["total_kimg=0.128", "checkpoint_every_kimg=0.064"]
# Ray Train runs whose tests are about training: the asynchronous scorers stay off.
TINY_RAY = TINY_TEACHER + TINY_STEPS + ["scaling.cpus_per_worker=1", "optimizer.lr_psi=1e-3",
                                        "optimizer.lr_theta=1e-3", "metric.enabled=false"]
# Ray Tune sweeps: one worker per trial, fractional CPUs so that a trial (driver 1 + worker 0.5 + scorer 0.5 = 2
# logical CPUs) fits twice or more in a test Ray started with more logical CPUs than cores; 6 steps, 3 checkpoints,
# each scored on 400 images.
TINY_TUNE = TINY_TEACHER + TINY_STEPS + [
    "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "metric.cpus_per_scorer=0.5", "metric.num_images=400",
    "metric.batch_size=200", "metric.max_backlog=10", "optimizer.lr_psi=1e-3", "optimizer.lr_theta=1e-3",
    "total_kimg=0.192", "checkpoint_every_kimg=0.064", "keep_checkpoints=10"]
