"""One-step samples by seed (``sida generate``), with randomness assigned as in EDM's generate.py (no Ray).

Each image has its own seed: its latent z, then (for ``random`` class labels) its class, come from a
``torch.Generator`` seeded with that seed. The generators run on the CPU whatever the device, so an image
depends only on its seed, not on the batch size, the batch it falls in or the device (up to the network's own
arithmetic). Labels: ``"random"`` (drawn per seed, after z), a fixed class index K, or ``None`` (no label: a
conditional net then gets zeros, as :class:`EDMPrecond` does). Images become uint8 as EDM writes them:
(x * 127.5 + 128) clipped to [0, 255] and truncated.
"""
from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union, cast

import numpy as np
import torch

from sida_core.export import ExportError
from sida_core.losses import generate

MAX_SEED = 2 ** 32 - 1  # EDM takes seeds modulo 2^32; larger ones are refused instead of aliased
ClassLabels = Union[str, int, None]  # "random", a class index, or None
_SEEDS_RE = re.compile(r"^\d+(-\d+)?$")


def parse_seeds(text: str) -> list[int]:
    """``"0-49999"`` or ``"0,5,7-9"`` (inclusive ranges) -> the seeds in the order given; no duplicates."""
    seeds: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not _SEEDS_RE.match(part):
            raise ExportError(f"--seeds: expected a list such as 0-49999 or 0,5,7-9 (integers and inclusive ranges "
                              f"A-B), got {text!r}")
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b or a)
        if lo > hi or hi > MAX_SEED:
            raise ExportError(f"--seeds: range {part} must run upwards within 0-{MAX_SEED}")
        seeds.extend(range(lo, hi + 1))
    if len(set(seeds)) != len(seeds):
        raise ExportError(f"--seeds: {text!r} names some seed twice (each seed is one image)")
    return seeds


def resolve_seeds(num: Optional[int], seeds: Optional[str]) -> list[int]:
    """The seeds of ``--num N`` (0..N-1) and/or ``--seeds`` (both: they must agree on the count)."""
    if num is not None and num < 1:
        raise ExportError(f"--num: expected a positive number of images, got {num}")
    if seeds is None:
        if num is None:
            raise ExportError("--num / --seeds: say how many images: --num N (seeds 0..N-1) or --seeds 0-49999")
        return list(range(num))
    out = parse_seeds(seeds)
    if num is not None and num != len(out):
        raise ExportError(f"--num {num} disagrees with --seeds {seeds} ({len(out)} seeds); give one of them, or both "
                          f"with the same count")
    return out


def parse_class_labels(text: str, label_dim: int) -> ClassLabels:
    """``--class-labels``: ``random`` | ``none`` | class index K in [0, label_dim) (conditional generators only)."""
    t = str(text).strip().lower()
    if t in ("random", "none"):
        return None if t == "none" else "random"
    if not t.isdigit():
        raise ExportError(f"--class-labels: expected random, none or a class index, got {text!r}")
    if not label_dim:
        raise ExportError(f"--class-labels {text}: the generator is unconditional (label_dim 0); use random or none")
    if int(t) >= label_dim:
        raise ExportError(f"--class-labels: expected a class index in 0..{label_dim - 1}, got {text}")
    return int(t)


def seed_inputs(seeds: Sequence[int], img_shape: tuple[int, int, int], label_dim: int = 0,
                class_labels: ClassLabels = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """(z of shape (N, *img_shape), class index per image, -1 for none) for ``seeds``, on the CPU."""
    z = torch.empty(len(seeds), *img_shape)
    labels = torch.full((len(seeds),), -1, dtype=torch.int64)
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        z[i] = torch.randn(img_shape, generator=g)
        if label_dim and class_labels == "random":
            labels[i] = torch.randint(label_dim, (), generator=g)
        elif label_dim and class_labels is not None:
            labels[i] = int(class_labels)
    return z, labels


@torch.no_grad()
def sample_seeds(net: torch.nn.Module, seeds: Sequence[int], *, sigma_init: float, batch: int = 256,
                 class_labels: ClassLabels = "random", device="cpu") -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(seeds, x_g = G(sigma_init z, c) as float32 on the CPU, class indices) batch by batch, in seed order."""
    shape = cast(tuple[int, int, int], (net.img_channels, net.img_resolution, net.img_resolution))
    for k in range(0, len(seeds), batch):
        chunk = list(seeds[k: k + batch])
        z, labels = seed_inputs(chunk, shape, cast(int, net.label_dim), class_labels)
        c = torch.nn.functional.one_hot(labels, cast(int, net.label_dim)).float().to(device) if (labels >= 0).any() else None
        yield chunk, generate(net, z.to(device), c, sigma_init).float().cpu(), labels


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as EDM's generate.py converts."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_png(images: torch.Tensor, cols: Optional[int] = None, scale: Optional[int] = None, pad: int = 1) -> bytes:
    """``images`` (N, C, H, W) in [-1, 1] as one PNG grid (bytes; white padding): about square, small images
    enlarged (nearest) to at least 32 px per tile so that 8x8 digits stay visible."""
    from PIL import Image

    x = to_uint8(images.detach().float().cpu())
    n, h, w, c = x.shape
    cols = cols or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    scale = scale or max(1, 32 // max(h, w))
    th, tw = h * scale + pad, w * scale + pad
    grid = np.full((rows * th + pad, cols * tw + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * th: pad + r * th + h * scale, pad + k * tw: pad + k * tw + w * scale] = \
            x[i].repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images: torch.Tensor, path, cols: Optional[int] = None, scale: Optional[int] = None,
              pad: int = 1) -> Path:
    """Write :func:`grid_png` of ``images`` to the local file ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grid_png(images, cols, scale, pad))
    return path


GALLERY_SEED0 = 0  # a gallery's images are seeds 0 .. n-1: the same for every checkpoint of every run
GALLERY_TILE = 128  # larger images (EDM2's 512 px decodes) are area-downscaled to this many pixels on their long side


def gallery_png(generator: torch.nn.Module, num: int, *, sigma_init: float, device="cpu",
                decode=None) -> bytes:
    """The fixed-seed sample grid of a one-step generator: seeds GALLERY_SEED0 .. +num-1 (random class labels
    by seed), so that galleries of different checkpoints can be compared by eye. ``decode``: latents -> images."""
    seeds = range(GALLERY_SEED0, GALLERY_SEED0 + num)
    parts = [x for _, x, _ in sample_seeds(generator, seeds, sigma_init=sigma_init, device=device)]
    images = torch.cat(parts)
    if decode is not None:
        images = decode(images).float().cpu()
    return grid_png(fit_tiles(images, GALLERY_TILE))


def fit_tiles(images: torch.Tensor, tile: int) -> torch.Tensor:
    """``images`` (N, C, H, W) area-downscaled so that the long side is at most ``tile`` pixels (aspect kept): a
    64-image gallery of 512 px samples is ~1 MB instead of tens of MB. Smaller images are returned as they are."""
    h, w = images.shape[-2:]
    if max(h, w) <= tile:
        return images
    f = tile / max(h, w)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    return torch.nn.functional.interpolate(images.float(), size=size, mode="area")
