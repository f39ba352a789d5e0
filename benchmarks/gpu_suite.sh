#!/usr/bin/env bash
# The GPU checks of the step, in one script: <= 8 minutes on one GPU, one JSON summary on stdout (progress on stderr).
#   1. the speed-option matrix on the digits net (batch 128) and on EDM's CIFAR-10 DDPM++ (55.7M, batch 32 per GPU);
#   2. img/s and peak memory of the CIFAR-10 DDPM++ and of EDM2-S on 4x64x64 latents (batch 64 per GPU, fp16),
#      eager and with the best option set;
#   3. a 1-worker `sida train` on CUDA (nccl) for a few kimg, with a scorer on a GPU fraction.
# `--small` runs the same on the CPU with small sizes, so that CI keeps this script working:
#   bash benchmarks/gpu_suite.sh --small
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec "$PY" benchmarks/gpu_suite.py "$@"
