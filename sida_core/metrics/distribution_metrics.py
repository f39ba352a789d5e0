"""Inception Score, Kernel Inception Distance and improved precision / recall as pure functions of features.

Inputs are what a feature space already produced (class probabilities, (N, D) features); nothing here loads a
network or draws images, so one set of generated images can feed every metric. Each function follows the
estimator of NVIDIA's StyleGAN3 metrics (the ones EDM-family papers report); where a choice was needed, the
docstring says which.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from scipy.special import xlogy

ROW_SUM_TOL = 1e-3  # softmax outputs in float16/float32 sum to 1 far closer than this


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016, "Improved techniques for training GANs"), (mean, std) over splits.

    ``probs`` (N, C) are p(y|x) per image. They are cut into ``splits`` contiguous parts, part ``i`` being rows
    ``i*N//splits`` to ``(i+1)*N//splits`` (StyleGAN3's split); per part, with p(y) the part's mean row,
    IS = exp( mean_x KL(p(y|x) || p(y)) ) = exp( mean_x sum_y p(y|x) (log p(y|x) - log p(y)) ), 0 log 0 = 0.
    Returns the mean and the population standard deviation (ddof 0, as numpy's default there) of the parts'
    scores. Bounds: 1 <= IS <= C.
    """
    p = np.asarray(probs, dtype=np.float64)
    problem = None
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        problem = f"expected an (N, C) array, got shape {p.shape}"
    elif not isinstance(splits, (int, np.integer)) or splits < 1 or p.shape[0] < splits:
        problem = f"need 1 <= splits <= N, got splits={splits!r} for N={p.shape[0]}"
    elif not np.isfinite(p).all() or (p < 0).any():
        problem = "probabilities must be finite and non-negative"
    else:
        worst = float(np.abs(p.sum(axis=1) - 1.0).max())
        if worst > ROW_SUM_TOL:
            problem = f"rows must sum to 1 (within {ROW_SUM_TOL}); worst row is off by {worst:.3g} (logits, not softmax?)"
    if problem is not None:
        raise ValueError(f"inception_score: {problem}")
    n = p.shape[0]
    scores = []
    for i in range(splits):
        part = p[i * n // splits: (i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, p_y)).sum(axis=1)  # p_y > 0 wherever part > 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _cubic_kernel(a: np.ndarray, b: np.ndarray, d: int) -> np.ndarray:
    """(a·b / d + 1)^3 for all row pairs (cubed by products: numpy's float ** 3 is ~10x slower)."""
    k = a @ b.T / d + 1.0
    return k * k * k


def kernel_inception_distance(feats_gen: np.ndarray, feats_ref: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of MMD²
    under the cubic polynomial kernel k(x, y) = (x·y / d + 1)^3, averaged over ``num_subsets`` random subsets.

    As StyleGAN3's ``kernel_inception_distance.py`` and clean-fid's ``kernel_distance`` estimate it: per subset,
    m = min(N_gen, N_ref, max_subset_size) rows of each set drawn without replacement (generated first, then
    reference, from one ``numpy.random.default_rng(seed)``), and
    MMD²_u = [sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m².
    The result is the mean over subsets (can be slightly negative when the sets match). Computed in float64; cost
    3 num_subsets m² d multiply-adds (100 subsets of 1000 at d = 2048: about 26 s on this project's 2-core CPU).
    """
    x_all, y_all = np.asarray(feats_gen), np.asarray(feats_ref)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"kernel_inception_distance: need two (N, D) arrays with the same D, "
                         f"got {x_all.shape} and {y_all.shape}")
    m = min(x_all.shape[0], y_all.shape[0], max_subset_size)
    if m < 2 or num_subsets < 1:
        raise ValueError(f"kernel_inception_distance: need subsets of at least 2 rows and num_subsets >= 1, "
                         f"got m={m}, num_subsets={num_subsets}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)].astype(np.float64)
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)].astype(np.float64)
        k_xx, k_yy, k_xy = (_cubic_kernel(a, b, d) for a, b in ((x, x), (y, y), (x, y)))
        within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
        total += within / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m)
    return float(total / num_subsets)


def _kth_radii(manifold: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Per row of ``manifold``: its (k+1)-th smallest distance to the rows of ``manifold`` (itself included at 0)."""
    return torch.cat([torch.cdist(block, manifold).kthvalue(k + 1, dim=1).values for block in manifold.split(batch)])


def _inside(probes: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, batch: int) -> torch.Tensor:
    """Per probe: whether it lies within radii[j] of some manifold row j (closed balls, ``<=``)."""
    return torch.cat([(torch.cdist(block, manifold) <= radii).any(dim=1) for block in probes.split(batch)])


def precision_recall(feats_gen: Union[np.ndarray, torch.Tensor], feats_ref: Union[np.ndarray, torch.Tensor],
                     k: int = 3, batch: int = 1000, device: Optional[Union[str, torch.device]] = None
                     ) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models").

    A set's manifold is the union of closed balls B(phi, r_k(phi)) over its points phi. Radius convention
    (StyleGAN3's ``kthvalue(nhood_size + 1)``): r_k(phi) is the (k+1)-th smallest distance from phi to the
    points of its own set, the point itself counting as the smallest (0), i.e. the distance to its k-th
    nearest *other* point (duplicates count as other points at distance 0). precision = fraction of generated
    points inside the reference manifold; recall = fraction of reference points inside the generated one.

    Exact Euclidean distances (no approximate neighbours) by ``torch.cdist`` in float32, ``batch`` query rows
    at a time against the whole set: peak memory about 4 * batch * max(N_gen, N_ref) bytes per block
    (batch 1000 at 50k: 200 MB), so 50k x 50k runs; ``device`` (default: where the tensors are, CPU for
    numpy) puts the work on a GPU. Measured on this project's 2-core CPU at d = 2048: 5k x 5k in 7-16 s (batch
    5000 / 250; the same result for batch 250, 1000, 5000), so 50k x 50k is about 20 min there: use a GPU.
    The result does not depend on ``batch`` beyond float round-off.
    """
    def as_tensor(a: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        t = torch.as_tensor(a)
        return t.to(device=device if device is not None else t.device, dtype=torch.float32)

    gen, ref = as_tensor(feats_gen), as_tensor(feats_ref)
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"precision_recall: need two (N, D) arrays with the same D, "
                         f"got {tuple(gen.shape)} and {tuple(ref.shape)}")
    if k < 1 or k + 1 > min(gen.shape[0], ref.shape[0]) or batch < 1:
        raise ValueError(f"precision_recall: need k >= 1, batch >= 1 and more than k points per set, "
                         f"got k={k}, batch={batch}, N_gen={gen.shape[0]}, N_ref={ref.shape[0]}")
    with torch.no_grad():
        in_ref = _inside(gen, ref, _kth_radii(ref, k, batch), batch)
        in_gen = _inside(ref, gen, _kth_radii(gen, k, batch), batch)
    return int(in_ref.sum()) / len(in_ref), int(in_gen.sum()) / len(in_gen)  # exact fractions, not float32 means
