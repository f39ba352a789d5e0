"""What makes a CPU run repeat bit for bit, and the two knobs that extend that across machines.

A CPU run here is deterministic on one machine (fixed seeds, a fixed data order, no non-deterministic kernels).
Across machines, two things change float rounding, and a trained network is chaotic in its rounding, so a
teacher trained on two machines ends at different weights and scores:

* **the CPU kernels torch dispatches to**, chosen by instruction set at start-up: ATen's vectorised kernels
  (``ATEN_CPU_CAPABILITY``), oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's BLAS (``MKL_CBWR``).
  Each one alone changes the weights of a 2-kimg digits teacher here (``tests/test_determinism.py``).
  :func:`cpu_kernel_env` caps all three at one level; it must be in the environment before torch is imported,
  so the ``sida`` entry point applies it (``SIDA_CPU_KERNELS``) and Ray workers inherit it.
* **the number of intra-op threads** (reductions split differently): :func:`cpu_threads` fixes it for the work
  whose result is cached and reused everywhere (the built-in teacher: 2, the digits classifier: 1).

Plain Python here (no torch import at module level), so the entry point can use it before torch loads.
"""
from __future__ import annotations

import os
import platform
from contextlib import contextmanager
from typing import Iterator, Mapping, Optional

# Level -> the three kernel families' caps. "compatible": scalar ATen kernels, SSE4.1 oneDNN, MKL's compatible
# path (any x86-64 CPU since 2008); "avx2" (the default): what every x86 CPU since 2013-2015 (Haswell, Zen) runs, so
# an AVX-512 machine computes what an AVX2-only one does.
KERNEL_LEVELS: dict[str, dict[str, str]] = {
    "compatible": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}
DEFAULT_LEVEL = "avx2"
ENV_VAR = "SIDA_CPU_KERNELS"
PINNED_VARS = tuple(sorted({k for caps in KERNEL_LEVELS.values() for k in caps}))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kernel_env(level: Optional[str], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to add to ``environ`` for kernel ``level`` (``compatible``, ``avx2`` or ``native``: no cap).

    Nothing on non-x86 machines, nothing where the CPU lacks the level (its kernels would not be the capped ones
    anyway), and never a variable the user already set. Raises ValueError for an unknown level."""
    level = (level or DEFAULT_LEVEL).strip().lower()
    if level == "native":
        return {}
    if level not in KERNEL_LEVELS:
        raise ValueError(f"{ENV_VAR}={level!r}: expected one of native, {', '.join(KERNEL_LEVELS)}")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    if level == "avx2" and "avx2" not in _cpu_flags():
        return {}
    return {k: v for k, v in KERNEL_LEVELS[level].items() if k not in environ}


def pin_cpu_kernels(environ=os.environ) -> dict[str, str]:
    """Apply :func:`cpu_kernel_env` for ``$SIDA_CPU_KERNELS`` (default ``avx2``) to ``environ``; returns what
    it set. Call before torch is imported (afterwards the kernels are already chosen)."""
    env = cpu_kernel_env(environ.get(ENV_VAR), environ)
    environ.update(env)
    return env


@contextmanager
def cpu_threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (then restore): results that do not depend on how many
    cores the machine, or $SIDA_NUM_THREADS, gives the process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
