"""``sida fid-stats``: reference statistics of a dataset (digits train split or a path), stored with their
manifest through ``store.reference`` (layout, writer and ``read_reference`` live there, next to storage).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from store.reference import ReferenceStatsError, read_reference, write_reference

__all__ = ["ReferenceStatsError", "infer_kind", "load_reference_images", "read_reference", "run_fid_stats",
           "write_reference"]


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
    raise ReferenceStatsError(f"cannot tell the kind of {str(path)!r}; pass --kind {{folder,zip,npz,idx}}")


def load_reference_images(dataset: str, *, kind: Optional[str] = None, resolution: Optional[int] = None,
                          channels: Optional[int] = None, max_images: Optional[int] = None,
                          endpoint_url: Optional[str] = None):
    """(images (N, C, R, R) in [-1, 1], description) of ``digits`` (the train split FD-digits' classifier
    was trained on) or of every image under a path (sida_core.data's loaders, no holdout)."""
    from pydantic import ValidationError

    from schemas.run import DataConfig
    from sida_core.data import load_dataset
    from sida_core.metrics.digits_classifier import RECIPE

    if dataset == "digits":
        if kind not in (None, "digits"):
            raise ReferenceStatsError(f"DATASET 'digits' is the built-in data; --kind {kind} needs a path")
        split = RECIPE["split"]
        fields = dict(kind="digits", resolution=resolution or 8, channels=channels or 1,
                      holdout_fraction=split["holdout_fraction"], split_seed=split["split_seed"])
        desc = dict(name="digits", kind="digits", split=f"train (holdout_fraction {split['holdout_fraction']}, "
                                                          f"split_seed {split['split_seed']})")
    elif dataset.startswith("s3://") or (Path(dataset).expanduser() / "manifest.json").is_file() and kind in (None, "prepared"):
        from ray_jobs.datasets import stage_dataset
        from sida_core.shards import read_manifest

        folder = stage_dataset(dataset, endpoint_url=endpoint_url)
        m = read_manifest(folder)
        if m["kind"] == "latents":
            raise ReferenceStatsError(f"DATASET {dataset!r} holds latents: reference statistics are taken on images")
        fields = dict(kind="prepared", path=str(folder), resolution=resolution or m["shape"][-1],
                      channels=channels or m["shape"][0], holdout_fraction=0.0)
        desc = dict(name=dataset, kind="prepared", split="all")
    else:
        path = Path(dataset).expanduser()
        if not path.exists():
            raise ReferenceStatsError(f"DATASET {dataset!r}: no such file or folder (or use 'digits', the built-in data)")
        kind = kind or infer_kind(path)
        if kind == "digits":
            raise ReferenceStatsError(f"--kind digits takes DATASET 'digits', not a path ({dataset!r})")
        if resolution is None:
            raise ReferenceStatsError(f"--resolution is required for {dataset!r}: the data.resolution of the runs "
                                      "that will be scored against these statistics")
        fields = dict(kind=kind, path=str(path.resolve()), resolution=resolution, channels=channels or 3,
                      holdout_fraction=0.0)
        desc = dict(name=str(path.resolve()), kind=kind, split="all")
    try:
        cfg = DataConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "data"
        raise ReferenceStatsError(f"invalid data options: {where}: {err['msg']}") from None
    data = load_dataset(cfg)[0]
    total = len(data)
    if max_images is not None:
        if max_images < 2:
            raise ReferenceStatsError(f"--max-images must be >= 2 (a covariance needs two images), got {max_images}")
        data = data.subset(range(min(max_images, total)))
    images = data.images
    desc.update(total_images=total, max_images=max_images)
    return images, desc


def check_out(out: str, endpoint_url: Optional[str]) -> None:
    """``--out`` of a reference folder: a bad URI, a missing bucket or a file in the way fails here, before any work;
    nothing is created yet."""
    from store.storage import Storage

    try:
        store = Storage(out, endpoint_url=endpoint_url)
        if store.is_s3:
            store.check()
    except ValueError as e:
        raise ReferenceStatsError(str(e)) from None
    if not store.is_s3 and Path(store.root).exists() and not Path(store.root).is_dir():
        raise ReferenceStatsError(f"--out {out!r}: is a file; expected a folder (or s3://bucket/prefix) for "
                                  "stats.npz and manifest.json")


def run_fid_stats(dataset: str, out: str, *, metric: Optional[str] = None, kind: Optional[str] = None,
                  resolution: Optional[int] = None, channels: Optional[int] = None, max_images: Optional[int] = None,
                  endpoint_url: Optional[str] = None, device: str = "cpu", progress: bool = True,
                  protocol: str = "clean", features: bool = False, dinov2: Optional[str] = None) -> dict:
    """Compute and store the reference statistics of ``dataset``; returns a one-line JSON-able summary.
    ``features``: store the features too (float16 shards: KID and precision / recall need them); ``dinov2``: the
    DINOv2 weights file of ``--metric fd_dinov2`` (local or s3://)."""
    import torch

    from sida_core.metrics import check_protocol, feature_space
    from sida_core.metrics.reference import compute_reference

    t0 = time.perf_counter()
    metric = metric or ("fd_digits" if dataset == "digits" else "fid_inception")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_out(out, endpoint_url)
    try:
        check_protocol(metric, protocol)  # before any image is read
    except ValueError as e:
        raise ReferenceStatsError(f"--protocol {protocol}: {e}") from None
    if metric == "fd_dinov2" and not dinov2:
        raise ReferenceStatsError("--metric fd_dinov2 needs --dinov2 PATH (dinov2_vitl14_pretrain.pth, local or s3://)")
    weights = None
    if dinov2:
        from ray_jobs.datasets import stage_file

        weights = str(stage_file(dinov2, endpoint_url=endpoint_url, what="--dinov2"))
    images, desc = load_reference_images(dataset, kind=kind, resolution=resolution, channels=channels,
                                         max_images=max_images, endpoint_url=endpoint_url)
    try:
        space = feature_space(metric, device=device, protocol=protocol, weights=weights)
    except ValueError as e:
        raise ReferenceStatsError(f"--protocol: {e}" if "protocol" in str(e) else str(e)) from None
    ref = compute_reference(images, space, dataset_desc=desc, device=device, progress=progress,
                            keep_features=features)
    uri = write_reference(ref, out, endpoint_url=endpoint_url)
    m = ref.manifest
    return dict(out=uri, metric=metric, extractor_id=m["extractor_id"], mode=m["mode"], num_images=m["num_images"],
                resolution=m["resolution"], channels=m["channels"], feature_dim=m["feature_dim"],
                features=ref.features is not None, seconds=round(time.perf_counter() - t0, 1))


def _implied_protocol(name: str, fmt: str) -> Optional[str]:
    """The protocol a published statistics file implies: clean-fid names its files ``<dataset>_<mode>_<split>_<res>``;
    EDM's ``.npz`` and EDM2's ``.pkl`` were taken with the TF Inception port's own resize (``legacy_tensorflow``)."""
    for mode in ("legacy_tensorflow", "legacy_pytorch", "clean"):
        if f"_{mode}_" in f"_{name.lower()}_":
            return mode
    return "legacy_tensorflow" if fmt in ("edm-npz", "edm2-pkl") else None


def run_reference_import(src: str, out: str, *, resolution: int, protocol: Optional[str] = None, key: str = "fid",
                         dinov2: Optional[str] = None, endpoint_url: Optional[str] = None) -> dict:
    """``sida reference import``: published Inception statistics (EDM's ``.npz``, a clean-fid statistics ``.npz``,
    EDM2's reference ``.pkl`` ``{fid: {mu, sigma}, fd_dinov2: {...}}`` read by the safe unpickler: no code runs)
    stored as a reference folder whose manifest states the protocol (``mode``) they imply, so scoring in the other
    protocol refuses them instead of warning. ``resolution``: the ``data.resolution`` of the runs to score."""
    import hashlib
    import tempfile

    import numpy as np

    from store.storage import Storage
    from sida_core.importer import ImportError_, read_pickle
    from sida_core.metrics.inception import FEATURE_DIM, PROTOCOLS, SHA256
    from sida_core.metrics.reference import ReferenceStats, reference_manifest

    head, _, name = src.rstrip("/").rpartition("/")
    try:
        source = Storage(head or ".", endpoint_url=endpoint_url)
    except ValueError as e:
        raise ReferenceStatsError(str(e)) from None
    check_out(out, endpoint_url)
    if key == "fd_dinov2" and not dinov2:
        raise ReferenceStatsError("--key fd_dinov2 needs --dinov2 PATH: the DINOv2 weights the statistics were taken "
                                  "with (their hash names the extractor)")
    try:
        data = source.read_bytes(name)
    except (FileNotFoundError, IsADirectoryError):
        raise ReferenceStatsError(f"SRC {src!r}: no such file") from None
    suffix = name.lower().rsplit(".", 1)[-1]
    if suffix == "npz":
        fmt = "clean-fid-npz" if _implied_protocol(name, "") else "edm-npz"
        try:
            ref = ReferenceStats.from_npz_bytes(data, source=src)
        except ValueError as e:
            raise ReferenceStatsError(str(e)) from None
        mu, sigma = ref.mu, ref.sigma
    elif suffix == "pkl":
        fmt = "edm2-pkl"
        with tempfile.TemporaryDirectory(prefix="sida-ref-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            try:
                obj, _ = read_pickle(local)
            except ImportError_ as e:
                raise ReferenceStatsError(str(e).replace(str(local), src)) from None
        entry = obj.get(key) if isinstance(obj, dict) else None
        if not (isinstance(entry, dict) and {"mu", "sigma"} <= set(entry)):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ReferenceStatsError(f"SRC {src!r}: expected EDM2's reference pickle {{{key!r}: {{mu, sigma}}, ...}}, "
                                      f"found {keys}")
        mu, sigma = np.asarray(entry["mu"]), np.asarray(entry["sigma"])
    else:
        raise ReferenceStatsError(f"SRC {src!r}: expected EDM's / clean-fid's .npz (mu, sigma) or EDM2's reference .pkl")
    if key == "fd_dinov2":
        if fmt != "edm2-pkl":
            raise ReferenceStatsError(f"SRC {src!r}: --key fd_dinov2 reads EDM2's reference .pkl, not a .npz")
        from ray_jobs.datasets import stage_file
        from sida_core.metrics.dinov2 import dinov2_feature_space

        space = dinov2_feature_space(str(stage_file(str(dinov2), endpoint_url=endpoint_url, what="dinov2")))
        metric, extractor_id, dim, protocol = "fd_dinov2", space.extractor_id, space.feature_dim, "clean"
    else:
        protocol = protocol or _implied_protocol(name, fmt)
        if protocol not in PROTOCOLS:
            raise ReferenceStatsError(f"SRC {src!r}: protocol {protocol!r} is not one this project scores in "
                                      f"({', '.join(PROTOCOLS)}); pass --protocol if the file name misleads")
        metric, extractor_id, dim = "fid_inception", f"inception-v3-fid/sha256:{SHA256}", FEATURE_DIM
    if np.ndim(mu) != 1 or np.shape(mu)[0] != dim:
        raise ReferenceStatsError(f"SRC {src!r}: mu has shape {np.shape(mu)}; {metric} statistics have {dim} features "
                                  f"(--key {key!r})")
    manifest = reference_manifest(metric=metric, extractor_id=extractor_id, mode=protocol, feature_dim=dim,
                                  num_images=None, resolution=resolution, channels=3,
                                  dataset=dict(imported_from=source.uri_of(name), format=fmt,
                                               key=key if fmt == "edm2-pkl" else None,
                                               sha256=hashlib.sha256(data).hexdigest()))
    try:
        ref = ReferenceStats(mu, sigma, manifest)
    except ValueError as e:
        raise ReferenceStatsError(f"SRC {src!r}: {e}") from None
    uri = write_reference(ref, out, endpoint_url=endpoint_url)
    return dict(out=uri, imported_from=manifest["dataset"]["imported_from"], format=fmt, metric=metric, mode=protocol,
                resolution=int(resolution), feature_dim=dim)
