"""Reference statistics in storage: one folder per statistics set, local or ``s3://`` (no Ray here).

Layout (written by ``sida fid-stats``, read by the scorer actors)::

    URI/stats.npz       mu, sigma (float64; the clean-fid / EDM layout)
    URI/features-00000.npy ...  optional (``sida fid-stats --features``): the (N, D) features as float16, in
                        shards of FEATURE_SHARD rows (KID and precision / recall compare against them)
    URI/manifest.json   extractor, mode, feature dim, image count, resolution, dataset hash, sha256 of stats.npz
                        (and of each feature shard)

``manifest.json`` is written last (and an old one removed first), so a folder with a manifest always holds
the matching ``stats.npz``; :func:`read_reference` verifies that hash. A bare ``.npz`` (EDM's format) is read
as statistics without a manifest (see ``sida_core.metrics.reference``).
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Optional

import numpy as np

from store.storage import Storage
from sida_core.metrics.reference import ReferenceStats

STATS, MANIFEST = "stats.npz", "manifest.json"
FEATURE_SHARD = 10_000  # rows per features-NNNNN.npy (Inception: 40 MB in float16)


class ReferenceStatsError(ValueError):
    """Reference statistics (or their source) are unusable: the message names them and what was expected."""


def _storage(uri: str, endpoint_url: Optional[str]) -> Storage:
    try:
        return Storage(uri, endpoint_url=endpoint_url)
    except ValueError as e:
        raise ReferenceStatsError(str(e)) from None


def write_reference(ref: ReferenceStats, uri: str, *, endpoint_url: Optional[str] = None) -> str:
    """Store ``ref`` under ``uri``: drop an old manifest, write stats.npz, then manifest.json. Returns the URI."""
    store = _storage(uri, endpoint_url)
    store.check()
    data = ref.to_npz_bytes()
    store.delete(MANIFEST)
    store.write_bytes(STATS, data)
    extra: dict = {}
    if ref.features is not None:
        shards = []
        for i, start in enumerate(range(0, len(ref.features), FEATURE_SHARD)):
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(ref.features[start:start + FEATURE_SHARD], np.float16), allow_pickle=False)
            name = f"features-{i:05d}.npy"
            store.write_bytes(name, buf.getvalue())
            shards.append({"file": name, "rows": min(FEATURE_SHARD, len(ref.features) - start),
                           "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
        extra["features"] = {"dtype": "float16", "count": int(len(ref.features)), "shards": shards}
    store.write_json(MANIFEST, {**ref.manifest, "stats_file": STATS, "stats_sha256": hashlib.sha256(data).hexdigest(),
                                **extra})
    return store.uri


def read_reference_features(uri: str, endpoint_url: Optional[str] = None) -> np.ndarray:
    """The (N, D) float16 features stored beside the statistics at ``uri`` (``sida fid-stats --features``), each
    shard checked against the manifest's sha256; one clear error when there are none."""
    store = _storage(str(uri).rstrip("/"), endpoint_url)
    try:
        manifest = store.read_json(MANIFEST)
    except FileNotFoundError:
        manifest = {}
    info = manifest.get("features")
    if not info:
        raise ReferenceStatsError(f"reference statistics {store.uri!r} hold no features (KID and precision / recall "
                                  "need them): recompute with `sida fid-stats ... --features`")
    parts = []
    for shard in info["shards"]:
        try:
            data = store.read_bytes(shard["file"])
        except FileNotFoundError:
            raise ReferenceStatsError(f"reference features {store.uri_of(shard['file'])!r}: missing") from None
        if hashlib.sha256(data).hexdigest() != shard.get("sha256"):
            raise ReferenceStatsError(f"reference features {store.uri_of(shard['file'])!r}: sha256 does not match the "
                                      "manifest (damaged or replaced)")
        try:
            parts.append(np.load(io.BytesIO(data), allow_pickle=False))
        except ValueError as e:
            raise ReferenceStatsError(f"reference features {store.uri_of(shard['file'])!r}: unreadable ({e})") from None
    feats = np.concatenate(parts)
    if feats.ndim != 2 or len(feats) != info.get("count") or feats.shape[1] != manifest.get("feature_dim", feats.shape[1]):
        raise ReferenceStatsError(f"reference features at {store.uri!r}: shape {feats.shape} does not match the manifest")
    return feats


def read_reference(uri_or_npz_path: str, endpoint_url: Optional[str] = None) -> ReferenceStats:
    """Statistics from a folder written by :func:`write_reference` (manifest checked against stats.npz), or
    from a bare ``.npz`` with ``mu``/``sigma`` (local file or S3 object; manifest-less).
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
            raise ReferenceStatsError(f"reference statistics {src!r}: no such file") from None
        try:
            return ReferenceStats.from_npz_bytes(data, source=store.uri_of(name))
        except ValueError as e:
            raise ReferenceStatsError(str(e)) from None
    store = _storage(src, endpoint_url)
    if not store.is_s3 and os.path.isfile(store.root):
        raise ReferenceStatsError(f"reference statistics {src!r}: a file, but not a .npz; expected a folder written by "
                                  "`sida fid-stats` or a .npz file with mu and sigma")
    try:
        manifest = store.read_json(MANIFEST)
    except FileNotFoundError:
        raise ReferenceStatsError(f"reference statistics {store.uri!r}: no {MANIFEST}; expected a folder written by "
                                  "`sida fid-stats` or a .npz file with mu and sigma") from None
    name = manifest.get("stats_file", STATS)
    try:
        data = store.read_bytes(name)
    except FileNotFoundError:
        raise ReferenceStatsError(f"reference statistics {store.uri!r}: {MANIFEST} present but {name} missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if manifest.get("stats_sha256") not in (None, actual):
        raise ReferenceStatsError(f"reference statistics {store.uri_of(name)!r}: sha256 {actual} does not match the "
                                  f"manifest's {manifest['stats_sha256']}")
    manifest["source"] = store.uri
    try:
        return ReferenceStats.from_npz_bytes(data, manifest, source=store.uri_of(name))
    except ValueError as e:
        raise ReferenceStatsError(str(e)) from None
