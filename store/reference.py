"""Reference statistics in storage: one folder per statistics set, local or ``s3://`` (no Ray here).

Layout (written by ``sida fid-stats``, read by the scorer actors)::

    URI/stats.npz       mu, sigma (float64; the clean-fid / EDM layout)
    URI/manifest.json   extractor, mode, feature dim, image count, resolution, dataset hash, sha256 of stats.npz

``manifest.json`` is written last (and an old one removed first), so a folder with a manifest always holds
the matching ``stats.npz``; :func:`read_reference` verifies that hash. A bare ``.npz`` (EDM's format) is read
as statistics without a manifest (see ``sida_core.metrics.reference``).
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional

from store.storage import Storage
from sida_core.metrics.reference import ReferenceStats

STATS, MANIFEST = "stats.npz", "manifest.json"


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
    store.write_json(MANIFEST, {**ref.manifest, "stats_file": STATS, "stats_sha256": hashlib.sha256(data).hexdigest()})
    return store.uri


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
