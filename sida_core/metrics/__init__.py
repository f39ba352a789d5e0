"""Sample-quality metrics: Fréchet distances in a feature space, computed through clean-fid's code path."""
from .digits_classifier import (DigitsFeatureExtractor, digits_feature_space, digits_feature_stats, fd_digits,
                                load_digits_classifier)
from .frechet import (FeatureSpace, extract_features, fd_from_features, frechet_distance,
                      frechet_distance_from_tensors, load_stats, save_stats, stats_from_features)

__all__ = ["DigitsFeatureExtractor", "FeatureSpace", "digits_feature_space", "digits_feature_stats",
           "extract_features", "fd_digits", "fd_from_features", "frechet_distance", "frechet_distance_from_tensors",
           "load_digits_classifier", "load_stats", "save_stats", "stats_from_features"]
