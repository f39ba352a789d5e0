"""Prepared datasets in storage (local folder or ``s3://``): written once by ``sida dataset prepare``, staged once
per node into ``$SIDA_CACHE/datasets`` and read on demand from there (no Ray here; format: ``sida_core.shards``).

Memory model: no process holds the dataset. ``prepare`` keeps one shard in memory while writing it; a node copies
an ``s3://`` dataset to its local disk once (under a file lock shared by every worker and scorer on the node,
each shard's sha256 checked as it lands); every process then reads the images of each batch with ``pread``, so
the page cache is the only copy in memory and the kernel shares and evicts it.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from store.storage import Storage
from sida_core.data import DataError, open_source
from sida_core.shards import (FORMAT, MANIFEST, build_manifest, file_sha256, fingerprint, infer_source_kind, labels_file,
                              npy_bytes, part_file, sha256, shard_file, to_stored, verify_shards)

DEFAULT_SHARD_SIZE = 4096


def _storage(uri: str, endpoint_url: Optional[str]) -> Storage:
    try:
        return Storage(uri, endpoint_url=endpoint_url)
    except ValueError as e:
        raise DataError(str(e)) from None


def _first_good(source, skip_bad: bool) -> tuple[int, Any]:
    """(position, decoded item) of the first member that decodes (the dataset's shape comes from it)."""
    for i in range(len(source)):
        try:
            return i, source.read(i)
        except DataError:
            if not skip_bad:
                raise
    raise DataError(f"{source.path}: no member could be decoded ({len(source)} tried)")


def prepare_dataset(src: str, out: str, *, kind: Optional[str] = None, resolution: Optional[int] = None,
                    channels: Optional[int] = None, shard_size: int = DEFAULT_SHARD_SIZE, skip_bad: bool = False,
                    endpoint_url: Optional[str] = None, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Convert ``src`` into a prepared dataset at ``out``; resumable (finished shards are skipped). Returns a
    summary dict (the manifest's count, shape, shards, skipped...)."""
    from tqdm.auto import tqdm

    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    path = Path(src).expanduser()
    if not path.exists():
        raise DataError(f"SRC {src!r}: no such file or folder")
    kind = kind or infer_source_kind(path)
    source = open_source(kind, path)
    try:
        if len(source) == 0:
            raise DataError(f"{path}: no {'latents (.npy)' if kind == 'latents' else 'images'} found (--kind {kind})")
        store = _storage(out, endpoint_url)  # parses the URI only; nothing is created before the input is checked
        first_pos, first = _first_good(source, skip_bad)
        if kind == "latents":
            if resolution is not None or channels is not None:
                raise DataError("--resolution / --channels do not apply to latents (stored as encoded)")
            shape, dtype, resize = tuple(first.shape), "float16", False
        else:
            if channels not in (None, 1, 3):
                raise DataError(f"--channels must be 1 or 3, got {channels}")
            shape = (channels or first.shape[2], resolution or first.shape[0], resolution or first.shape[0])
            dtype, resize = "uint8", resolution is not None
        store.check()  # creates a local --out / fails fast on a missing bucket, once the input has passed
        settings = {"kind": kind, "shape": list(shape), "dtype": dtype, "shard_size": shard_size, "resize": resize,
                    "source": fingerprint(source)}
        settings_hash = sha256(json.dumps(settings, sort_keys=True).encode())
        if store.exists(MANIFEST):
            done = store.read_json(MANIFEST)
            if done.get("settings_sha256") == settings_hash:
                log(f"{store.uri}: already prepared ({done['count']} items); nothing to do")
                return _summary(done, store.uri, resumed_shards=len(done["shards"]), written_shards=0)
            raise DataError(f"--out {store.uri} already holds another prepared dataset (source or options differ); "
                            "choose another --out or delete it")
        parts = _finished_parts(store, settings_hash)
        pos = parts[-1]["end"] if parts else 0
        if parts:
            log(f"{store.uri}: resuming after {len(parts)} finished shard(s) ({pos} of {len(source)} members)")
        bar = tqdm(total=len(source), initial=pos, desc="prepare", unit="img", disable=not progress)
        written = 0
        while pos < len(source):
            k, start, items, ids, skipped = len(parts), pos, [], [], []
            while pos < len(source) and len(items) < shard_size:
                name = f"{path}:{source.members[pos]}" if kind in ("zip", "latents") else source.members[pos]
                try:
                    item = first if pos == first_pos else source.read(pos)
                    items.append(to_stored(item, kind, shape, resize, name))
                    ids.append(pos)
                except DataError as e:
                    if not skip_bad:
                        raise DataError(f"{e} (pass --skip-bad to skip bad members)") from None
                    skipped.append({"name": source.members[pos], "reason": str(e)})
                pos += 1
                bar.update(1)
            parts.append(_write_shard(store, k, start, pos, items, ids, source.labels, skipped, settings_hash))
            written += 1
        bar.close()
        parts = [p for p in parts if p["count"]]
        if not parts:
            raise DataError(f"{path}: every member was bad ({len(source)} skipped); nothing prepared")
        num_classes = int(source.labels.max()) + 1 if source.labels is not None and len(source.labels) else None
        manifest = build_manifest("latents" if kind == "latents" else "images", shape, dtype, shard_size, parts,
                                  {**fingerprint(source), "resize": resize},
                                  num_classes)
        manifest["settings_sha256"] = settings_hash
        store.write_json(MANIFEST, manifest)  # last: a folder with a manifest is complete
        return _summary(manifest, store.uri, resumed_shards=len(parts) - written, written_shards=written)
    finally:
        source.close()


def _finished_parts(store: Storage, settings_hash: str) -> list[dict]:
    names = sorted(n for n in store.listdir("parts") if n.endswith(".json"))
    parts = []
    for k, n in enumerate(names):
        if n != Path(part_file(k)).name:
            raise DataError(f"{store.uri_of('parts')}: expected {Path(part_file(k)).name}, found {n} (a damaged "
                            "earlier prepare); delete the folder and prepare again")
        p = store.read_json(f"parts/{n}")
        if p.get("settings_sha256") != settings_hash:
            raise DataError(f"--out {store.uri} holds shards of another prepare (source or options differ); choose "
                            "another --out or delete it")
        parts.append(p)
    return parts


def _write_shard(store: Storage, k: int, start: int, end: int, items: list, ids: list, labels: Optional[np.ndarray],
                 skipped: list, settings_hash: str) -> dict:
    """Write shard k (images, labels), then its part record (the commit marker a resumed prepare trusts)."""
    rec: dict[str, Any] = {"index": k, "start": start, "end": end, "count": len(items), "skipped": skipped,
                           "file": None, "sha256": None, "labels_file": None, "labels_sha256": None,
                           "label_counts": None, "settings_sha256": settings_hash}
    if items:
        data = npy_bytes(np.stack(items))
        store.write_bytes(shard_file(k), data)
        rec.update(file=shard_file(k), sha256=sha256(data))
        if labels is not None:
            y = labels[np.asarray(ids, dtype=np.int64)].astype(np.int64)
            ldata = npy_bytes(y)
            store.write_bytes(labels_file(k), ldata)
            values, counts = np.unique(y, return_counts=True)
            rec.update(labels_file=labels_file(k), labels_sha256=sha256(ldata),
                       label_counts={str(int(v)): int(c) for v, c in zip(values, counts)})
    store.write_json(part_file(k), rec)
    return rec


def _summary(manifest: dict, uri: str, **extra) -> dict:
    return {"uri": uri, "kind": manifest["kind"], "count": manifest["count"], "shape": manifest["shape"],
            "dtype": manifest["dtype"], "shards": len(manifest["shards"]), "skipped": manifest["num_skipped"],
            "labelled": manifest["labelled"], **extra}


# ---------------------------------------------------------------------------------------------------- staging

def _cache_root(cache_root: Optional[Path]) -> Path:
    if cache_root is not None:
        return Path(cache_root)
    from sida_core.training_loop import cache_dir

    return cache_dir()


class _Lock:
    """An exclusive ``flock`` on ``path`` (every process of a node that stages the same dataset waits here)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.fd = path, -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def stage_dataset(uri: "str | Storage", *, endpoint_url: Optional[str] = None, cache_root: Optional[Path] = None,
                  log: Callable[[str], None] = lambda m: None) -> Path:
    """A local folder holding the prepared dataset ``uri``, every shard's sha256 checked once.

    ``s3://``: copied into ``cache_root/datasets/<hash of uri and manifest>`` once per node (concurrent callers
    wait on a file lock; an interrupted copy resumes; a shard whose hash differs is named and the copy fails).
    Local: used in place, verified once per content (a stamp in ``cache_root/datasets/verified``).
    An unreachable store is retried per its retry policy (pass a ``Storage`` built from the run's ``storage``
    settings to use theirs), then one ``StorageError`` line.
    """
    root = _cache_root(cache_root) / "datasets"
    store = uri if isinstance(uri, Storage) else _storage(uri, endpoint_url)
    try:
        mbytes = store.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise DataError(f"data.path {store.uri!r}: no {MANIFEST}; expected a dataset written by `sida dataset "
                        "prepare` (an unfinished prepare has parts/ but no manifest: run it again)") from None
    try:
        manifest = json.loads(mbytes)
        assert isinstance(manifest, dict) and manifest.get("format") == FORMAT
    except (ValueError, AssertionError):
        raise DataError(f"{store.uri_of(MANIFEST)}: not a manifest of format {FORMAT!r}") from None
    key = hashlib.sha256(store.uri.encode() + b"\0" + mbytes).hexdigest()[:20]
    if not store.is_s3:
        folder = Path(store.root)
        stamp = root / "verified" / key
        if not stamp.exists():
            with _Lock(root / "verified" / f"{key}.lock"):
                if not stamp.exists():
                    t0 = time.time()
                    verify_shards(folder, manifest)
                    stamp.write_text(store.uri)
                    log(f"dataset {store.uri}: {len(manifest['shards'])} shards verified in {time.time() - t0:.1f} s")
        return folder
    dest = root / key
    if (dest / MANIFEST).exists():
        return dest
    with _Lock(root / f"{key}.lock"):
        if (dest / MANIFEST).exists():  # another process of this node staged it meanwhile
            return dest
        t0, nbytes = time.time(), 0
        dest.mkdir(parents=True, exist_ok=True)
        for s in manifest["shards"]:
            for f, h in (("file", "sha256"), ("labels_file", "labels_sha256")):
                if not s.get(f):
                    continue
                local = dest / s[f]
                if local.exists() and file_sha256(local) == s[h]:
                    continue  # an earlier, interrupted staging finished this one
                store.download_file(s[f], local)
                if file_sha256(local) != s[h]:
                    local.unlink()
                    raise DataError(f"prepared dataset {store.uri}: shard {s[f]} is corrupt (sha256 differs from the "
                                    "manifest); prepare it again")
                nbytes += local.stat().st_size
        tmp = dest / f".{MANIFEST}.tmp"
        tmp.write_bytes(mbytes)
        os.replace(tmp, dest / MANIFEST)  # last: a staged folder with a manifest is complete
        log(f"dataset {store.uri}: staged {nbytes / 1e6:.1f} MB to {dest} in {time.time() - t0:.1f} s")
    return dest


def stage_folder(uri: str, *, endpoint_url: Optional[str] = None, what: str = "inputs",
                 cache_root: Optional[Path] = None, storage: Optional[Storage] = None) -> Path:
    """A local copy of a read-only folder (e.g. the SD-VAE weights): a local path as is; ``s3://`` copied once per
    node into ``cache_root/<what>/<hash of uri>`` under a file lock (a ``.complete`` marker written last).
    ``storage``: the folder's Storage with its credentials (default: built from ``endpoint_url`` and the
    environment)."""
    store = storage or _storage(uri, endpoint_url)
    if not store.is_s3:
        if not Path(store.root).is_dir():
            raise DataError(f"{uri!r}: no such folder")
        return Path(store.root)
    root = _cache_root(cache_root) / what
    dest = root / hashlib.sha256(store.uri.encode()).hexdigest()[:20]
    if (dest / ".complete").exists():
        return dest
    with _Lock(root / f"{dest.name}.lock"):
        if not (dest / ".complete").exists():
            if not store.listdir(""):
                raise DataError(f"{store.uri!r}: empty or missing folder")
            store.download_dir("", dest)
            (dest / ".complete").write_text(store.uri)
    return dest


def local_data_config(cfg: Any, log: Callable[[str], None] = lambda m: None):
    """RunConfig ``cfg`` with a prepared dataset's ``data.path`` replaced by its staged local folder (reached with the
    run's endpoint, credentials and retry settings); unchanged for every other data kind."""
    if cfg.data.kind != "prepared":
        return cfg
    try:
        store = Storage.from_config(cfg.storage.model_copy(update={"uri": str(cfg.data.path)}))
    except ValueError as e:
        raise DataError(f"data.path: {e}") from None
    local = stage_dataset(store, log=log)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(local)})})


def load_run_dataset(cfg: Any, log: Callable[[str], None] = lambda m: None):
    """``sida_core.data.load_dataset`` of a RunConfig's data, after staging a prepared dataset to this node."""
    from sida_core.data import load_dataset

    return load_dataset(local_data_config(cfg, log=log).data)


def stage_file(uri: str, *, endpoint_url: Optional[str] = None, what: str = "files", parent: Optional[Storage] = None,
               log: Callable[[str], None] = lambda m: None) -> Path:
    """A local copy of a read-only file (a teacher pickle, DINOv2 weights): a local path as is (it must exist);
    ``s3://`` fetched once per node into ``$SIDA_CACHE/<what>``, keyed by URI, size and modification time, under a
    file lock (written under a temporary name, renamed when whole). ``parent``: the Storage of the file's folder
    (its credentials), default built from ``endpoint_url`` and the environment."""
    if not uri.startswith("s3://"):
        path = Path(uri).expanduser()
        if not path.is_file():
            raise DataError(f"{uri!r}: no such file")
        return path
    head, _, name = uri.rstrip("/").rpartition("/")
    store = parent or _storage(head, endpoint_url)
    info = store.files().get(name)
    if info is None:
        raise DataError(f"{uri!r}: no such object")
    root = _cache_root(None) / what
    local = root / hashlib.sha256(f"{uri}|{info[0]}|{info[1]}".encode()).hexdigest()[:20] / name
    with _Lock(root / f"{local.parent.name}.lock"):
        if not local.is_file():
            t0 = time.time()
            store.download_file(name, local)
            log(f"{what}: {uri} fetched to {local} ({info[0] / 1e6:.1f} MB in {time.time() - t0:.1f} s)")
    return local


def local_teacher_config(cfg: Any, log: Callable[[str], None] = lambda m: None):
    """RunConfig ``cfg`` with an ``s3://`` ``teacher.path`` (a published ``.pkl`` / ``.pt`` / ``.safetensors``, or a
    project checkpoint folder) replaced by its local copy, fetched once per node into ``$SIDA_CACHE/teachers`` (a
    file: keyed by URI, size and modification time, under a file lock; a folder: as :func:`stage_folder`), with the
    run's endpoint and credentials; unchanged for a local path."""
    from schemas.loader import ConfigError

    uri = str(cfg.teacher.path or "")
    if not uri.startswith("s3://"):
        return cfg
    parent, _, name = uri.rstrip("/").rpartition("/")
    try:
        store = Storage.from_config(cfg.storage.model_copy(update={"uri": parent}))
    except ValueError as e:
        raise ConfigError(f"teacher.path: {e}") from None
    info = store.files().get(name)
    if info is None:  # a checkpoint folder, or nothing
        if not store.child(name).listdir():
            raise ConfigError(f"teacher.path {uri}: no such object or folder in {store.uri}")
        local = stage_folder(uri, what="teachers", storage=store.child(name))  # the run's keys, as for a file
    else:
        local = stage_file(uri, what="teachers", parent=store, log=log)
    teacher = cfg.teacher.model_copy(update={"path": str(local)})
    return cfg.model_copy(update={"teacher": teacher})


def run_teacher(cfg: Any, train_set, device, log: Callable[[str], None] = print, progress_factory=None):
    """``sida_core.training_loop.get_teacher`` (f_phi and its checkpoint folder) after fetching an ``s3://``
    ``teacher.path`` to this node (:func:`local_teacher_config`); ``cfg`` itself, and so the run's config.json,
    keeps the URI."""
    from sida_core.training_loop import get_teacher

    return get_teacher(local_teacher_config(cfg, log), train_set, device, log, progress_factory)
