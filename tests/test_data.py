"""sida_core.data: built-in digits, user data readers (real files written here), splits, batch sampling."""
from __future__ import annotations

import gzip
import json
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sida_core.data import (DataError, ImageDataset, InfiniteSampler, batch_iterator, load_dataset, load_images,
                            load_digits_arrays, read_idx, split_indices)

torch.set_num_threads(1)
FASHION = Path("/usr/share/datasets/fashion-mnist")


def cfg(**kw):
    base = dict(kind="digits", path=None, resolution=8, channels=1, cond=False, num_classes=0,
                holdout_fraction=0.2, split_seed=0, xflip=False)
    base.update(kw)
    return SimpleNamespace(**base)


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, n: int = 6, size: int = 16, labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """n grey PNGs under two sub-folders, EDM dataset.json; returns the images (sorted order) and labels."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    labs = np.arange(n) % 3
    names = [f"{i // 4:05d}/img{i:08d}.png" for i in range(n)]
    for name, img in zip(names, imgs):
        write_png(root / name, img)
    meta = {"labels": [[name, int(lab)] for name, lab in zip(names, labs)] if labels else None}
    (root / "dataset.json").write_text(json.dumps(meta))
    return imgs, labs


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return struct.pack(">BBBB", 0, 0, type_code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


# ------------------------------------------------------------------------------------------------ digits

def test_digits_native_values_and_labels():
    raw, labels = load_digits_arrays()
    assert raw.shape == (1797, 8, 8) and raw.dtype == np.uint8 and raw.max() == 16
    ds = load_images(cfg())
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.float32
    assert torch.equal(ds.images[:, 0], torch.from_numpy(raw.astype(np.float32) / 8 - 1))
    assert ds.images.min() == -1 and ds.images.max() == 1
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64))) and ds.label_dim == 0


def test_digits_upsampled_is_nearest_and_rgb():
    d8 = load_images(cfg()).images
    d16 = load_images(cfg(resolution=16, channels=3)).images
    assert d16.shape == (1797, 3, 16, 16)
    assert torch.equal(d16[:, 0], d16[:, 2])
    assert torch.equal(torch.nn.functional.avg_pool2d(d16[:, :1], 2), d8)  # block mean inverts it exactly


def test_digits_bad_resolution_and_classes():
    with pytest.raises(DataError, match="data.resolution=12"):
        load_images(cfg(resolution=12))
    with pytest.raises(DataError, match="num_classes must be 10"):
        load_images(cfg(cond=True, num_classes=5))
    ds = load_images(cfg(cond=True, num_classes=10))
    assert ds.label_dim == 10


def test_split_deterministic_stratified_and_disjoint():
    tr, ho = load_dataset(cfg())
    tr2, ho2 = load_dataset(cfg())
    assert torch.equal(ho.images, ho2.images) and torch.equal(tr.labels, tr2.labels)
    assert len(tr) + len(ho) == 1797 and 355 <= len(ho) <= 364
    counts = torch.bincount(ho.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # ~20 % of each class's 174..183
    _, ho3 = load_dataset(cfg(split_seed=1))
    assert not torch.equal(ho.labels, ho3.labels) or not torch.equal(ho.images, ho3.images)
    t_idx, h_idx = split_indices(50, None, 0.3, 7)
    assert len(h_idx) == 15 and not set(t_idx) & set(h_idx) and len(set(t_idx) | set(h_idx)) == 50
    tr0, ho0 = load_dataset(cfg(holdout_fraction=0.0))
    assert len(tr0) == 1797 and len(ho0) == 0 and ho0.images.shape[1:] == (1, 8, 8)


# ----------------------------------------------------------------------------------------- folder / zip

def test_folder_reads_sorted_labels_and_resizes(tmp_path):
    imgs, labs = make_folder(tmp_path / "f")
    write_png(tmp_path / "f" / "00001" / "zz.jpg", np.zeros((16, 16, 3), np.uint8))  # JPEG, RGB, sorts last
    meta = json.loads((tmp_path / "f" / "dataset.json").read_text())
    meta["labels"].append(["00001/zz.jpg", 2])
    (tmp_path / "f" / "dataset.json").write_text(json.dumps(meta))
    ds = load_images(cfg(kind="folder", path=str(tmp_path / "f"), resolution=16, cond=True, num_classes=3))
    assert ds.images.shape == (7, 1, 16, 16) and ds.label_dim == 3
    assert torch.allclose(ds.images[:6, 0], torch.from_numpy(imgs / 127.5 - 1).float(), atol=1e-6)
    assert ds.labels.tolist() == labs.tolist() + [2]
    small = load_images(cfg(kind="folder", path=str(tmp_path / "f"), resolution=8, channels=3))
    block_mean = imgs.reshape(6, 8, 2, 8, 2).mean(axis=(2, 4))  # BOX filter = area average
    assert small.images.shape == (7, 3, 8, 8)
    assert torch.allclose(small.images[:6, 1], torch.from_numpy(block_mean / 127.5 - 1).float(), atol=1e-4)
    big = load_images(cfg(kind="folder", path=str(tmp_path / "f"), resolution=32))
    assert big.images.shape == (7, 1, 32, 32) and big.images.abs().max() <= 1


def test_folder_rgb_to_grey_uses_luma(tmp_path):
    write_png(tmp_path / "a.png", np.full((4, 4, 3), (255, 0, 0), np.uint8))
    ds = load_images(cfg(kind="folder", path=str(tmp_path), resolution=4))
    assert torch.allclose(ds.images, torch.full((1, 1, 4, 4), 0.299 * 255 / 127.5 - 1), atol=1e-5)
    assert ds.labels is None


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images(cfg(kind="folder", path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty.*no PNG/JPEG images"):
        load_images(cfg(kind="folder", path=str(tmp_path / "empty")))
    bad = tmp_path / "bad"
    write_png(bad / "ok.png", np.zeros((8, 8), np.uint8))
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        load_images(cfg(kind="folder", path=str(bad)))
    rect = tmp_path / "rect"
    write_png(rect / "r.png", np.zeros((8, 12), np.uint8))
    with pytest.raises(DataError, match=r"12x8, expected square"):
        load_images(cfg(kind="folder", path=str(rect)))
    deep = tmp_path / "deep"
    write_png(deep / "d.png", np.zeros((8, 8), np.uint16) + 300)
    with pytest.raises(DataError, match=r"d\.png: I;16.*not supported"):
        load_images(cfg(kind="folder", path=str(deep)))


def test_folder_label_errors(tmp_path):
    root = tmp_path / "f"
    make_folder(root, n=4)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"][:3]}))
    with pytest.raises(DataError, match=r"dataset\.json: no label for 1 of 4 images .*img00000003\.png"):
        load_images(cfg(kind="folder", path=str(root)))
    (root / "dataset.json").write_text(json.dumps({"labels": meta["labels"] + [["00009/x.png", 1]]}))
    with pytest.raises(DataError, match=r"dataset\.json: 5 labels but 4 images.*00009/x\.png"):
        load_images(cfg(kind="folder", path=str(root)))
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: expected EDM format"):
        load_images(cfg(kind="folder", path=str(root)))
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    with pytest.raises(DataError, match=r"data\.cond is true but .* has no labels"):
        load_images(cfg(kind="folder", path=str(root), cond=True, num_classes=3))
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"labels span 0\.\.2, expected 0\.\.1"):
        load_images(cfg(kind="folder", path=str(root), cond=True, num_classes=2))


def test_zip_matches_folder(tmp_path):
    root = tmp_path / "f"
    make_folder(root, n=5)
    zpath = tmp_path / "ds.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.rglob("*"), reverse=True):  # members out of order on purpose
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    a = load_images(cfg(kind="folder", path=str(root), resolution=8, cond=True, num_classes=3))
    b = load_images(cfg(kind="zip", path=str(zpath), resolution=8, cond=True, num_classes=3))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    (tmp_path / "fake.zip").write_bytes(b"PK nope")
    with pytest.raises(DataError, match=r"fake\.zip.*not a readable zip"):
        load_images(cfg(kind="zip", path=str(tmp_path / "fake.zip")))
    with zipfile.ZipFile(tmp_path / "noimg.zip", "w") as zf:
        zf.writestr("dataset.json", "{}")
    with pytest.raises(DataError, match=r"noimg\.zip.*no PNG/JPEG images inside"):
        load_images(cfg(kind="zip", path=str(tmp_path / "noimg.zip")))
    with pytest.raises(DataError, match="is not a file"):
        load_images(cfg(kind="zip", path=str(root)))


# ---------------------------------------------------------------------------------------------------- npz

def test_npz_layouts_and_ranges(tmp_path):
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=u8, labels=np.arange(10) % 2)
    np.savez(tmp_path / "nchw.npz", images=(u8.transpose(0, 3, 1, 2) / 127.5 - 1).astype(np.float32))
    np.savez(tmp_path / "unit.npz", images=(u8 / 255.0))
    a = load_images(cfg(kind="npz", path=str(tmp_path / "nhwc.npz"), channels=3, cond=True, num_classes=2))
    b = load_images(cfg(kind="npz", path=str(tmp_path / "nchw.npz"), channels=3))
    c = load_images(cfg(kind="npz", path=str(tmp_path / "unit.npz"), channels=3))
    assert a.images.shape == (10, 3, 8, 8) and a.labels.tolist() == [0, 1] * 5
    assert torch.allclose(a.images, b.images, atol=1e-5) and torch.allclose(a.images, c.images, atol=1e-5)
    np.savez(tmp_path / "grey.npz", images=u8[..., 0], labels=np.eye(3)[np.arange(10) % 3])  # one-hot labels
    g = load_images(cfg(kind="npz", path=str(tmp_path / "grey.npz"), resolution=4, cond=True, num_classes=3))
    assert g.images.shape == (10, 1, 4, 4) and g.labels.tolist() == (np.arange(10) % 3).tolist()


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nokey.npz", x=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"nokey\.npz.*missing key 'images'.*\['x'\]"):
        load_images(cfg(kind="npz", path=str(tmp_path / "nokey.npz")))
    np.savez(tmp_path / "count.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(DataError, match=r"count\.npz:labels: 3 labels for 4 images"):
        load_images(cfg(kind="npz", path=str(tmp_path / "count.npz")))
    np.savez(tmp_path / "chan.npz", images=np.zeros((4, 8, 8, 5), np.uint8))
    with pytest.raises(DataError, match=r"chan\.npz:images: expected 1 or 3 channels"):
        load_images(cfg(kind="npz", path=str(tmp_path / "chan.npz")))
    np.savez(tmp_path / "range.npz", images=np.full((4, 8, 8), 3.0, np.float32))
    with pytest.raises(DataError, match=r"range\.npz:images: float images must lie in \[0, 1\] or \[-1, 1\]"):
        load_images(cfg(kind="npz", path=str(tmp_path / "range.npz")))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"junk\.npz.*not a readable \.npz"):
        load_images(cfg(kind="npz", path=str(tmp_path / "junk.npz")))


# ---------------------------------------------------------------------------------------------------- idx

def write_idx_pair(d: Path, imgs: np.ndarray, labels: np.ndarray, gz: bool, prefix: str = "train") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    opener = gzip.compress if gz else (lambda b: b)
    (d / f"{prefix}-images-idx3-ubyte{suffix}").write_bytes(opener(idx_bytes(imgs)))
    (d / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(opener(idx_bytes(labels)))
    return d / f"{prefix}-images-idx3-ubyte{suffix}"


@pytest.mark.parametrize("gz", [True, False])
def test_idx_gz_and_plain(tmp_path, gz):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = (np.arange(12) % 10).astype(np.uint8)
    f = write_idx_pair(tmp_path / "d", imgs, labels, gz)
    write_idx_pair(tmp_path / "d", imgs[:3], labels[:3], gz, prefix="t10k")  # the directory prefers train-*
    assert np.array_equal(read_idx(f), imgs)
    for path in (f, tmp_path / "d"):
        ds = load_images(cfg(kind="idx", path=str(path), resolution=28, cond=True, num_classes=10))
        assert ds.images.shape == (12, 1, 28, 28) and ds.labels.tolist() == labels.tolist()
        assert torch.allclose(ds.images[:, 0], torch.from_numpy(imgs / 127.5 - 1).float(), atol=1e-6)
    small = load_images(cfg(kind="idx", path=str(f), resolution=14, channels=3))
    assert small.images.shape == (12, 3, 14, 14)


def test_idx_errors(tmp_path):
    imgs = np.zeros((4, 8, 8), np.uint8)
    f = write_idx_pair(tmp_path / "a", imgs, np.zeros(3, np.uint8), gz=False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.*3 labels for 4 images"):
        load_images(cfg(kind="idx", path=str(f)))
    bad = tmp_path / "b" / "train-images-idx3-ubyte"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00\x00\x42\x03" + b"\x00" * 20)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*wrong IDX magic number 00004203"):
        load_images(cfg(kind="idx", path=str(bad)))
    short = tmp_path / "c" / "train-images-idx3-ubyte.gz"
    short.parent.mkdir()
    short.write_bytes(gzip.compress(idx_bytes(imgs)[:-5]))
    with pytest.raises(DataError, match=r"IDX dims \(4, 8, 8\) need 256 data bytes, file has 251"):
        load_images(cfg(kind="idx", path=str(short)))
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match=r"expected one \(train-\)\*images-idx3-ubyte"):
        load_images(cfg(kind="idx", path=str(tmp_path / "e")))


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_idx_fashion_mnist():
    ds = load_images(cfg(kind="idx", path=str(FASHION), resolution=28, cond=True, num_classes=10))
    assert ds.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == [6000] * 10


# ----------------------------------------------------------------------------------------------- sampling

def test_batch_iterator_shapes_labels_and_determinism():
    tr, _ = load_dataset(cfg(cond=True, num_classes=10))
    x, y = next(batch_iterator(tr, 16, seed=3))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16, 10) and torch.equal(y.sum(1), torch.ones(16))
    x2, _ = next(batch_iterator(tr, 16, seed=3))
    x3, _ = next(batch_iterator(tr, 16, seed=4))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    unc, _ = load_dataset(cfg())
    assert next(batch_iterator(unc, 4, seed=0))[1] is None


def test_sampler_shards_disjoint_and_resume():
    n, reps = 10, 3
    per = [list(zip(range(6), InfiniteSampler(n, seed=5, rank=r, num_replicas=reps))) for r in range(reps)]
    firsts = [[i for _, i in p[:3]] for p in per]  # first epoch: 3 each (10 // 3), one left out
    flat = sum(firsts, [])
    assert len(set(flat)) == 9 and all(0 <= i < n for i in flat)
    assert len(set(i for _, i in per[0][3:6])) == 3  # epochs continue endlessly with a new permutation
    ds = ImageDataset(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1))
    it = batch_iterator(ds, 4, seed=1, rank=1, num_replicas=2)
    batches = [next(it)[0].flatten().tolist() for _ in range(5)]
    resumed = batch_iterator(ds, 4, seed=1, rank=1, num_replicas=2, start_batch=3)
    assert [next(resumed)[0].flatten().tolist() for _ in range(2)] == batches[3:]
    with pytest.raises(ValueError, match="rank"):
        InfiniteSampler(n, rank=2, num_replicas=2)


def test_xflip_mirrors_some_images():
    ds = ImageDataset(torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8).repeat(16, 1, 1, 1))
    x, _ = next(batch_iterator(ds, 32, seed=0, xflip=True))
    flipped = [bool(torch.equal(img, ds.images[0].flip(-1)) or torch.equal(img, ds.images[1].flip(-1))) for img in x]
    assert 0 < sum(flipped) < 32
