"""Speed options of one distillation step (``performance:`` in the run config; docs/performance.md).

None of them changes the mathematics: each is an explicit step applied to the networks or the optimisers, and
``tests/test_performance.py`` runs the same steps with and without each one and compares losses and parameters.

* ``compile``: ``torch.compile`` of G_theta, f_psi and/or f_phi (``nn.Module.compile``: the module, its parameter
  names and its state dict stay the same, so checkpoints and DDP are unaffected); ``compile_mode`` is torch's mode.
* ``channels_last``: NHWC memory format for the three networks and their image inputs.
* ``adam``: ``default`` (torch's choice: for-loop on CPU, foreach on CUDA), ``foreach`` or ``fused`` (one kernel
  for all parameters; falls back to ``foreach`` with a message where the device has no fused Adam).
* ``single_psi_forward``: in SiDA's fake-score update, one encoder pass of f_psi over the concatenated
  [x_g + n; x_real + n] batch and the decoder over the fake half only, instead of two forwards (exact per sample;
  refused for nets with batch statistics).
* ``tf32``: TF32 matmuls and convolutions on CUDA (None: torch's defaults).
* ``activation_checkpointing``: recompute each U-Net block in the backward pass (memory for time; large EDM2 nets).

Plain torch: no Ray, no pydantic.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

NETWORKS = ("generator", "fake_score", "teacher")
ADAM_IMPLS = ("default", "foreach", "fused")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class Performance:
    """The speed options; the defaults are the plain eager step (see the module docstring)."""

    compile: tuple[str, ...] = ()
    compile_mode: str = "default"
    channels_last: bool = False
    adam: str = "default"
    single_psi_forward: bool = False
    tf32: Optional[bool] = None
    activation_checkpointing: bool = False

    def __post_init__(self):
        bad = [n for n in self.compile if n not in NETWORKS]
        if bad:
            raise ValueError(f"performance.compile: unknown network(s) {bad}; expected a subset of {list(NETWORKS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"performance.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.adam not in ADAM_IMPLS:
            raise ValueError(f"performance.adam must be one of {ADAM_IMPLS}, got {self.adam!r}")

    def describe(self) -> str:
        on = [f"compile={'+'.join(self.compile)}" + (f"({self.compile_mode})" if self.compile_mode != "default" else "")
              ] if self.compile else []
        on += ["channels_last"] if self.channels_last else []
        on += [f"adam={self.adam}"] if self.adam != "default" else []
        on += ["single_psi_forward"] if self.single_psi_forward else []
        on += [f"tf32={self.tf32}"] if self.tf32 is not None else []
        on += ["activation_checkpointing"] if self.activation_checkpointing else []
        return ", ".join(on) or "eager (no options)"


# ----------------------------------------------------------------------------------------------- networks
def batch_statistics_modules(net: nn.Module) -> list[str]:
    """Names of submodules whose output for one sample depends on the others in the batch (BatchNorm family)."""
    return [name or type(net).__name__ for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)
            and not isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))]


def check_single_forward(net: nn.Module) -> None:
    """Refuse ``single_psi_forward`` (one-line ValueError) for a net with batch statistics: there one pass over
    [fake; real] is not two passes."""
    plain = getattr(net, "module", net)
    found = batch_statistics_modules(plain)
    if found:
        raise ValueError(f"performance.single_psi_forward needs a fake-score net without batch statistics; "
                         f"{type(plain).__name__} has {found[0]}")


def prepare_network(net: nn.Module, perf: Performance) -> nn.Module:
    """Memory format and activation checkpointing, in place, before any DDP wrapper; returns ``net``."""
    if perf.channels_last:
        net.to(memory_format=torch.channels_last)
    if perf.activation_checkpointing:
        backbones: list[Any] = [m for m in net.modules() if hasattr(m, "enc") and hasattr(m, "dec")]  # U-Nets
        if not backbones:
            raise ValueError(f"performance.activation_checkpointing: {type(net).__name__} has no U-Net blocks to "
                             f"checkpoint")
        for m in backbones:
            m.activation_checkpointing = True
    return net


def to_memory_format(x: torch.Tensor, perf: Performance) -> torch.Tensor:
    """An image batch in the networks' memory format (NHWC with ``channels_last``)."""
    return x.contiguous(memory_format=torch.channels_last) if perf.channels_last and x.dim() == 4 else x


def compile_unavailable(device: torch.device) -> Optional[str]:
    """Why ``torch.compile`` cannot run here (None if it can)."""
    try:
        import torch._dynamo
    except Exception as exc:  # pragma: no cover - torch builds without dynamo
        return f"torch._dynamo cannot be imported ({exc})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python / platform"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH for inductor's CPU kernels"
    return None


def compile_networks(nets: dict[str, nn.Module], perf: Performance, device, notes: list[str]) -> list[str]:
    """``nn.Module.compile`` the networks named in ``perf.compile`` (keys: :data:`NETWORKS`), in place.

    Returns the names compiled; where compile is unavailable, appends why to ``notes`` and compiles nothing."""
    if not perf.compile:
        return []
    why = compile_unavailable(torch.device(device))
    if why:
        notes.append(f"performance.compile ignored: {why}; running eager")
        return []
    import torch._dynamo.config as dynamo_config

    # one forward function serves several graphs (grad / no grad, each return_flag, trainable or frozen weights, and
    # every network sharing a class): above torch's default of 8 it would fall back to eager silently
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    done = []
    for name in perf.compile:
        plain = getattr(nets[name], "module", nets[name])
        plain.compile(mode=perf.compile_mode)
        done.append(name)
    notes.append(f"torch.compile({perf.compile_mode}) of {', '.join(done)}: the first steps include compilation")
    return done


def graph_breaks() -> int:
    """How many graph breaks torch.compile has met so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return 0
    return int(sum(counters["graph_break"].values()))


def set_tf32(flag: Optional[bool]) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (None leaves torch's defaults)."""
    if flag is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(flag)
    torch.backends.cudnn.allow_tf32 = bool(flag)


# ----------------------------------------------------------------------------------------------- optimiser
def fused_adam_unsupported(params: Sequence[torch.Tensor]) -> Optional[str]:
    """Why torch's fused Adam kernel cannot take these parameters (None if it can)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch
        devices = {"cuda"}
    for p in params:
        if p.device.type not in devices:
            return f"no fused kernel for {p.device.type} tensors"
        if not p.is_floating_point():
            return f"no fused kernel for {p.dtype} parameters"
    return None


def adam(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
         perf: Performance, notes: list[str]) -> torch.optim.Adam:
    """Adam with the implementation ``perf.adam`` asks for (fused falls back to foreach, saying so in ``notes``)."""
    params = list(params)
    if perf.adam == "default":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    if perf.adam == "fused":
        why = fused_adam_unsupported(params)
        if why is None:
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
        notes.append(f"performance.adam=fused unavailable here ({why}); using foreach")
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, foreach=True)


__all__ = ["ADAM_IMPLS", "COMPILE_MODES", "NETWORKS", "Performance", "adam", "batch_statistics_modules",
           "check_single_forward", "compile_networks", "compile_unavailable", "graph_breaks", "prepare_network",
           "set_tf32", "to_memory_format"]
