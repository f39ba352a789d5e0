"""What both training hosts build a run from: the teacher (imported, or trained once and cached), G_theta and f_psi
around a :class:`Distiller`, and its checkpoints.

Plain torch + local files. The loop itself is :func:`sida_core.loop.cadence`; its hosts are ``sida distill``
(:mod:`pipelines.distill`, one process) and the Ray Train worker (:mod:`ray_jobs.train`, adds DDP).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from sida_core import checkpoint as ckpt
from sida_core.loop import kimg_to_nimg
from sida_core.data import ImageDataset
from sida_core.determinism import cpu_threads
from sida_core.distill import Distiller, hyper_from_config, init_method_networks
from sida_core.performance import prepare_network
from sida_core.importer import ImportError_, build_network, cached_import, is_importable
from sida_core.methods import get_method
from sida_core.teacher import train_teacher


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was requested but no CUDA device is available")
    return torch.device(name)


def cache_dir() -> Path:
    """Where trained-once artefacts live (built-in teacher, digit classifier): $SIDA_CACHE or ~/.cache/sida."""
    return Path(os.environ.get("SIDA_CACHE", Path.home() / ".cache" / "sida")).expanduser()


def network_spec(cfg, dataset: Optional[ImageDataset] = None) -> dict:
    """The arguments of :func:`build_denoiser` for the teacher described by ``cfg.teacher.network`` on ``dataset``
    (default: the shape ``cfg.data`` declares). A teacher imported from a ``.pkl`` has its own: see
    :func:`teacher_spec`."""
    net, d = cfg.teacher.network, dataset or cfg.data
    spec = {"arch": net.arch, "img_resolution": d.resolution, "img_channels": d.channels,
            "label_dim": d.label_dim, "kwargs": dict(net.kwargs)}
    if net.precond != "edm" or net.precond_kwargs:
        spec.update(precond=net.precond, precond_kwargs=dict(net.precond_kwargs))
    return spec


def build_from_spec(spec: dict) -> nn.Module:
    return build_network(spec)


def teacher_spec(teacher_checkpoint) -> dict:
    """The network spec of a teacher checkpoint folder: what G_theta and f_psi (copies of f_phi) are built from."""
    return ckpt.verify_checkpoint(teacher_checkpoint, hashes=False)["network"]


def check_teacher_fits(spec: dict, dataset: ImageDataset, where: str) -> None:
    """The teacher's input shape and classes must be the data's (one line naming both)."""
    t = (spec["img_resolution"], spec["img_channels"], spec.get("label_dim", 0))
    d = (dataset.resolution, dataset.channels, dataset.label_dim)
    if t != d:
        fmt = lambda r, c, k: f"{r}x{r}x{c}, " + (f"{k} classes" if k else "unconditional")  # noqa: E731
        raise ImportError_(f"teacher {where} takes {fmt(*t)} but the data is {fmt(*d)} (data.resolution / "
                           f"data.channels / data.cond + data.num_classes)")


def load_network(path, key: str, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a denoiser from a checkpoint directory and load ``state[key]`` into it."""
    state, manifest = ckpt.load_checkpoint(path, map_location="cpu")
    if key not in state:
        raise ckpt.CheckpointError(f"{path}: checkpoint of kind {manifest.get('kind')!r} has no {key!r} weights "
                                   f"(has: {', '.join(sorted(state))})")
    net = build_from_spec(manifest["network"])
    net.load_state_dict(state[key])
    return net.to(device), manifest


def imported_teacher_path(cfg, dataset: ImageDataset, log: Callable[[str], None] = print) -> Path:
    """``teacher.path`` as a project checkpoint folder: itself, or its cached import (see sida_core.importer)."""
    src = Path(cfg.teacher.path).expanduser()
    if not is_importable(src):
        return src
    # A pickle brings its architecture (teacher.network left at its default); a state dict needs one.
    explicit = cfg.teacher.network.model_dump() != type(cfg.teacher.network)().model_dump()
    spec = network_spec(cfg, dataset) if explicit or src.suffix.lower() != ".pkl" else None
    path = cached_import(src, cache_dir(), spec=spec, key=cfg.teacher.key)
    log(f"teacher: {src} imported as {path}")
    return path


# Threads of the built-in teacher's CPU training: fixed (the bits depend on it), 2 because that trains the digits
# teacher 1.45x faster than 1 on this project's 2-core machine (461 vs 666 img/s); part of the cache key's format.
TEACHER_CPU_THREADS = 2


def builtin_teacher_path(cfg) -> Path:
    """Cache location of the built-in teacher, keyed by everything that determines its weights."""
    recipe = {"teacher": cfg.teacher.model_dump(mode="json", exclude={"path", "sampler_steps"}),
              "data": cfg.data.model_dump(mode="json"), "format": 2}  # 2: trained on TEACHER_CPU_THREADS threads
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"teacher-{cfg.data.kind}-{key}"


def get_teacher(cfg, train_set: ImageDataset, device, log: Callable[[str], None] = print,
                progress_factory=None) -> tuple[nn.Module, Path]:
    """The frozen teacher f_phi and its checkpoint folder: ``teacher.path`` (a project checkpoint, or a published
    ``.pkl`` / ``.pt`` / ``.safetensors`` imported safely once and cached by content), else the built-in one
    (trained once, then cached)."""
    if cfg.teacher.path:
        path = imported_teacher_path(cfg, train_set, log)
        net, manifest = load_network(path, "net", device)
        check_teacher_fits(manifest["network"], train_set, cfg.teacher.path)
        return net.eval().requires_grad_(False), path
    path = builtin_teacher_path(cfg)
    if path.exists():
        try:
            net, _ = load_network(path, "net", device)
            log(f"teacher: reusing {path}")
            return net.eval().requires_grad_(False), path
        except ckpt.CheckpointError as exc:
            log(f"teacher: cached checkpoint unusable ({exc}); training again")
    t = cfg.teacher.train
    spec = network_spec(cfg, train_set)
    log(f"teacher: training {spec['arch']} {spec['kwargs']} for {t.kimg} kimg on {len(train_set)} images -> {path}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)  # weight init is part of the recipe the cache key stands for
        net = build_from_spec(spec)
    bar = progress_factory(kimg_to_nimg(t.kimg), "teacher") if progress_factory else None
    t0 = time.time()
    # A fixed CPU thread count whatever the process was given: the cached teacher must not depend on the machine.
    with cpu_threads(TEACHER_CPU_THREADS) if torch.device(device).type == "cpu" else contextlib.nullcontext():
        ema = train_teacher(net, train_set.images, train_set.one_hot(slice(None)) if train_set.label_dim else None,
                            kimg=t.kimg, batch=t.batch, lr=t.lr, lr_rampup_kimg=t.lr_rampup_kimg,
                            ema_halflife_kimg=t.ema_halflife_kimg, p_mean=cfg.teacher.p_mean, p_std=cfg.teacher.p_std,
                            seed=t.seed, device=device, progress=(lambda n, loss: bar.update(n)) if bar else None)
    if bar:
        bar.close()
    ckpt.save_checkpoint(path, {"net": ema.state_dict()}, kind="teacher", kimg=t.kimg, cur_nimg=kimg_to_nimg(t.kimg),
                         config=cfg.model_dump(mode="json"), network=spec,
                         extra={"train_seconds": round(time.time() - t0, 1)})
    return ema.eval().requires_grad_(False), path


def build_distiller(cfg, teacher: nn.Module, train_set: ImageDataset, device, *, rank: int = 0, world_size: int = 1,
                    wrap: Optional[Callable[[nn.Module], nn.Module]] = None, init_generator=None) -> Distiller:
    """Initialise G_theta and f_psi (SPEC: theta, psi <- phi; SiD²A: theta <- SiD generator) and the Distiller.

    ``wrap`` (e.g. DDP) is applied to the trainable nets; the Ray workers use it, the engine does not.
    ``init_generator``: a local checkpoint folder to take SiD²A's theta from instead of ``cfg.init_generator``
    (the Ray path passes the run's own fetched copy; ``cfg.init_generator`` may then be a remote URI).
    """
    sid_generator = None
    if get_method(cfg.method).starts_from_generator:
        sid_generator, _ = load_network(init_generator or cfg.init_generator, "generator_ema", device)
    hyper = hyper_from_config(cfg)
    generator, fake_score = init_method_networks(hyper, teacher, sid_generator)
    generator, fake_score = generator.to(device), fake_score.to(device)
    for net in (teacher, generator, fake_score):  # memory format etc. before DDP wraps them (it keeps grad layouts)
        prepare_network(net, hyper.performance)
    if wrap is not None:
        generator, fake_score = wrap(generator), wrap(fake_score)
    labels = train_set.labels if train_set.label_dim else None  # class ids; one-hot per batch (N x classes floats
    return Distiller(hyper, teacher, generator, fake_score, train_set.images, labels,  # would not fit at ImageNet scale)
                     rank=rank, world_size=world_size, device=device, real_encode=train_set.real_encode)


def save_distill_checkpoint(distiller: Distiller, folder: Path, cfg, spec: dict, *, config: Optional[dict] = None,
                            **extra) -> Path:
    """Write the Distiller's state as ``folder/ckpt-<cur_nimg>``; ``config``: the JSON to record (default: cfg's)."""
    path = Path(folder) / ckpt.checkpoint_name(distiller.cur_nimg)
    return ckpt.save_checkpoint(path, distiller.state_dict(), kind="distill", kimg=distiller.cur_nimg / 1000,
                                cur_nimg=distiller.cur_nimg, config=config or cfg.model_dump(mode="json"), network=spec,
                                extra={"method": cfg.method, "step": distiller.step_idx,
                                       "rng": "derived from (seed, step, global micro-batch, purpose); no state to save",
                                       **extra})


def check_network_spec(spec: dict) -> None:
    """Build the network ``spec`` describes on the meta device (no memory, no data) and push a two-image meta
    batch through it: a backbone keyword that does not exist, or a resolution the U-Net cannot halve and
    restore, raises ValueError here instead of a traceback once data and workers are up."""
    r, c, label_dim = spec["img_resolution"], spec["img_channels"], spec.get("label_dim", 0)
    try:
        with torch.device("meta"):
            net = build_from_spec(spec)
            labels = torch.zeros(2, label_dim) if label_dim else None
            net(torch.zeros(2, c, r, r), torch.ones(2), labels)
    except Exception as exc:  # noqa: BLE001 -- any failure here is a config problem: say which network and why
        what = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ValueError(f"{spec['arch']} network with {dict(spec.get('kwargs') or {})} on {r}x{r}x{c} images "
                         f"cannot be built or run: {what}") from None
