"""Real images for teacher training, distillation (SiDA's adversarial term) and metrics.

``load_dataset(cfg)`` reads the built-in digits or user data (image folder, EDM-style zip, ``.npz``, IDX)
into an in-memory :class:`ImageDataset` (float32 in [-1, 1], NCHW) and splits it into (train, holdout).
``batch_iterator`` yields endless seeded batches, sharded by data-parallel rank.

Decisions (see also ``DataError`` messages):

* digits: x / 8 - 1 maps 0..16 to [-1, 1]; resolution must be a multiple of 8 and is reached by
  nearest-neighbour (block) upsampling, which area downsampling (the FD-digits metric) inverts exactly.
* user images: must be square (crop them first, e.g. EDM's ``dataset_tool.py --transform=center-crop``);
  resized per channel in float with PIL BOX (area) when shrinking, BICUBIC when enlarging; grey -> RGB
  replicates, RGB -> grey uses ITU-R 601 luma (PIL's ``L``); an alpha channel is dropped.
* ``.npz`` float images are read as [-1, 1] when any value is negative, else as [0, 1]; integer images as 0..255.
* labels are kept whenever the source has them (for the stratified split); ``cfg.cond`` additionally
  requires them and checks they lie in [0, num_classes).
"""
from __future__ import annotations

import gzip
import io
import json
import math
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, cast

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DIGITS_PATH = Path(__file__).parent / "assets" / "digits.npz"
DIGITS_CLASSES = 10
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


class DataError(ValueError):
    """A data source is missing, malformed or does not match the configuration."""


@dataclass
class ImageDataset:
    """In-memory images (float32, (N, C, R, R), in [-1, 1]) with optional int64 labels (N,).

    ``label_dim`` is the width of the one-hot labels fed to networks (0 for unconditional use).
    """

    images: torch.Tensor  # or a sida_core.shards.ShardedImages (data.kind 'prepared'): same indexing, read on demand
    labels: Optional[torch.Tensor] = None
    label_dim: int = 0
    name: str = ""
    latent_moments: bool = False  # images hold SD-VAE moments (N, 2C, R, R); see sida_core.latents

    @property
    def real_encode(self):
        """What turns a stored batch into network inputs with fresh noise (latent moments), or None (images)."""
        if not self.latent_moments:
            return None
        from sida_core.latents import encode_moments

        return encode_moments

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    @property
    def channels(self) -> int:
        """Channels of a network input (latent moments store mean and std: twice as many)."""
        return int(self.images.shape[1]) // (2 if self.latent_moments else 1)

    def subset(self, indices) -> "ImageDataset":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        labels = None if self.labels is None else self.labels[idx]
        images = (self.images[idx] if isinstance(self.images, torch.Tensor)
                  else self.images.view(idx.numpy()))  # prepared datasets: a lazy view, nothing is read
        return ImageDataset(images, labels, self.label_dim, self.name, self.latent_moments)

    def one_hot(self, indices) -> Optional[torch.Tensor]:
        """One-hot float32 labels (len(indices), label_dim), or None when label_dim is 0."""
        if self.label_dim == 0:
            return None
        labels = cast(torch.Tensor, self.labels)  # a dataset with label_dim > 0 carries labels
        return torch.nn.functional.one_hot(labels[indices], self.label_dim).float()


# ----------------------------------------------------------------------------------------------- readers

def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled UCI optical digits: images uint8 (1797, 8, 8) in 0..16, labels uint8 (1797,)."""
    with np.load(DIGITS_PATH) as z:
        return z["images"], z["labels"]


def _decode_image(data, name: str) -> np.ndarray:
    """Decode one PNG/JPEG (path or file object) to uint8 HWC with 1 or 3 channels."""
    img: Image.Image  # the opened file, then possibly its L / RGB conversion
    try:
        with Image.open(data) as img:
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                raise DataError(f"{name}: {img.mode} (16-bit/float) images are not supported; save 8-bit grey or RGB")
            if img.mode not in ("L", "RGB"):
                grey = img.mode in ("1", "LA", "La") or (img.mode in ("P", "PA") and _palette_is_grey(img))
                img = img.convert("L" if grey else "RGB")
            arr = np.asarray(img, dtype=np.uint8)
    except DataError:
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object for a zip member, not the member
        raise DataError(f"{name}: cannot decode image (not a PNG or JPEG file, or damaged)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _palette_is_grey(img: Image.Image) -> bool:
    pal = np.asarray(img.convert("RGB"))
    return bool((pal[..., 0] == pal[..., 1]).all() and (pal[..., 1] == pal[..., 2]).all())


def _read_dataset_json(text: bytes | str, where: str) -> Optional[dict[str, int]]:
    """EDM's ``dataset.json``: {"labels": [[relpath, int], ...]} or {"labels": null}."""
    def bad(got: str) -> DataError:
        return DataError(f'{where}: expected EDM format {{"labels": [["00000/img00000000.png", 6], ...]}}, got {got}')

    try:
        data = json.loads(text)
    except ValueError as e:  # (UnicodeDecodeError too)
        raise bad(f"invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}")
    labels = data.get("labels")
    if labels is None:
        return None
    if not isinstance(labels, list):
        raise bad(f"labels of type {type(labels).__name__}")
    table = {}
    for i, entry in enumerate(labels):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], int) and not isinstance(entry[1], bool)):
            raise bad(f"labels[{i}] = {json.dumps(entry)[:80]} (not a [file name, integer label] pair)")
        table[entry[0].replace("\\", "/")] = entry[1]
    return table


def _match_labels(names: Sequence[str], table: Optional[dict[str, int]], where: str) -> Optional[np.ndarray]:
    if table is None:
        return None
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"{where}: no label for {len(missing)} of {len(names)} images (first: {missing[0]!r})")
    if len(table) != len(names):
        extra = sorted(set(table) - set(names))
        raise DataError(f"{where}: {len(table)} labels but {len(names)} images; labels without an image "
                        f"(first: {extra[0]!r})")
    return np.array([table[n] for n in names], dtype=np.int64)


class Source:
    """One dataset read member by member: ``members`` (names, in order), ``labels`` aligned with them (or None) and
    ``read(i)``, which decodes member ``i`` (HWC in 0..255 for images, (8, h, w) float32 moments for latents) or
    raises :class:`DataError` naming it. Used whole by :func:`load_images` and shard by shard by
    ``sida dataset prepare`` (``sida_core.shards``)."""

    def __init__(self, kind: str, path: Path, members: list[str], labels: Optional[np.ndarray],
                 read: Callable[[int], np.ndarray], close: Callable[[], None] = lambda: None):
        self.kind, self.path, self.members, self.labels = kind, path, members, labels
        self.read, self.close = read, close

    def __len__(self) -> int:
        return len(self.members)

    def read_all(self) -> list[np.ndarray]:
        try:
            return [self.read(i) for i in range(len(self))]
        finally:
            self.close()


def open_source(kind: str, path: Path) -> Source:
    """A :class:`Source` over an image folder, an EDM zip, an ``.npz``, IDX files or an EDM2 latent zip.

    Folders and zips are read member by member (a member that cannot be decoded fails only its own read);
    ``.npz`` and IDX are single arrays and are read whole, as numpy must.
    """
    path = Path(path).expanduser()
    if kind == "folder":
        if not path.is_dir():
            raise DataError(f"data.path {str(path)!r} is not a directory (data.kind='folder')")
        files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(f"{str(path)!r}: no PNG/JPEG images found (searched recursively)")
        names = [p.relative_to(path).as_posix() for p in files]
        meta = path / "dataset.json"
        table = _read_dataset_json(meta.read_bytes(), str(meta)) if meta.is_file() else None
        return Source(kind, path, names, _match_labels(names, table, str(meta)),
                      lambda i: _decode_image(files[i], str(files[i])))
    if kind in ("zip", "latents"):
        if not path.is_file():
            raise DataError(f"data.path {str(path)!r} is not a file (data.kind={kind!r})")
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{str(path)!r}: not a readable zip file ({e})") from None
        want = (".npy",) if kind == "latents" else IMAGE_EXTENSIONS
        names = sorted(n for n in zf.namelist() if not n.endswith("/") and Path(n).suffix.lower() in want)
        if not names:
            zf.close()
            raise DataError(f"{str(path)!r}: no .npy latents inside the zip (expected EDM2 dataset_tool encode output)"
                            if kind == "latents" else f"{str(path)!r}: no PNG/JPEG images inside the zip")
        where = f"{path}:dataset.json"
        table = _read_dataset_json(zf.read("dataset.json"), where) if "dataset.json" in zf.namelist() else None
        labels = _match_labels(names, table, where)

        def read_member(i: int) -> np.ndarray:
            name = f"{path}:{names[i]}"
            try:
                data = zf.read(names[i])
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise DataError(f"{name}: cannot read zip member ({e})") from None
            return _read_moments(data, name) if kind == "latents" else _decode_image(io.BytesIO(data), name)

        return Source(kind, path, names, labels, read_member, zf.close)
    if kind in ("npz", "idx"):
        x, labels = read_npz(path) if kind == "npz" else read_idx_dataset(path)
        return Source(kind, path, [f"{path.name}[{i}]" for i in range(len(x))], labels, lambda i: x[i])
    raise DataError(f"kind must be one of folder|zip|npz|idx|latents, got {kind!r}")


def _read_moments(data: bytes, name: str) -> np.ndarray:
    """One EDM2 latent member: (8, h, w) float32 VAE moments (mean and std of 4 channels), read without pickle."""
    from sida_core.latents import LATENT_CHANNELS

    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{name}: not a readable .npy array ({e})") from None
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[0] != 2 * LATENT_CHANNELS:
        raise DataError(f"{name}: latent moments of shape {a.shape}, expected ({2 * LATENT_CHANNELS}, h, w) (mean and "
                        f"std of {LATENT_CHANNELS} channels)")
    if not np.isfinite(a).all():
        raise DataError(f"{name}: latent moments contain NaN or inf")
    return a.astype(np.float32)


def read_folder(path: Path) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """PNG/JPEG files under ``path`` (recursive, sorted by relative path) and labels from ``dataset.json``."""
    src = open_source("folder", path)
    return src.read_all(), src.labels


def read_zip(path: Path) -> tuple[list[np.ndarray], Optional[np.ndarray]]:
    """An EDM-style zip of PNG/JPEG files with an optional ``dataset.json`` at its root."""
    src = open_source("zip", path)
    return src.read_all(), src.labels


def read_npz(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``images`` (N,H,W), (N,H,W,C) or (N,C,H,W), C in {1,3}; uint8 0..255 or float; optional ``labels``.

    Returns float32 NHWC in [0, 255] and int64 labels (or None).
    """
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} is not a file (data.kind='npz')")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{str(path)!r}: not a readable .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{str(path)!r}: expected an .npz archive with key 'images', got a single .npy array")
    with z:
        if "images" not in z.files:
            raise DataError(f"{str(path)!r}: missing key 'images' (keys: {sorted(z.files)})")
        x = z["images"]
        y = z["labels"] if "labels" in z.files else None
    where = f"{path}:images"
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"{where}: expected shape (N,H,W), (N,H,W,C) or (N,C,H,W) with N > 0, got {x.shape}")
    if x.shape[-1] not in (1, 3) and x.shape[1] in (1, 3):
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] not in (1, 3):
        raise DataError(f"{where}: expected 1 or 3 channels (NHWC or NCHW), got shape {x.shape}")
    x = _npz_to_0_255(x, where)
    labels = None
    if y is not None:
        labels = _npz_labels(y, len(x), f"{path}:labels")
    return x, labels


def _npz_to_0_255(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        lo: float
        hi: float
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer images must lie in 0..255, got {lo}..{hi}")
        return x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: expected uint8 or float images, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise DataError(f"{where}: float images must lie in [0, 1] or [-1, 1], got [{lo:.4g}, {hi:.4g}]; "
                        "store uint8 0..255 instead")
    return (x + 1.0) * 127.5 if lo < 0 else x * 255.0


def _npz_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim == 2:  # one-hot / soft labels
        y = y.argmax(axis=1)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where}: expected integer labels of shape (N,) or one-hot (N, K), got {y.dtype} {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} images")
    if np.issubdtype(y.dtype, np.floating) and not np.all(y == np.round(y)):
        raise DataError(f"{where}: labels must be whole numbers")
    return y.astype(np.int64)


IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (MNIST format, gzip or plain): magic 0x0000 TT NN, NN big-endian uint32 dims, data."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{str(path)!r}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{str(path)!r}: wrong IDX magic number {raw[:4].hex() or '(empty)'}; expected 0000TTNN "
                        "(TT type code 08/09/0b/0c/0d/0e, NN number of dims)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{str(path)!r}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    need = math.prod(dims) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != need:
        raise DataError(f"{str(path)!r}: IDX dims {dims} need {need} data bytes, file has {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _idx_files(path: Path) -> tuple[Path, Optional[Path]]:
    """Images file and its labels file: ``path`` is an ``*-images-idx3-ubyte[.gz]`` file or a directory."""
    if path.is_dir():
        cands = sorted(p for p in path.iterdir() if "images-idx" in p.name)
        train = [p for p in cands if p.name.startswith("train")]
        if train:
            cands = train
        if len(cands) != 1:
            found = ", ".join(p.name for p in cands) or "none"
            raise DataError(f"{str(path)!r}: expected one (train-)*images-idx3-ubyte[.gz] file, found: {found}")
        path = cands[0]
    elif not path.is_file():
        raise DataError(f"data.path {str(path)!r} does not exist")
    if "images-idx" not in path.name:
        return path, None
    base = path.name.replace("images-idx3", "labels-idx1").removesuffix(".gz")
    for name in (base, base + ".gz"):
        if (path.parent / name).is_file():
            return path, path.parent / name
    return path, None


def read_idx_dataset(path: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """IDX images (N,H,W) or (N,H,W,C) as float32 NHWC in [0, 255], labels from the matching labels file."""
    img_path, lab_path = _idx_files(path)
    x = read_idx(img_path)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{str(img_path)!r}: expected IDX images of shape (N,H,W) or (N,H,W,1|3), got {x.shape}")
    x = _npz_to_0_255(x, str(img_path))
    labels = None
    if lab_path is not None:
        y = read_idx(lab_path)
        if y.ndim != 1:
            raise DataError(f"{str(lab_path)!r}: expected 1-D IDX labels, got shape {y.shape}")
        if len(y) != len(x):
            raise DataError(f"{str(lab_path)!r}: {len(y)} labels for {len(x)} images in {img_path.name}")
        labels = y.astype(np.int64)
    return x, labels


# ------------------------------------------------------------------------------------------- conversion

def _convert(images, names_where: str, resolution: int, channels: int,
             names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """HWC images in [0, 255] (array or list) -> float32 (N, C, R, R) in [-1, 1]. ``names``: the images' file
    names as messages give them (``FOLDER/FILE``, ``ZIP:MEMBER``); else they are named by index."""
    out = np.empty((len(images), resolution, resolution, channels), dtype=np.float32)
    for i, img in enumerate(images):
        h, w, c = img.shape
        if h != w:
            which = f"{names_where}: image {i}" if names is None else names[i]
            raise DataError(f"{which} is {w}x{h}, expected square; crop it first "
                            "(e.g. EDM dataset_tool.py --transform=center-crop)")
        img = np.asarray(img, dtype=np.float32)
        if c == 3 and channels == 1:
            img = img @ np.asarray(LUMA, dtype=np.float32)[:, None]
        elif c == 1 and channels == 3:
            img = np.repeat(img, 3, axis=2)
        if h != resolution:
            flt = Image.Resampling.BOX if h > resolution else Image.Resampling.BICUBIC  # == Image.BOX / Image.BICUBIC
            img = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, k])).resize((resolution, resolution), flt))
                            for k in range(channels)], axis=2)
        out[i] = img
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return (x / 127.5 - 1.0).clamp_(-1.0, 1.0)


def _digits(resolution: int, channels: int) -> tuple[torch.Tensor, np.ndarray]:
    if resolution % 8:
        raise DataError(f"data.resolution={resolution} is not supported for the built-in digits "
                        "(native 8x8): use a multiple of 8 (nearest-neighbour upsampling)")
    imgs, labels = load_digits_arrays()
    x = torch.from_numpy(imgs.astype(np.float32) / 8.0 - 1.0)[:, None]
    if resolution != 8:
        x = torch.nn.functional.interpolate(x, scale_factor=resolution // 8, mode="nearest")
    return x.repeat(1, channels, 1, 1).contiguous(), labels.astype(np.int64)


def split_indices(n: int, labels: Optional[np.ndarray], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, holdout) index arrays, sorted; stratified by label when labels are given."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.holdout_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    hold = [rng.permutation(g)[: int(round(fraction * len(g)))] for g in groups]
    mask = np.zeros(n, dtype=bool)
    mask[np.concatenate(hold)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def load_images(cfg) -> ImageDataset:
    """All images of the source described by ``cfg`` (a DataConfig or anything with its attributes)."""
    res, ch = int(cfg.resolution), int(cfg.channels)
    kind = cfg.kind
    if ch not in (1, 3, 4) or (kind != "prepared" and (ch == 4) != (kind == "latents")):
        raise DataError(f"data.channels must be 1 or 3 for images and 4 for data.kind 'latents', got {ch} "
                        f"with data.kind {kind!r}")
    latent = kind == "latents"
    if kind == "prepared":
        x, labels, name, latent = _prepared(cfg, res, ch)
    elif latent:
        x, labels, name = _latents(cfg, res)
    elif kind == "digits":
        x, labels = _digits(res, ch)
        name = "digits"
    else:
        if not cfg.path:
            raise DataError(f"data.path is required for data.kind={kind!r}")
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(f"data.path {str(path)!r} does not exist (data.kind={kind!r})")
        if kind not in ("folder", "zip", "npz", "idx"):
            raise DataError(f"data.kind must be one of digits|latents|prepared|folder|zip|npz|idx, got {kind!r}")
        names = None
        raw: list[np.ndarray] | np.ndarray
        if kind in ("folder", "zip"):  # member by member (read_folder / read_zip): a non-square image is named
            src = open_source(kind, path)
            raw, labels = src.read_all(), src.labels
            names = [f"{path}{'/' if kind == 'folder' else ':'}{m}" for m in src.members]
        else:
            raw, labels = read_npz(path) if kind == "npz" else read_idx_dataset(path)
        x = _convert(raw, str(path), res, ch, names)
        name = str(path)
    label_dim = 0
    if cfg.cond:
        if labels is None:
            raise DataError(f"data.cond is true but {name!r} has no labels (folder/zip: dataset.json; "
                            "npz: key 'labels'; idx: *-labels-idx1-ubyte file)")
        if kind == "digits" and int(cfg.num_classes) != DIGITS_CLASSES:
            raise DataError(f"data.num_classes must be {DIGITS_CLASSES} for the built-in digits, got {cfg.num_classes}")
        label_dim = int(cfg.num_classes)
    if labels is not None and len(labels):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or (cfg.cond and hi >= label_dim):
            raise DataError(f"{name!r}: labels span {lo}..{hi}, expected 0..{(label_dim or hi + 1) - 1} "
                            f"(data.num_classes={cfg.num_classes})")
    lab = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return ImageDataset(x, lab, label_dim, name, latent)


def _latents(cfg, res: int) -> tuple[torch.Tensor, Optional[np.ndarray], str]:
    """EDM2 latent zip: VAE moments as stored (no resizing: data.resolution is the latent resolution)."""
    if not cfg.path:
        raise DataError("data.path is required for data.kind='latents'")
    src = open_source("latents", Path(cfg.path))
    arrays = src.read_all()
    for name, a in zip(src.members, arrays):
        if a.shape != arrays[0].shape:
            raise DataError(f"{src.path}:{name}: latent moments of shape {a.shape}, expected {arrays[0].shape}")
    moments = np.stack(arrays)
    if moments.shape[-1] != res or moments.shape[-2] != res:
        raise DataError(f"{src.path}: latents are {moments.shape[-2]}x{moments.shape[-1]}, data.resolution is {res} "
                        f"(for latents it is the latent resolution, e.g. 64 for 512x512 images)")
    return torch.from_numpy(moments), src.labels, str(src.path)


def _prepared(cfg, res: int, ch: int):
    """A dataset written by ``sida dataset prepare`` (a local folder; ``ray_jobs.datasets.stage`` copies an
    ``s3://`` one to the node first): read on demand, never resized at load time."""
    from sida_core.shards import open_prepared

    if not cfg.path:
        raise DataError("data.path is required for data.kind='prepared'")
    if "://" in str(cfg.path):
        raise DataError(f"data.path {cfg.path!r}: a remote prepared dataset must be staged to this node first "
                        "(sida train / distill / fid-stats do it; in code: ray_jobs.datasets.local_data_config)")
    images, labels, manifest = open_prepared(Path(cfg.path))
    latent = manifest["kind"] == "latents"
    want = (2 * ch, res, res) if latent else (ch, res, res)
    have = tuple(manifest["shape"])
    if (ch == 4) != latent or have != want:
        what = "latent moments" if latent else "images"
        raise DataError(f"data.path {cfg.path!r}: prepared {what} of shape {have}, but data.channels={ch} and "
                        f"data.resolution={res} ask for {want if (ch == 4) == latent else 'the other kind'}; "
                        "prepare again with --resolution/--channels, or set them to match")
    return images, labels, str(cfg.path), latent


def load_dataset(cfg) -> tuple[ImageDataset, ImageDataset]:
    """(train, holdout) split of ``load_images(cfg)``: seeded by ``cfg.split_seed``, stratified when labelled."""
    ds = load_images(cfg)
    labels = None if ds.labels is None else ds.labels.numpy()
    tr, ho = split_indices(len(ds), labels, float(cfg.holdout_fraction), int(cfg.split_seed))
    if len(tr) == 0:
        raise DataError(f"{ds.name!r}: no training images left after holding out {cfg.holdout_fraction}")
    return ds.subset(tr), ds.subset(ho)


# ---------------------------------------------------------------------------------------------- sampling

class EpochOrder:
    """Which real image each position of the endless draw stream gets: position ``p`` falls in epoch
    ``p // n`` and takes item ``perm_e[p % n]``, ``perm_e`` a permutation seeded by (seed, epoch).

    A pure function of (seed, position): every image appears exactly once per epoch however the positions are
    split among workers and accumulation rounds, and a resumed run continues the same stream. The two most recent
    permutations are kept (a batch may straddle an epoch boundary).
    """

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"need at least one real image, got {n}")
        self.n, self.seed = int(n), int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, 0x5EA1DA7A, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Item ids of positions ``start .. start + count - 1`` (int64)."""
        pos = np.arange(int(start), int(start) + int(count), dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.n)
        out = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless indices: a fresh seeded permutation per epoch, rank r takes positions r, r+R, ... of it.

    All ranks share ``seed`` so their shards are disjoint within an epoch; each epoch drops the
    ``n % num_replicas`` tail so every rank sees the same count. ``start`` skips that many indices of
    this rank's stream (resume without replaying).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, num_replicas: int = 1, shuffle: bool = True,
                 start: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if n < num_replicas:
            raise ValueError(f"dataset of {n} images is too small for {num_replicas} replicas")
        self.n, self.seed, self.rank, self.num_replicas, self.shuffle = n, seed, rank, num_replicas, shuffle
        self.per_epoch = n // num_replicas
        self.start = start

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.start, self.per_epoch)
        while True:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                     else np.arange(self.n))
            mine = order[: self.per_epoch * self.num_replicas][self.rank::self.num_replicas]
            for i in mine[pos:]:
                yield int(i)
            epoch, pos = epoch + 1, 0


def batch_iterator(dataset: ImageDataset, batch_size: int, seed: int = 0, rank: int = 0, num_replicas: int = 1,
                   *, start_batch: int = 0, xflip: bool = False
                   ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Endless (images (B,C,R,R), one-hot labels (B,label_dim) or None) batches for this rank's shard.

    ``start_batch`` resumes after that many batches; ``xflip`` mirrors each image with probability 1/2
    (seeded by seed, rank and batch number).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(InfiniteSampler(len(dataset), seed, rank, num_replicas, start=start_batch * batch_size))
    step = start_batch
    while True:
        idx = torch.tensor([next(it) for _ in range(batch_size)], dtype=torch.int64)
        x = dataset.images[idx]
        if xflip:
            flip = torch.from_numpy(np.random.default_rng([seed, rank, step]).random(batch_size) < 0.5)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        yield x, dataset.one_hot(idx)
        step += 1
