"""Prepared datasets: `sida dataset prepare` from every source kind, resumable, bad members, hashes, local and S3
(real moto server) staging, and the training path reading them on demand (sida_core.shards, ray_jobs.datasets)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ray_jobs.datasets import load_run_dataset, prepare_dataset, stage_dataset
from store.storage import RetryPolicy, Storage, StorageError
from schemas.run import DataConfig
from sida_core.data import DataError, EpochOrder, load_images
from sida_core.shards import open_prepared, read_manifest

REPO = Path(__file__).resolve().parents[1]
N, R = 23, 8  # 23 images of 8x8: shards of 5 leave a short last shard


def _images(seed=0, n=N, c=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, R, R, c), dtype=np.uint8), rng.integers(0, 4, n)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a if a.shape[2] == 3 else a[:, :, 0]).save(buf, format="PNG")
    return buf.getvalue()


def make_source(kind: str, root: Path) -> Path:
    x, y = _images()
    names = [f"00000/img{i:08d}.png" for i in range(N)]
    meta = json.dumps({"labels": [[n, int(v)] for n, v in zip(names, y)]})
    if kind == "folder":
        for n, a in zip(names, x):
            (root / "src" / n).parent.mkdir(parents=True, exist_ok=True)
            (root / "src" / n).write_bytes(_png(a))
        (root / "src" / "dataset.json").write_text(meta)
        return root / "src"
    if kind == "zip":
        with zipfile.ZipFile(root / "src.zip", "w") as zf:
            for n, a in zip(names, x):
                zf.writestr(n, _png(a))
            zf.writestr("dataset.json", meta)
        return root / "src.zip"
    if kind == "npz":
        np.savez(root / "src.npz", images=x, labels=y)
        return root / "src.npz"
    if kind == "idx":
        import struct
        (root / "idx").mkdir()
        g = x[..., 0]
        (root / "idx" / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", N, R, R) + g.tobytes())
        (root / "idx" / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", N) + y.astype(np.uint8).tobytes())  # noqa: E501
        return root / "idx"
    if kind == "latents":
        rng = np.random.default_rng(1)
        lnames = [f"00000/img-mean-std-{i:08d}.npy" for i in range(N)]
        with zipfile.ZipFile(root / "latents.zip", "w") as zf:
            for n in lnames:
                buf = io.BytesIO()
                np.save(buf, np.concatenate([rng.normal(0, 3, (4, 4, 4)), rng.uniform(0.1, 1, (4, 4, 4))]).astype(np.float32))
                zf.writestr(n, buf.getvalue())
            zf.writestr("dataset.json", json.dumps({"labels": [[n, int(v)] for n, v in zip(lnames, y)]}))
        return root / "latents.zip"
    raise AssertionError(kind)


def _cfg(kind, path, channels=3, res=R, **kw):
    return DataConfig(kind=kind, path=str(path), resolution=res, channels=channels, holdout_fraction=0.0, **kw)


@pytest.mark.parametrize("kind", ["folder", "zip", "npz", "idx", "latents"])
def test_prepare_each_source_reads_back_what_the_in_memory_loader_reads(tmp_path, kind):
    src = make_source(kind, tmp_path)
    out = prepare_dataset(str(src), str(tmp_path / "out"), shard_size=5, progress=False, log=lambda m: None)
    assert out["count"] == N and out["shards"] == 5 and out["written_shards"] == 5 and out["labelled"]
    ch, res = {"idx": (1, R), "latents": (4, 4)}.get(kind, (3, R))
    ref = load_images(_cfg(kind, src, ch, res))
    got = load_images(_cfg("prepared", tmp_path / "out", ch, res))
    assert got.latent_moments == (kind == "latents") and got.images.shape == ref.images.shape
    idx = torch.tensor([22, 0, 7, 5, 6, 21])
    if kind == "latents":  # stored as float16
        torch.testing.assert_close(got.images[idx], ref.images[idx], rtol=1e-3, atol=2e-3)
    else:  # uint8 at the native size: bit-identical to the in-memory loader
        assert torch.equal(got.images[idx], ref.images[idx]) and torch.equal(got.images[:], ref.images)
    assert torch.equal(got.labels, ref.labels)
    m = read_manifest(tmp_path / "out")
    assert m["kind"] == ("latents" if kind == "latents" else "images") and m["count"] == N
    assert sum(m["label_histogram"].values()) == N and [s["count"] for s in m["shards"]] == [5, 5, 5, 5, 3]


def test_prepare_resumes_after_an_interruption_and_refuses_another_source(tmp_path):
    src = make_source("npz", tmp_path)
    out = tmp_path / "out"
    prepare_dataset(str(src), str(out), shard_size=5, progress=False, log=lambda m: None)
    full = (out / "manifest.json").read_text()
    hashes = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    # an interrupted prepare: the last two shards' records and the manifest never got written
    for p in ("manifest.json", "parts/00003.json", "parts/00004.json", "images-00004.npy"):
        (out / p).unlink()
    res = prepare_dataset(str(src), str(out), shard_size=5, progress=False, log=lambda m: None)
    assert (res["resumed_shards"], res["written_shards"]) == (3, 2)
    assert (out / "manifest.json").read_text() == full
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == hashes
    again = prepare_dataset(str(src), str(out), shard_size=5, progress=False, log=lambda m: None)
    assert again["written_shards"] == 0
    np.savez(tmp_path / "other.npz", images=_images(seed=5)[0])
    with pytest.raises(DataError, match="already holds another prepared dataset"):
        prepare_dataset(str(tmp_path / "other.npz"), str(out), shard_size=5, progress=False, log=lambda m: None)


def test_bad_members_fail_with_their_name_or_are_skipped_and_counted(tmp_path):
    src = make_source("folder", tmp_path)
    bad = src / "00000/img00000003.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    (src / "00000/img00000009.png").write_bytes(_png(np.zeros((6, 6, 3), np.uint8)))  # wrong size
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "dataset", "prepare", str(src), "--out",
                        str(tmp_path / "a"), "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "img00000003.png" in r.stderr
    assert "--skip-bad" in r.stderr and not (tmp_path / "a" / "manifest.json").exists()
    out = prepare_dataset(str(src), str(tmp_path / "b"), shard_size=5, skip_bad=True, progress=False, log=lambda m: None)
    m = read_manifest(tmp_path / "b")
    assert out["count"] == N - 2 and m["num_skipped"] == 2
    assert [s["name"] for s in m["skipped"]] == ["00000/img00000003.png", "00000/img00000009.png"]
    assert "6x6" in m["skipped"][1]["reason"]
    assert [s["count"] for s in m["shards"]] == [5, 5, 5, 5, 1]  # full shards: bad members do not leave holes
    ds = load_images(_cfg("prepared", tmp_path / "b"))
    ref = load_images(_cfg("npz", make_source("npz", tmp_path)))
    keep = [i for i in range(N) if i not in (3, 9)]
    assert torch.equal(ds.images[:], ref.images[keep]) and torch.equal(ds.labels, ref.labels[keep])


def test_resize_and_shape_checks(tmp_path):
    src = make_source("npz", tmp_path)
    prepare_dataset(str(src), str(tmp_path / "o"), resolution=4, channels=1, progress=False, log=lambda m: None)
    assert read_manifest(tmp_path / "o")["shape"] == [1, 4, 4]
    with pytest.raises(DataError, match=r"shape \(1, 4, 4\).*data.resolution=8"):
        load_images(_cfg("prepared", tmp_path / "o", channels=1, res=8))
    with pytest.raises(DataError, match="must be staged"):
        load_images(_cfg("prepared", "s3://bucket/ds"))
    with pytest.raises(DataError, match="do not apply to latents"):  # refused before --out is created
        prepare_dataset(str(make_source("latents", tmp_path)), str(tmp_path / "never"), resolution=4, progress=False)
    assert not (tmp_path / "never").exists()


def test_corrupt_local_shard_is_named(tmp_path):
    src = make_source("npz", tmp_path)
    prepare_dataset(str(src), str(tmp_path / "o"), shard_size=5, progress=False, log=lambda m: None)
    shard = tmp_path / "o" / "images-00002.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x10  # one flipped bit
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard images-00002.npy is corrupt"):
        stage_dataset(str(tmp_path / "o"), cache_root=tmp_path / "cache")
    (tmp_path / "o" / "images-00004.npy").write_bytes(b"\x93NUMPY")  # truncated: caught on open, no hash needed
    with pytest.raises(DataError, match="images-00004.npy"):
        open_prepared(tmp_path / "o")


def test_s3_prepare_stage_once_per_node_and_corrupt_object(tmp_path, s3_bucket):
    src = make_source("zip", tmp_path)
    uri = f"{s3_bucket.uri}/datasets/tiny"
    prepare_dataset(str(src), uri, shard_size=5, endpoint_url=s3_bucket.endpoint_url, progress=False, log=lambda m: None)
    cache = tmp_path / "cache"
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(stage_dataset(uri, endpoint_url=s3_bucket.endpoint_url,
                                                                            cache_root=cache))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and results[0].parent == cache / "datasets"  # one copy for the node
    mtimes = {p: p.stat().st_mtime_ns for p in results[0].glob("*.npy")}
    assert stage_dataset(uri, endpoint_url=s3_bucket.endpoint_url, cache_root=cache) == results[0]
    assert {p: p.stat().st_mtime_ns for p in results[0].glob("*.npy")} == mtimes  # not copied again
    ref = load_images(_cfg("zip", src))
    assert torch.equal(load_images(_cfg("prepared", results[0])).images[:], ref.images)

    # a bit flipped in the stored object: the copy names the shard and fails
    store = Storage(uri, endpoint_url=s3_bucket.endpoint_url)
    data = bytearray(store.read_bytes("images-00001.npy"))
    data[-1] ^= 1
    store.write_bytes("images-00001.npy", bytes(data))
    store.write_bytes("manifest.json", store.read_bytes("manifest.json") + b"\n")  # a new content key: fresh copy
    with pytest.raises(DataError, match=r"shard images-00001.npy is corrupt"):
        stage_dataset(uri, endpoint_url=s3_bucket.endpoint_url, cache_root=cache)


def test_s3_outage_while_staging_is_retried_then_fails_in_one_line(tmp_path, s3_bucket):
    src = make_source("npz", tmp_path)
    uri = f"{s3_bucket.uri}/ds"
    prepare_dataset(str(src), uri, shard_size=5, endpoint_url=s3_bucket.endpoint_url, progress=False, log=lambda m: None)
    fast = RetryPolicy(attempts=4, initial_backoff_s=0.3, max_backoff_s=1.0, connect_timeout_s=1, request_timeout_s=1)
    s3_bucket.server.pause()
    timer = threading.Timer(1.5, s3_bucket.server.resume)  # back within the retry budget
    timer.start()
    folder = stage_dataset(Storage(uri, endpoint_url=s3_bucket.endpoint_url, retry=fast), cache_root=tmp_path / "c1")
    timer.join()
    assert read_manifest(folder)["count"] == N
    s3_bucket.server.pause()  # and now down for good
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="failed 2 times"):
        stage_dataset(Storage(uri, endpoint_url=s3_bucket.endpoint_url,
                              retry=RetryPolicy(attempts=2, initial_backoff_s=0.1, connect_timeout_s=1,
                                                request_timeout_s=1)), cache_root=tmp_path / "c2")
    assert time.monotonic() - t0 < 30


def test_epoch_order_sees_each_image_once_per_epoch_whatever_the_split():
    order = EpochOrder(1000, seed=3)
    # 2 workers x 2 rounds x 16 images per micro-batch, positions as Distiller._real_batch takes them
    seen = []
    for step in range(1000 // 64 + 2):
        for rank in range(2):
            for r in range(2):
                seen.append(EpochOrder(1000, seed=3).indices(step * 64 + (rank * 2 + r) * 16, 16))
    flat = np.concatenate(seen)
    assert sorted(flat[:1000]) == list(range(1000))  # epoch 0: every image exactly once
    assert np.array_equal(flat, order.indices(0, len(flat)))  # same stream as one process reading it in order
    assert len(set(flat[1000:1064])) == 64 and not np.array_equal(flat[1000:1064], flat[:64])  # epoch 1 reshuffled


def test_distillation_reads_a_prepared_dataset_with_xflip(tmp_path, monkeypatch):
    """A SiDA run on a prepared dataset takes the same real images as on the in-memory source, and xflip mirrors
    about half of them (drawn per step, so a resumed run flips the same ones)."""
    from schemas.loader import load_run_config
    from sida_core.distill import Distiller, hyper_from_config
    from tests.recipes import CONFIG, TINY_DISTILL

    src = make_source("npz", tmp_path)
    prepare_dataset(str(src), str(tmp_path / "o"), shard_size=5, progress=False, log=lambda m: None)
    batches = {}
    common = TINY_DISTILL + [f"data.resolution={R}", "data.channels=3", f"teacher.path={tmp_path}",
                            "metric.enabled=false"]  # the teacher is never loaded here
    for name, data in (("npz", ["data.kind=npz", f"data.path={src}"]),
                       ("prepared", ["data.kind=prepared", f"data.path={tmp_path / 'o'}"]),
                       ("xflip", ["data.kind=prepared", f"data.path={tmp_path / 'o'}", "data.xflip=true"])):
        cfg = load_run_config(CONFIG, common + data)
        train, _ = load_run_dataset(cfg)
        h = hyper_from_config(cfg)
        d = Distiller.__new__(Distiller)  # only the real-batch path: no networks needed
        d.h, d.rank, d.rounds, d.cur_nimg, d.device = h, 0, 1, 0, torch.device("cpu")
        d.real_images, d.real_labels, d.real_encode, d.label_dim = train.images, None, None, 0
        d.real_order, d.perf = EpochOrder(len(train), h.seed), h.performance
        batches[name] = d._real_batch(torch.Generator().manual_seed(0), 0)[0]
    assert torch.equal(batches["npz"], batches["prepared"])
    flipped = [not torch.equal(a, b) for a, b in zip(batches["xflip"], batches["prepared"])]
    assert all(torch.equal(a, b) or torch.equal(a, b.flip(-1)) for a, b in zip(batches["xflip"], batches["prepared"]))
    assert 0 < sum(flipped) < len(flipped)


def test_fid_stats_of_a_prepared_dataset_equal_those_of_its_source(tmp_path):
    from pipelines.fid_stats import run_fid_stats
    from store.reference import read_reference

    src = make_source("idx", tmp_path)  # grey 8x8: the FD-digits feature space
    prepare_dataset(str(src), str(tmp_path / "o"), shard_size=5, progress=False, log=lambda m: None)
    a = run_fid_stats(str(src), str(tmp_path / "ref-src"), metric="fd_digits", resolution=R, channels=1, progress=False)
    b = run_fid_stats(str(tmp_path / "o"), str(tmp_path / "ref-prep"), metric="fd_digits", progress=False)
    assert a["num_images"] == b["num_images"] == N and (b["resolution"], b["channels"]) == (R, 1)
    ra, rb = read_reference(a["out"]), read_reference(b["out"])
    assert ra.manifest["dataset_sha256"] == rb.manifest["dataset_sha256"] and np.array_equal(ra.mu, rb.mu)
