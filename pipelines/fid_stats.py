"""``sida fid-stats``: reference statistics of a dataset, stored with their manifest; and ``read_reference``.

Layout of a statistics folder (local or ``s3://``, through ``ray_jobs.storage.Storage``)::

    URI/stats.npz       mu, sigma (float64; the clean-fid / EDM layout)
    URI/manifest.json   extractor, mode, feature dim, image count, resolution, dataset hash, sha256 of stats.npz

``manifest.json`` is written last (and an old one removed first), so a folder with a manifest always holds
the matching ``stats.npz``; ``read_reference`` verifies that hash. A bare ``.npz`` (EDM's format) is read
as statistics without a manifest.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

from sida_core.metrics.reference import ReferenceStats

STATS, MANIFEST = "stats.npz", "manifest.json"


class FidStatsError(ValueError):
    """A reference-statistics source or destination is unusable (the message names it and what was expected)."""


def infer_kind(path: Path) -> str:
    """folder | zip | npz | idx from the path (IDX: a ``*-idx*`` file or a folder holding one)."""
    name = path.name.lower()
    if path.is_dir():
        return "idx" if any("-idx" in p.name for p in path.iterdir()) else "folder"
    for suffix, kind in ((".zip", "zip"), (".npz", "npz")):
        if name.endswith(suffix):
            return kind
    if "-idx" in name:
        return "idx"
    raise FidStatsError(f"cannot tell the kind of {str(path)!r}; pass --kind {{folder,zip,npz,idx}}")


def load_reference_images(dataset: str, *, kind: Optional[str] = None, resolution: Optional[int] = None,
                          channels: Optional[int] = None, max_images: Optional[int] = None):
    """(images (N, C, R, R) in [-1, 1], description) of ``digits`` (the train split FD-digits' classifier
    was trained on) or of every image under a path (sida_core.data's loaders, no holdout)."""
    from pydantic import ValidationError

    from schemas.run import DataConfig
    from sida_core.data import load_dataset
    from sida_core.metrics.digits_classifier import RECIPE

    if dataset == "digits":
        if kind not in (None, "digits"):
            raise FidStatsError(f"DATASET 'digits' is the built-in data; --kind {kind} needs a path")
        split = RECIPE["split"]
        fields = dict(kind="digits", resolution=resolution or 8, channels=channels or 1,
                      holdout_fraction=split["holdout_fraction"], split_seed=split["split_seed"])
        desc = dict(name="digits", kind="digits", split=f"train (holdout_fraction {split['holdout_fraction']}, "
                                                          f"split_seed {split['split_seed']})")
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise FidStatsError(f"DATASET {dataset!r}: no such file or folder (or use 'digits', the built-in data)")
        kind = kind or infer_kind(path)
        if kind == "digits":
            raise FidStatsError(f"--kind digits takes DATASET 'digits', not a path ({dataset!r})")
        if resolution is None:
            raise FidStatsError(f"--resolution is required for {dataset!r}: the data.resolution of the runs that "
                                "will be scored against these statistics")
        fields = dict(kind=kind, path=str(path.resolve()), resolution=resolution, channels=channels or 3,
                      holdout_fraction=0.0)
        desc = dict(name=str(path.resolve()), kind=kind, split="all")
    try:
        cfg = DataConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        raise FidStatsError(f"invalid data options: {'.'.join(map(str, err['loc'])) or 'data'}: {err['msg']}") from None
    images = load_dataset(cfg)[0].images
    total = int(images.shape[0])
    if max_images is not None:
        if max_images < 2:
            raise FidStatsError(f"--max-images must be >= 2 (a covariance needs two images), got {max_images}")
        images = images[:max_images]
    desc.update(total_images=total, max_images=max_images)
    return images, desc


def _storage(uri: str, endpoint_url: Optional[str]):
    from ray_jobs.storage import Storage

    try:
        return Storage(uri, endpoint_url=endpoint_url)
    except ValueError as e:
        raise FidStatsError(str(e)) from None


def write_reference(ref: ReferenceStats, uri: str, *, endpoint_url: Optional[str] = None) -> str:
    """Store ``ref`` under ``uri``: drop an old manifest, write stats.npz, then manifest.json. Returns the URI."""
    store = _storage(uri, endpoint_url)
    store.check()
    data = ref.to_npz_bytes()
    store.delete(MANIFEST)
    store.write_bytes(STATS, data)
    store.write_json(MANIFEST, {**ref.manifest, "stats_file": STATS, "stats_sha256": hashlib.sha256(data).hexdigest()})
    return store.uri


def read_reference(uri_or_npz_path: str, endpoint_url: Optional[str] = None) -> ReferenceStats:
    """Statistics from a folder written by :func:`write_reference` (manifest checked against stats.npz), or
    from a bare ``.npz`` with ``mu``/``sigma`` (local file or S3 object; manifest-less, see reference.py).
    ``manifest["source"]`` is set to where they came from."""
    src = str(uri_or_npz_path).rstrip("/")
    if src.endswith(".npz"):
        head, _, name = src.rpartition("/")
        store = _storage(head or ".", endpoint_url)
        if name == STATS and store.exists(MANIFEST):  # URI/stats.npz of a statistics folder: use its manifest
            return read_reference(head, endpoint_url)
        try:
            data = store.read_bytes(name)
        except FileNotFoundError:
            raise FidStatsError(f"reference statistics {src!r}: no such file") from None
        try:
            return ReferenceStats.from_npz_bytes(data, source=store.uri_of(name))
        except ValueError as e:
            raise FidStatsError(str(e)) from None
    store = _storage(src, endpoint_url)
    try:
        manifest = store.read_json(MANIFEST)
    except FileNotFoundError:
        raise FidStatsError(f"reference statistics {store.uri!r}: no {MANIFEST}; expected a folder written by "
                            "`sida fid-stats` or a .npz file with mu and sigma") from None
    name = manifest.get("stats_file", STATS)
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        raise FidStatsError(f"reference statistics {store.uri!r}: {MANIFEST} present but {name} missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if manifest.get("stats_sha256") not in (None, actual):
        raise FidStatsError(f"reference statistics {store.uri_of(name)!r}: sha256 {actual} does not match the "
                            f"manifest's {manifest['stats_sha256']}")
    manifest["source"] = store.uri
    try:
        return ReferenceStats.from_npz_bytes(data, manifest, source=store.uri_of(name))
    except ValueError as e:
        raise FidStatsError(str(e)) from None


def run_fid_stats(dataset: str, out: str, *, metric: Optional[str] = None, kind: Optional[str] = None,
                  resolution: Optional[int] = None, channels: Optional[int] = None, max_images: Optional[int] = None,
                  endpoint_url: Optional[str] = None, device: str = "cpu", progress: bool = True) -> dict:
    """Compute and store the reference statistics of ``dataset``; returns a one-line JSON-able summary."""
    import torch

    from sida_core.metrics import feature_space
    from sida_core.metrics.reference import compute_reference

    t0 = time.perf_counter()
    metric = metric or ("fd_digits" if dataset == "digits" else "fid_inception")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _storage(out, endpoint_url).check()  # a bad URI or missing bucket fails before minutes of feature extraction
    images, desc = load_reference_images(dataset, kind=kind, resolution=resolution, channels=channels,
                                         max_images=max_images)
    space = feature_space(metric, device=device)
    ref = compute_reference(images, space, dataset_desc=desc, device=device, progress=progress)
    uri = write_reference(ref, out, endpoint_url=endpoint_url)
    m = ref.manifest
    return dict(out=uri, metric=metric, extractor_id=m["extractor_id"], mode=m["mode"], num_images=m["num_images"],
                resolution=m["resolution"], channels=m["channels"], feature_dim=m["feature_dim"],
                seconds=round(time.perf_counter() - t0, 1))
