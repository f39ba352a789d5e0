"""FD-digits: Fréchet distance in the 64-d penultimate features of a small digit CNN.

The CNN is trained once (CPU, fixed seed, one thread, ~10 s) on the TRAIN split of the built-in digits
under the default split (holdout_fraction 0.2, split_seed 0), and cached as
``$SIDA_CACHE/digits_classifier/<key>.pt`` (default ``~/.cache/sida``); ``key`` hashes the training recipe
and the training data, so a changed recipe or data set trains a new one.

Scoring goes through clean-fid (see ``frechet.py``): images in [-1, 1] become RGB [0, 255] floats,
clean-fid's own PIL resizer in float (``make_resizer("PIL", False, "box", (8, 8))``) brings every image to
the digits' native 8x8 -- the identity at 8x8 and an exact block mean for multiples of 8, which inverts
the nearest-neighbour upsampling of ``sida_core.data`` -- instead of clean mode's 299x299 bicubic, and the
extractor takes luma grey, maps back to [-1, 1] and returns the CNN's penultimate (pre-ReLU) features.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import LUMA, load_digits_arrays, split_indices
from ..determinism import cpu_threads
from .frechet import FeatureSpace, Stats

RECIPE: dict[str, Any] = dict(version=1, arch="cnn16-32-fc64", split=dict(holdout_fraction=0.2, split_seed=0), seed=0, epochs=20,
              batch=64, optimizer="adam", lr_max=3e-3, schedule="onecycle", shift_pixels=1, shift_prob=0.5)
FEATURE_DIM = 64
TRAIN_COUNT = 0  # how many classifiers this process has trained (tests check that the cache is reused)
_MEMO: dict[str, "DigitsNet"] = {}


class DigitsNet(nn.Module):
    """8x8 grey digits in [-1, 1] -> 10 logits; ``features`` is the 64-d penultimate (pre-ReLU) layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, 10)
        self.holdout_accuracy = float("nan")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.features(x)))


def to_digits_input(x: torch.Tensor) -> torch.Tensor:
    """(N, 1|3, H, W) in [-1, 1] -> (N, 1, 8, 8): luma grey, area-downsampled (bilinear if smaller)."""
    if x.shape[1] == 3:
        x = (x * torch.tensor(LUMA, dtype=x.dtype, device=x.device)[:, None, None]).sum(1, keepdim=True)
    if x.shape[-2:] == (8, 8):
        return x
    if min(x.shape[-2:]) > 8:
        return F.adaptive_avg_pool2d(x, 8)
    return F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)


def _training_data():
    imgs, labels = load_digits_arrays()
    tr, ho = split_indices(len(imgs), labels, RECIPE["split"]["holdout_fraction"], RECIPE["split"]["split_seed"])
    x = torch.from_numpy(imgs.astype(np.float32) / 8.0 - 1.0)[:, None]
    y = torch.from_numpy(labels.astype(np.int64))
    return x[tr], y[tr], x[ho], y[ho]


def cache_key() -> str:
    """sha256 of the recipe and the training split's bytes."""
    x, y, _, _ = _training_data()
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("SIDA_CACHE") or Path.home() / ".cache" / "sida").expanduser()


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per image, with probability shift_prob, translate by up to shift_pixels (background -1 fills)."""
    s = RECIPE["shift_pixels"]
    xp = F.pad(x, (s, s, s, s), value=-1.0)
    crops = torch.stack([xp[:, :, dy:dy + 8, dx:dx + 8] for dy in range(2 * s + 1) for dx in range(2 * s + 1)])
    k = torch.randint(0, len(crops), (len(x),), generator=g)
    k[torch.rand(len(x), generator=g) >= RECIPE["shift_prob"]] = len(crops) // 2  # centre crop: no shift
    return crops[k, torch.arange(len(x))]


def train_digits_classifier() -> DigitsNet:
    """Train the classifier of ``RECIPE`` from scratch (deterministic on a given torch build)."""
    global TRAIN_COUNT
    x, y, xh, yh = _training_data()
    r = RECIPE
    with torch.random.fork_rng(devices=[]), cpu_threads(1):  # tiny ops: one thread is faster
        torch.manual_seed(r["seed"])
        g = torch.Generator().manual_seed(r["seed"])
        net = DigitsNet()
        steps_per_epoch = -(-len(x) // r["batch"])
        opt = torch.optim.Adam(net.parameters(), lr=r["lr_max"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, r["lr_max"], total_steps=r["epochs"] * steps_per_epoch)
        for _ in range(r["epochs"]):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), r["batch"]):
                b = perm[i:i + r["batch"]]
                loss = F.cross_entropy(net(_shift(x[b], g)), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            net.holdout_accuracy = float((net(xh).argmax(1) == yh).float().mean())
    TRAIN_COUNT += 1
    return net


def load_digits_classifier(cache_dir: Union[str, Path, None] = None) -> DigitsNet:
    """The cached classifier (trained and written atomically on first use); eval mode, CPU, frozen."""
    path = Path(cache_dir or default_cache_dir()).expanduser() / "digits_classifier" / f"{cache_key()[:20]}.pt"
    if str(path) in _MEMO:
        return _MEMO[str(path)]
    net = _read_checkpoint(path) if path.is_file() else None
    if net is None:
        t0 = time.perf_counter()
        net = train_digits_classifier()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(dict(state_dict=net.state_dict(), recipe=json.dumps(RECIPE, sort_keys=True),
                        holdout_accuracy=net.holdout_accuracy, train_seconds=time.perf_counter() - t0,
                        torch_version=str(torch.__version__)), tmp)
        os.replace(tmp, path)  # concurrent trainers write identical files; last rename wins
    net.eval().requires_grad_(False)
    _MEMO[str(path)] = net
    return net


def _read_checkpoint(path: Path) -> Optional[DigitsNet]:
    """The cached classifier, or None (with a warning) when the file is unreadable: it is then retrained."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net = DigitsNet()
        net.load_state_dict(ckpt["state_dict"])
        net.holdout_accuracy = float(ckpt["holdout_accuracy"])
        return net
    except Exception as e:  # noqa: BLE001 -- any damage to a cache file means: rebuild it
        why = (str(e).splitlines() or [""])[0][:160]
        warnings.warn(f"ignoring unreadable digits-classifier cache {str(path)!r} ({type(e).__name__}: {why}); "
                      "retraining", stacklevel=2)
        return None


class DigitsFeatureExtractor(nn.Module):
    """clean-fid feature extractor: NCHW RGB (or grey) floats in [0, 255], any size -> (N, 64) features."""

    def __init__(self, net: DigitsNet):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).cpu() / 127.5 - 1.0
        return self.net.features(to_digits_input(x))


def digits_feature_space(cache_dir: Union[str, Path, None] = None, batch_size: int = 500) -> FeatureSpace:
    """The FD-digits feature space (extractor + clean-fid resizer to the native 8x8)."""
    from cleanfid.resize import make_resizer

    return FeatureSpace("fd_digits", DigitsFeatureExtractor(load_digits_classifier(cache_dir)),
                        extractor_id=f"digits-cnn/{cache_key()[:20]}", mode="clean",
                        fn_resize=make_resizer("PIL", False, "box", (8, 8)), batch_size=batch_size,
                        feature_dim=FEATURE_DIM)


def digits_feature_stats(images: torch.Tensor, cache_dir: Union[str, Path, None] = None) -> Stats:
    """(mu, sigma) of the FD-digits features of images (N, C, H, W) in [-1, 1]."""
    return digits_feature_space(cache_dir).stats(images)


def fd_digits(images_a: Union[torch.Tensor, Stats], images_b: Union[torch.Tensor, Stats],
              cache_dir: Union[str, Path, None] = None) -> float:
    """FD-digits between two image tensors in [-1, 1] (either may be precomputed (mu, sigma))."""
    return digits_feature_space(cache_dir).fd(images_a, images_b)
