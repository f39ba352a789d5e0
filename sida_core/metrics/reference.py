"""Reference statistics (mu, sigma) of a real dataset in a feature space, with the manifest that says which.

Pure: no storage policy here (``store/reference.py`` writes and reads them; ``sida fid-stats`` makes
them). The statistics travel as an ``.npz`` with ``mu`` and ``sigma`` (the layout clean-fid and EDM use)
and the manifest as JSON beside it. A bare ``.npz`` without a manifest (EDM publishes CIFAR-10, ImageNet 64,
FFHQ and AFHQ-v2 statistics that way) is accepted for any feature space of its dimension, with a one-time
warning: its extractor and protocol are unknown (EDM's were the TF-ported Inception in ``legacy_tensorflow``;
``sida reference import`` stores such a file with a manifest that says so, and scoring then checks it).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np
import torch

from .frechet import FeatureSpace, Stats

FORMAT = "sida-fid-reference"
VERSION = 1
_WARNED: set[str] = set()


class ReferenceMismatch(ValueError):
    """Reference statistics were taken in another feature space / resolution than the one scoring uses."""


@dataclass
class ReferenceStats:
    """Gaussian fit of a dataset's features: ``mu`` (D,), ``sigma`` (D, D) in float64, and the manifest."""

    mu: np.ndarray
    sigma: np.ndarray
    manifest: dict[str, Any] = field(default_factory=dict)
    features: Optional[np.ndarray] = None  # (N, D) float16, kept when asked (KID, precision / recall need them)

    def __post_init__(self):
        self.mu = np.asarray(self.mu, np.float64)
        self.sigma = np.asarray(self.sigma, np.float64)
        d = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if d < 1 or self.sigma.shape != (d, d):
            raise ValueError(f"reference statistics: expected mu (D,) and sigma (D, D), got mu {self.mu.shape} "
                             f"and sigma {self.sigma.shape}")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError("reference statistics contain NaN or inf")

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def stats(self) -> Stats:
        """(mu, sigma), as :meth:`FeatureSpace.fd` takes them."""
        return self.mu, self.sigma

    def to_npz_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma)
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes, manifest: Optional[dict] = None, *, source: str = "") -> "ReferenceStats":
        """Read ``mu``/``sigma``; without a manifest (a bare user / EDM file) one is made: feature_dim only."""
        where = source or "reference .npz"
        if not data.startswith((b"PK", b"\x93NUMPY")):  # np.load would take anything else for a pickle
            raise ValueError(f"{where}: not an .npz file; expected an .npz with keys 'mu' and 'sigma'")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                if not hasattr(z, "files") or not {"mu", "sigma"} <= set(z.files):
                    keys = sorted(z.files) if hasattr(z, "files") else "a single array"
                    raise ValueError(f"{where}: expected an .npz with keys 'mu' and 'sigma', found {keys}")
                mu, sigma = z["mu"], z["sigma"]
        except (OSError, EOFError) as e:
            raise ValueError(f"{where}: not a readable .npz file ({e})") from None
        if manifest is None:
            manifest = dict(format="bare-npz", source=source, extractor_id=None, mode=None, resolution=None,
                            feature_dim=int(np.shape(mu)[0]) if np.ndim(mu) == 1 else None)
        try:
            ref = cls(mu, sigma, dict(manifest))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if manifest.get("feature_dim") not in (None, ref.feature_dim):
            raise ValueError(f"{where}: manifest says feature_dim {manifest['feature_dim']}, mu has {ref.feature_dim}")
        return ref


def dataset_sha256(images: torch.Tensor) -> str:
    """sha256 of the images exactly as given to scoring: float32, C-order (N, C, H, W) bytes (hashed in chunks,
    so a prepared dataset read on demand is never materialised)."""
    h = hashlib.sha256()
    for i in range(0, int(images.shape[0]), 4096):
        h.update(images[i:i + 4096].detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_manifest(*, metric: str, extractor_id: str, mode: str, feature_dim: int, num_images: Optional[int],
                       resolution: int, channels: int, dataset: dict, **extra) -> dict:
    """The manifest of reference statistics (what :func:`check_compatible` reads): the one place its fields are
    named, for statistics computed here and for published ones imported (``sida reference import``)."""
    return dict(format=FORMAT, version=VERSION, metric=metric, extractor_id=extractor_id, mode=mode,
                feature_dim=int(feature_dim), num_images=num_images, resolution=int(resolution), channels=int(channels),
                dataset=dataset, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra)


def compute_reference(images: torch.Tensor, space: FeatureSpace, *, dataset_desc: dict, device="cpu",
                      progress: bool = False, keep_features: bool = False) -> ReferenceStats:
    """Statistics of ``images`` (N, C, R, R) in [-1, 1] in ``space`` (its own clean-fid path), with a manifest.

    ``progress``: a tqdm bar over images (on stderr), fed by the extractor as clean-fid calls it;
    ``keep_features``: also keep the (N, D) features, as float16 (what KID and precision / recall compare against).
    """
    import importlib.metadata as md

    n = int(images.shape[0])
    extractor, bar = space.extractor, None
    if progress:
        from dataclasses import replace

        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"{space.name} features", unit="img")
        inner = space.extractor

        def extractor(batch):
            out = inner(batch)
            bar.update(min(int(batch.shape[0]), n - bar.n))
            return out
        space = replace(space, extractor=extractor)
    try:
        feats = space.features(images, device)
    finally:
        if bar is not None:
            bar.close()
    mu, sigma = np.mean(feats.astype(np.float64), axis=0), np.cov(feats.astype(np.float64), rowvar=False)
    manifest = reference_manifest(metric=space.name, extractor_id=space.extractor_id, mode=space.mode,
                                  feature_dim=int(feats.shape[1]), num_images=n, resolution=int(images.shape[-1]),
                                  channels=int(images.shape[1]), dataset=dict(dataset_desc),
                                  dataset_sha256=dataset_sha256(images), clean_fid_version=md.version("clean-fid"))
    return ReferenceStats(mu, sigma, manifest, feats.astype(np.float16) if keep_features else None)


def check_compatible(manifest: dict, space: FeatureSpace, resolution: Optional[int] = None) -> None:
    """Raise :class:`ReferenceMismatch` (one line, the field and both values) unless statistics described by
    ``manifest`` can score images of ``resolution`` in ``space``. A bare ``.npz`` (no extractor recorded)
    only has to match the feature dimension, and warns once that its extractor and mode are unknown."""
    src = manifest.get("source") or "reference statistics"
    dim = manifest.get("feature_dim")
    if manifest.get("extractor_id") is not None:
        for name, key, ours in (("extractor", "extractor_id", space.extractor_id), ("mode", "mode", space.mode)):
            if manifest.get(key) != ours:
                raise ReferenceMismatch(f"{src}: {name} {manifest.get(key)!r} does not match the scorer's {ours!r} "
                                        f"(recompute with `sida fid-stats ... --metric {space.name}`)")
    if space.feature_dim and dim is not None and int(dim) != space.feature_dim:
        raise ReferenceMismatch(f"{src}: feature dim {dim} does not match {space.name}'s {space.feature_dim}")
    theirs = manifest.get("resolution")
    if resolution is not None and theirs is not None and int(theirs) != int(resolution):
        raise ReferenceMismatch(f"{src}: resolution {theirs} does not match the scored images' {resolution} "
                                "(recompute with `sida fid-stats ... --resolution` equal to data.resolution)")
    if manifest.get("extractor_id") is None and src not in _WARNED:
        _WARNED.add(src)
        warnings.warn(f"{src}: bare mu/sigma without a manifest; its feature extractor and FID protocol are "
                      f"unknown; scoring in {space.name} ({space.extractor_id}, protocol {space.mode}) anyway. EDM's "
                      f"and EDM2's statistics are legacy_tensorflow: `sida reference import` records that, and the "
                      f"scorer then checks it", UserWarning, stacklevel=2)
