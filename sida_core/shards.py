"""Prepared (sharded) datasets: converted once, read image by image, never decoded whole (plain numpy + torch).

A prepared dataset is a folder (local here; ``ray_jobs.datasets`` writes it to, and stages it from, object
storage)::

    manifest.json        written last: format, kind, count, shape, dtype, shard_size, shards [{file, count, sha256,
                         labels_file, labels_sha256}], label histogram, skipped members, source fingerprint
    images-00000.npy     (n, C, R, R) uint8 images in 0..255, or (n, 8, h, w) float16 SD-VAE moments (latents)
    labels-00000.npy     (n,) int64 labels (only when the source has labels)
    parts/00000.json     one record per finished shard (what a resumed ``prepare`` skips)

Every shard but the last holds exactly ``shard_size`` items, so item ``i`` lives in shard ``i // shard_size``.
:class:`ShardedImages` reads items with ``os.pread`` from the ``.npy`` files: nothing is mapped or cached in the
process, so its memory does not grow with the dataset; the page cache shares the bytes among every process of a
node (driver, workers, scorers).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sida_core.data import DataError, Source, _convert

FORMAT = "sida-shards/1"
MANIFEST = "manifest.json"
SOURCE_KINDS = ("folder", "zip", "npz", "idx", "latents")


def shard_file(k: int) -> str:
    return f"images-{k:05d}.npy"


def labels_file(k: int) -> str:
    return f"labels-{k:05d}.npy"


def part_file(k: int) -> str:
    return f"parts/{k:05d}.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- sources

def fingerprint(source: Source) -> dict[str, Any]:
    """What identifies a source for a resumed prepare: kind, path, count and a hash of the member names."""
    names = "\n".join(source.members).encode()
    return {"kind": source.kind, "path": str(source.path), "count": len(source.members), "names_sha256": sha256(names)}


def infer_source_kind(path: Path) -> str:
    """folder | zip | npz | idx | latents from the path (a zip of ``.npy`` members is an EDM2 latent zip)."""
    name = path.name.lower()
    if path.is_dir():
        return "idx" if any("-idx" in p.name for p in path.iterdir()) else "folder"
    if name.endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                return "latents" if any(n.endswith(".npy") for n in zf.namelist()) else "zip"
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{str(path)!r}: not a readable zip file ({e})") from None
    if name.endswith(".npz"):
        return "npz"
    if "-idx" in name:
        return "idx"
    raise DataError(f"cannot tell the kind of {str(path)!r}; pass --kind {{{','.join(SOURCE_KINDS)}}}")


def to_stored(item: np.ndarray, kind: str, shape: Sequence[int], resize: bool, where: str) -> np.ndarray:
    """One decoded member as stored: (C, R, R) uint8 (images; resized only when ``resize``) or (8, h, w)
    float16 (latents). Raises :class:`DataError` for a member of the wrong size."""
    shape = tuple(int(s) for s in shape)
    if kind == "latents":
        if item.shape != shape:
            raise DataError(f"{where}: latent moments of shape {item.shape}, expected {shape} like the others")
        return item.astype(np.float16)
    c, r = shape[0], shape[-1]
    h, w = item.shape[:2]
    if not resize and (h, w) != (r, r):
        raise DataError(f"{where}: image is {w}x{h}, expected {r}x{r} like the others (pass --resolution to resize)")
    x = _convert([item], where, r, c)[0]  # float [-1, 1]; exact for integer pixels at the native size
    return np.rint((x.numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def build_manifest(kind: str, shape: Sequence[int], dtype: str, shard_size: int, parts: Sequence[dict],
                   source: dict, num_classes: Optional[int]) -> dict:
    """The manifest of a finished dataset from its per-shard records (in order)."""
    hist: dict[str, int] = {}
    for p in parts:
        for k, v in (p.get("label_counts") or {}).items():
            hist[k] = hist.get(k, 0) + int(v)
    skipped = [s for p in parts for s in p["skipped"]]
    return {"format": FORMAT, "kind": kind, "count": sum(p["count"] for p in parts), "shape": list(shape),
            "dtype": dtype, "shard_size": shard_size, "labelled": parts[0]["labels_file"] is not None if parts else False,
            "num_classes": num_classes, "label_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "skipped": skipped, "num_skipped": len(skipped), "source": source,
            "shards": [{k: p[k] for k in ("file", "count", "sha256", "labels_file", "labels_sha256")} for p in parts]}


# ------------------------------------------------------------------------------------------------ reading

def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{str(folder)!r}: no {MANIFEST}; expected a dataset written by `sida dataset prepare` "
                        "(an unfinished prepare has parts/ but no manifest: run it again)") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path}: format {m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT!r}")
    return m


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(folder: Path, manifest: dict, progress: Optional[Callable[[int], None]] = None) -> None:
    """Raise :class:`DataError` naming the first shard (or labels file) whose sha256 differs from the manifest."""
    for s in manifest["shards"]:
        for key, hkey in (("file", "sha256"), ("labels_file", "labels_sha256")):
            if s.get(key) is None:
                continue
            path = Path(folder) / s[key]
            if not path.is_file():
                raise DataError(f"prepared dataset {str(folder)!r}: shard {s[key]} is missing")
            if file_sha256(path) != s[hkey]:
                raise DataError(f"prepared dataset {str(folder)!r}: shard {s[key]} is corrupt (sha256 differs from "
                                "the manifest); prepare or stage it again")
        if progress is not None:
            progress(int(s["count"]))


@dataclass(frozen=True)
class _Layout:
    folder: str
    files: tuple[str, ...]
    offsets: tuple[int, ...]  # byte offset of item 0 in each shard file (the .npy header length)
    shard_size: int
    item_shape: tuple[int, ...]
    dtype: str  # stored dtype: uint8 (images) or float16 (latents)


def _npy_offset(path: Path, count: int, item_shape: tuple[int, ...], dtype: str) -> int:
    """Header length of a C-ordered ``.npy`` file, after checking it holds (count, *item_shape) of ``dtype``."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dt = read_header(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npy shard ({e})") from None
    want = (count, *item_shape)
    if tuple(shape) != want or fortran or np.dtype(dt) != np.dtype(dtype):
        raise DataError(f"{path}: holds {np.dtype(dt)} {tuple(shape)}, the manifest says {dtype} {want}")
    if size != offset + int(np.prod(want)) * np.dtype(dtype).itemsize:
        raise DataError(f"{path}: {size} bytes, expected {offset + int(np.prod(want)) * np.dtype(dtype).itemsize} "
                        "(truncated shard)")
    return offset


class ShardedImages:
    """Items of a prepared dataset as a read-only, indexable image source: ``x[idx]`` (an int, a slice, or an
    integer array / tensor) returns float32 ``(n, C, R, R)``: images in [-1, 1] (``u8 / 127.5 - 1``, exactly as
    the in-memory loader) or latent moments. :meth:`view` selects a subset lazily (the train / holdout split).

    Reads use ``os.pread`` on per-process file descriptors (reopened after pickling or ``fork``), contiguous
    items in one call; nothing is kept beyond the batch being built.
    """

    ndim = 4
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, layout: _Layout, index: Optional[np.ndarray] = None, total: Optional[int] = None):
        self._layout = layout
        self._total = int(total if total is not None else 0)
        self._index = index  # global item ids of this view, or None for all of them
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, folder: Path, manifest: dict) -> "ShardedImages":
        folder = Path(folder)
        item_shape = tuple(int(s) for s in manifest["shape"])
        shards = manifest["shards"]
        size = int(manifest["shard_size"])
        for s in shards[:-1]:
            if int(s["count"]) != size:
                raise DataError(f"{folder}/{s['file']}: {s['count']} items, every shard but the last must hold {size}")
        offsets = tuple(_npy_offset(folder / s["file"], int(s["count"]), item_shape, manifest["dtype"]) for s in shards)
        layout = _Layout(str(folder), tuple(s["file"] for s in shards), offsets, size, item_shape, manifest["dtype"])
        return cls(layout, None, sum(int(s["count"]) for s in shards))

    # -- array-like surface used by the data path and the metrics
    def __len__(self) -> int:
        return self._total if self._index is None else len(self._index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._layout.item_shape))

    def view(self, indices) -> "ShardedImages":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        ids = idx if self._index is None else self._index[idx]
        return ShardedImages(self._layout, ids, self._total)

    def __getitem__(self, key) -> torch.Tensor:
        n = len(self)
        if isinstance(key, slice):
            pos = np.arange(n)[key]
        else:
            if isinstance(key, torch.Tensor):
                key = key.cpu().numpy()
            pos = np.asarray(key, dtype=np.int64)
            scalar = pos.ndim == 0
            pos = pos.reshape(-1)
            if pos.size and (pos.min() < -n or pos.max() >= n):
                raise IndexError(f"index out of range for {n} items")
            pos = np.where(pos < 0, pos + n, pos)
            if scalar:
                return self._read(pos)[0]
        return self._read(pos)

    # -- reading
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors are shared with the parent's offsets; pread has none,
            self._fds, self._pid = {}, os.getpid()  # but reopen anyway so closing in one does not affect the other
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(os.path.join(self._layout.folder, self._layout.files[shard]), os.O_RDONLY)
        return fd

    def _read(self, pos: np.ndarray) -> torch.Tensor:
        lay = self._layout
        ids = pos if self._index is None else self._index[pos]
        item = int(np.prod(lay.item_shape)) * np.dtype(lay.dtype).itemsize
        out = np.empty((len(ids), *lay.item_shape), dtype=lay.dtype)
        flat = out.reshape(len(ids), -1).view(np.uint8)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        i = 0
        while i < len(sorted_ids):  # runs of consecutive ids inside one shard: one pread each
            start = int(sorted_ids[i])
            shard, row = divmod(start, lay.shard_size)
            j = i + 1
            while (j < len(sorted_ids) and sorted_ids[j] == sorted_ids[j - 1] + 1
                   and sorted_ids[j] // lay.shard_size == shard):
                j += 1
            run = j - i
            data = os.pread(self._fd(shard), run * item, lay.offsets[shard] + row * item)
            if len(data) != run * item:
                raise DataError(f"{lay.folder}/{lay.files[shard]}: short read (file truncated after preparation?)")
            block = np.frombuffer(data, dtype=np.uint8).reshape(run, item)
            flat[order[i:j]] = block
            i = j
        x = torch.from_numpy(out)
        if lay.dtype == "uint8":
            return x.float().div_(127.5).sub_(1.0)
        return x.float()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def open_prepared(folder: Path) -> tuple[ShardedImages, Optional[np.ndarray], dict]:
    """(items, int64 labels or None, manifest) of a local prepared dataset; checks shard sizes and headers
    (not the hashes: :func:`verify_shards` reads every byte, ``ray_jobs.datasets`` does it once per copy)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path {str(folder)!r} is not a prepared dataset folder (data.kind='prepared')")
    manifest = read_manifest(folder)
    if not manifest["shards"]:
        raise DataError(f"{folder}: the prepared dataset holds no items")
    images = ShardedImages.open(folder, manifest)
    labels = None
    if manifest.get("labelled"):
        parts = []
        for s in manifest["shards"]:
            try:
                y = np.load(folder / s["labels_file"], allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{folder}/{s['labels_file']}: not a readable labels file ({e})") from None
            if y.shape != (int(s["count"]),):
                raise DataError(f"{folder}/{s['labels_file']}: {y.shape} labels, expected ({s['count']},)")
            parts.append(y.astype(np.int64))
        labels = np.concatenate(parts)
    return images, labels, manifest

