"""Sample-quality metrics: Fréchet distances in a feature space, computed through clean-fid's code path; Inception
Score, KID and precision / recall as functions of features (:mod:`.distribution_metrics`)."""
from typing import Optional

from .digits_classifier import (DigitsFeatureExtractor, digits_feature_space, digits_feature_stats, fd_digits,
                                load_digits_classifier)
from .distribution_metrics import inception_score, kernel_inception_distance, precision_recall
from .frechet import (FeatureSpace, extract_features, fd_from_features, frechet_distance,
                      frechet_distance_from_tensors, load_stats, save_stats, stats_from_features)

METRICS = ("fd_digits", "fid_inception", "fd_dinov2")


CLEAN_ONLY = {"fd_digits": "", "fd_dinov2": " (EDM2's resize happens inside the extractor)"}


def check_protocol(name: str, protocol: str) -> None:
    """Raise ValueError unless feature space ``name`` is defined in ``protocol`` (only the Inception spaces have a
    ``legacy_tensorflow`` mode): callers check before any image is read."""
    if name in CLEAN_ONLY and protocol != "clean":
        raise ValueError(f"metric.protocol {protocol!r}: {name} is defined in 'clean' mode only{CLEAN_ONLY[name]}")


def feature_space(name: str, device="cpu", protocol: str = "clean", weights: Optional[str] = None) -> FeatureSpace:
    """The feature space of metric ``name`` (one of :data:`METRICS`) in ``protocol`` (clean-fid's resizing mode:
    ``clean``, or ``legacy_tensorflow`` for ``fid_inception``): the one place a metric name is resolved.
    ``weights``: for ``fd_dinov2``, the local path of ``dinov2_vitl14_pretrain.pth`` (``metric.dinov2``)."""
    check_protocol(name, protocol)
    if name == "fd_digits":
        return digits_feature_space()
    if name == "fid_inception":
        from .inception import inception_feature_space

        return inception_feature_space(device=device, protocol=protocol)
    if name == "inception_probs":  # (N, 2048 + 1008) rows: pool features, class probabilities (Inception Score)
        from .inception import inception_feature_space

        return inception_feature_space(device=device, protocol=protocol, with_probs=True)
    if name == "fd_dinov2":
        from .dinov2 import dinov2_feature_space

        return dinov2_feature_space(weights, device=device)
    raise ValueError(f"unknown metric {name!r}; expected one of: {', '.join(METRICS)}")


__all__ = ["DigitsFeatureExtractor", "FeatureSpace", "METRICS", "digits_feature_space", "digits_feature_stats",
           "extract_features", "fd_digits", "fd_from_features", "feature_space", "frechet_distance",
           "frechet_distance_from_tensors", "inception_score", "kernel_inception_distance", "load_digits_classifier",
           "load_stats", "precision_recall", "save_stats", "stats_from_features"]
