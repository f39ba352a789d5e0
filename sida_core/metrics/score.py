"""Scoring a one-step generator (or the teacher's own samples): N images from fixed seeds, features batch by batch,
Fréchet distance and the other metrics. What produces the images is an :data:`ImageSource`.

Randomness: image ``i`` belongs to chunk ``i // CHUNK``; chunk ``k`` draws its latents (and labels) from a
generator seeded with ``(seed << 20) + k``. So the images for a seed do not depend on the batch size or
the device, and two processes (a scorer actor and ``sida evaluate``) generate the same images.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ..losses import generate
from .frechet import FeatureSpace, GaussianReference, Stats, stats_from_features

CHUNK = 256


def _chunks(n: int, seed: int, img_shape: tuple[int, int, int], label_dim: int, start: int = 0,
            total: Optional[int] = None):
    """(z, c) of images start..start+n-1 of a score of ``total`` images (default start + n): each chunk drawn whole
    exactly as a one-pass score of ``total`` images draws it (the last one has total % CHUNK images), then cut to
    the range, so any split of a score into ranges concatenates to exactly the images of one pass."""
    end, total = start + n, start + n if total is None else total
    if end > total:
        raise ValueError(f"images {start}..{end - 1} lie outside a score of {total} images")
    for k in range(start // CHUNK, -(-end // CHUNK)):
        m = min(CHUNK, total - k * CHUNK)
        g = torch.Generator().manual_seed((int(seed) << 20) + k)
        z = torch.randn((m, *img_shape), generator=g)
        c = torch.nn.functional.one_hot(torch.randint(label_dim, (m,), generator=g), label_dim).float() \
            if label_dim else torch.zeros(m, 0)
        lo, hi = max(start - k * CHUNK, 0), min(end - k * CHUNK, m)
        yield z[lo:hi], c[lo:hi]


def generator_inputs(n: int, seed: int, img_shape: tuple[int, int, int], label_dim: int = 0,
                     batch_size: int = CHUNK, start: int = 0,
                     total: Optional[int] = None) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Batches (z, one-hot labels or None) on the CPU for images start..start+n-1 of a ``total``-image score of
    ``seed`` (default: images 0..n-1 of an n-image score; see the module docstring)."""
    if n < 1:
        raise ValueError(f"num_images must be >= 1, got {n}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    z_buf, c_buf = torch.empty(0, *img_shape), torch.empty(0, label_dim)
    for z, c in _chunks(n, seed, img_shape, label_dim, start, total):
        z_buf, c_buf = torch.cat([z_buf, z]), torch.cat([c_buf, c])
        while len(z_buf) >= batch_size:
            yield z_buf[:batch_size], (c_buf[:batch_size] if label_dim else None)
            z_buf, c_buf = z_buf[batch_size:], c_buf[batch_size:]
    if len(z_buf):
        yield z_buf, (c_buf if label_dim else None)


ImageSource = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
"""What a score samples: (z ~ N(0, I) on the device, one-hot labels or None) -> a batch of images (or latents,
mapped to images by ``decode``). :func:`one_step_source` is the generator's, :func:`heun_source` the teacher's."""


def one_step_source(generator: torch.nn.Module, sigma_init: float) -> ImageSource:
    """One-step samples x_g = G(sigma_init z, c)."""
    return lambda z, c: generate(generator, z, c, sigma_init)


def heun_source(teacher: torch.nn.Module, num_steps: int) -> ImageSource:
    """The teacher's own samples: EDM's deterministic Heun sampler from x_0 = sigma_max z (2 num_steps - 1 NFE)."""
    from ..teacher import heun_sample

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return lambda z, c: heun_sample(teacher, z, c, num_steps=num_steps)


@torch.no_grad()
def source_images(source: ImageSource, n: int, *, seed: int, img_shape: tuple[int, int, int], label_dim: int = 0,
                  batch_size: int = CHUNK, device="cpu", start: int = 0,
                  total: Optional[int] = None) -> Iterator[torch.Tensor]:
    """``source``'s images start..start+n-1 of a ``total``-image score of ``seed`` (default: images 0..n-1 of an
    n-image score; latents and labels of :func:`generator_inputs`), batch by batch, as float32 on the CPU."""
    for z, c in generator_inputs(n, seed, img_shape, label_dim, batch_size, start, total):
        yield source(z.to(device), None if c is None else c.to(device)).float().cpu()


def generate_images(generator: torch.nn.Module, n: int, *, seed: int, sigma_init: float,
                    img_shape: tuple[int, int, int], label_dim: int = 0, batch_size: int = CHUNK,
                    device="cpu", start: int = 0, total: Optional[int] = None) -> Iterator[torch.Tensor]:
    """One-step samples x_g = G(sigma_init z, c) in [-1, 1]-ish of images start..start+n-1, batch by batch, on the
    CPU."""
    return source_images(one_step_source(generator, sigma_init), n, seed=seed, img_shape=img_shape,
                         label_dim=label_dim, batch_size=batch_size, device=device, start=start, total=total)


def image_features(source: ImageSource, spaces: dict[str, FeatureSpace], *, num_images: int, seed: int,
                   img_shape: tuple[int, int, int], label_dim: int = 0, batch_size: int = CHUNK, device="cpu",
                   decode: Optional[Callable] = None, start: int = 0,
                   total: Optional[int] = None) -> dict[str, np.ndarray]:
    """{key: (num_images, D) features in ``spaces[key]``} of ONE set of ``source``'s samples (each batch sampled
    once and handed to every space): images start..start+num_images-1 of a ``total``-image score of ``seed``
    (several scorers split a large score by ranges; their features concatenate to one pass's). ``decode`` maps each
    batch to images first (latent-space networks: :class:`sida_core.vae.LatentDecoder`)."""
    feats: dict[str, list[np.ndarray]] = {key: [] for key in spaces}
    for x in source_images(source, num_images, seed=seed, img_shape=img_shape, label_dim=label_dim,
                           batch_size=batch_size, device=device, start=start, total=total):
        images = decode(x) if decode is not None else x
        for key, space in spaces.items():
            feats[key].append(space.features(images, device))
    return {key: np.concatenate(f) for key, f in feats.items()}


@contextmanager
def _eval_mode(net: torch.nn.Module):
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def generator_features(generator: torch.nn.Module, spaces: dict[str, FeatureSpace], *, num_images: int, seed: int,
                       sigma_init: float, img_shape: tuple[int, int, int], label_dim: int = 0,
                       batch_size: int = CHUNK, device="cpu", decode: Optional[Callable] = None,
                       start: int = 0, total: Optional[int] = None) -> dict[str, np.ndarray]:
    """:func:`image_features` of the one-step generator's samples."""
    with _eval_mode(generator):
        return image_features(one_step_source(generator, sigma_init), spaces, num_images=num_images, seed=seed,
                              img_shape=img_shape, label_dim=label_dim, batch_size=batch_size, device=device,
                              decode=decode, start=start, total=total)


def teacher_features(teacher: torch.nn.Module, spaces: dict[str, FeatureSpace], *, num_images: int, seed: int,
                     num_steps: int, img_shape: tuple[int, int, int], label_dim: int = 0, batch_size: int = CHUNK,
                     device="cpu", decode: Optional[Callable] = None) -> dict[str, np.ndarray]:
    """:func:`image_features` of the teacher's Heun samples (``num_steps`` steps) from the same latents and labels
    as the generator's images of ``seed``: the teacher's score under the generator's protocol."""
    with _eval_mode(teacher):
        return image_features(heun_source(teacher, num_steps), spaces, num_images=num_images, seed=seed,
                              img_shape=img_shape, label_dim=label_dim, batch_size=batch_size, device=device,
                              decode=decode)


def score_generator(generator: torch.nn.Module, space: FeatureSpace, reference: Stats | GaussianReference, *,
                    num_images: int, **kwargs) -> float:
    """Fréchet distance in ``space`` between ``num_images`` one-step samples and the ``reference`` (mu, sigma),
    best given as a :class:`GaussianReference` when several generators are scored against it; ``kwargs`` as for
    :func:`generator_features`."""
    if not isinstance(reference, GaussianReference):
        reference = GaussianReference.from_stats(*reference)
    feats = generator_features(generator, {space.name: space}, num_images=num_images, **kwargs)[space.name]
    return reference.fd(*stats_from_features(feats))
