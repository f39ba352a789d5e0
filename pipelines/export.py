"""``sida export`` and ``sida generate``: a run's one-step generator as a weights file, or as images.

Both pick a checkpoint of a run (local or ``s3://``): ``best`` (the lowest live score, read from its pinned
copy: what ``sida evaluate --best`` uses), ``latest`` (the newest checkpoint that verifies) or a name. The file
formats and the per-seed sampling live in :mod:`sida_core.export` and :mod:`sida_core.sampling`; this module
only composes them with the run's storage and leaderboard.

``sida generate`` output is atomic: a PNG folder is filled under a hidden temp folder beside it and renamed into
place at the end (an interrupted run leaves no ``--out``; it is not resumable, run it again); an ``.npz`` is one
temp file renamed over the target.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Optional

from sida_core.checkpoint import CheckpointError
from sida_core.export import ExportError

LATENT_CHANNELS = 4  # EDM2's latent space (SD-VAE): images need the VAE decoder


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _score(rows: list[dict], name: str) -> Optional[dict]:
    """The live score of checkpoint ``name`` (lowest if scored with several metrics) plus its final
    re-evaluation, if any; None when the scorers never scored it."""
    from pipelines.leaderboard import rank

    mine = [r for r in rank(rows) if r["checkpoint"] == name]
    if not mine:
        return None
    r = mine[0]
    return {k: r[k] for k in ("metric", "value", "num_images", "seed", "reference", "final_mean", "final_std",
                              "final_repeats")}


def fetch_generator(run_uri: str, checkpoint: str, scratch: Path, *, key: str = "generator_ema",
                    endpoint_url: Optional[str] = None):
    """(net, manifest, info) of checkpoint ``best`` | ``latest`` | NAME of a run, fetched under ``scratch``;
    ``info``: run_uri, checkpoint, source URI, key, kimg, content hash, sigma_init, score."""
    from pipelines.leaderboard import best_live_row, checkpoint_source, open_run
    from sida_core.training_loop import load_network

    store = open_run(run_uri, endpoint_url)
    rows = store.read_rows()
    if checkpoint == "latest":
        name = source = path = None
        for candidate in store.checkpoint_names()[::-1]:
            try:
                path, name = store.fetch_checkpoint(candidate, scratch), candidate
                source = name
                break
            except CheckpointError as exc:
                warnings.warn(f"skipping checkpoint {store.storage.uri_of(candidate)}: {exc}", RuntimeWarning, stacklevel=2)
        if path is None:
            raise ExportError(f"--checkpoint latest: {store.uri} has no valid checkpoint yet")
    else:
        name = best_live_row(store, rows, hint="--checkpoint latest or NAME")["checkpoint"] if checkpoint == "best" \
            else checkpoint
        source = checkpoint_source(store, name)
        path = store.fetch_checkpoint(source, scratch)
    net, manifest = load_network(path, key)
    config = manifest.get("config") or store.read_config()  # the run config the checkpoint was trained (and scored) with
    info = {"run_uri": store.uri, "checkpoint": name, "source": store.storage.uri_of(source),
            "key": key, "kind": manifest.get("kind"), "method": manifest.get("method"), "kimg": manifest["kimg"],
            "cur_nimg": manifest["cur_nimg"], "content_hash": manifest["content_hash"],
            "sigma_init": float(config["loss"]["sigma_init"]), "score": _score(rows, name)}
    return net.eval(), manifest, info


def _write_error(out, exc: OSError) -> ExportError:
    return ExportError(f"--out {out}: cannot write ({exc.strerror or type(exc).__name__}"
                       f"{': ' + str(exc.filename) if exc.filename else ''})")


def _check_writable(out: Path, what: str) -> None:
    """Raise ExportError (one line, naming ``what``) unless ``out`` can be created: its nearest existing ancestor
    must be a writable folder. Nothing is created here (the missing folders are made when the output is written)."""
    try:
        out.exists()  # raises for a name the OS refuses (e.g. too long)
    except OSError as exc:
        raise _write_error(out, exc) from None
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"{what} {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{what} {out}: folder {parent} is not writable")


def run_export(run_uri: str, out: str, *, checkpoint: str = "best", key: str = "generator_ema",
               fmt: Optional[str] = None, endpoint_url: Optional[str] = None) -> dict:
    """Write the generator weights of a run's checkpoint to ``out`` (+ ``out.json``); returns a summary."""
    from sida_core.export import export_generator, format_of, metadata_path

    out_path = Path(out)
    fmt = format_of(out_path, fmt)
    _check_writable(out_path, "--out")
    if out_path.is_dir():
        raise ExportError(f"--out {out}: is a folder; expected a file name such as generator.{fmt}")
    with tempfile.TemporaryDirectory(prefix="sida-export-") as scratch:
        net, manifest, info = fetch_generator(run_uri, checkpoint, Path(scratch), key=key, endpoint_url=endpoint_url)
    source = {k: info[k] for k in ("run_uri", "checkpoint", "source", "key", "kind", "method", "kimg", "cur_nimg",
                                   "content_hash")}
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        meta = export_generator(net.state_dict(), out_path, network=manifest["network"], sigma_init=info["sigma_init"],
                                fmt=fmt, source=source, score=info["score"])
    except OSError as exc:
        raise _write_error(out, exc) from None
    return {"out": str(out_path), "metadata": str(metadata_path(out_path)), "format": fmt,
            "checkpoint": info["checkpoint"], "kimg": info["kimg"], "tensors": meta["tensors"],
            "parameters": meta["parameters"], "score": info["score"]}


def _device(name: str):
    import torch

    if name not in ("auto", "cpu", "cuda"):
        raise ExportError(f"--device: expected auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is available here (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _positive(text, what: str) -> int:
    try:
        value = int(str(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ExportError(f"{what}: expected a positive integer, got {text!r}")
    return value


def run_generate(run_uri: str, out: str, *, num: Optional[str] = None, seeds: Optional[str] = None,
                 checkpoint: str = "best", batch="256", class_labels: str = "random", device: str = "auto",
                 endpoint_url: Optional[str] = None, vae: Optional[str] = None, progress: bool = True,
                 log: Callable[[str], None] = _log) -> dict:
    """One-step samples of a run's EMA generator, one per seed: PNGs in EDM's layout (``DIR/000000/000123.png``,
    a folder per 1000 seeds) or ``FILE.npz`` (``arr_0`` uint8 N x H x W x C, ``seeds``, ``labels``: -1 for
    none); a latent-space generator (4 channels) is decoded to images by the SD-VAE folder ``vae`` (local or
    ``s3://``), or without one writes float16 ``latents`` (N x C x H x W) to the npz instead."""
    import numpy as np
    from tqdm.auto import tqdm

    from sida_core.export import atomic_file
    from sida_core.sampling import parse_class_labels, resolve_seeds, sample_seeds, to_uint8

    seed_list = resolve_seeds(None if num is None else _positive(num, "--num"), seeds)
    batch = _positive(batch, "--batch")
    dev = _device(device)
    out_path = Path(out)
    as_npz = out_path.suffix.lower() == ".npz"
    if not as_npz and out_path.suffix:
        raise ExportError(f"--out {out}: expected a folder for PNGs or a FILE.npz")
    _check_writable(out_path, "--out")
    if as_npz and out_path.is_dir():
        raise ExportError(f"--out {out}: is a folder; expected a FILE.npz")
    if not as_npz and (out_path.is_file() or (out_path.is_dir() and any(out_path.iterdir()))):
        raise ExportError(f"--out {out}: exists and is not an empty folder; give a new folder (or FILE.npz)")
    with tempfile.TemporaryDirectory(prefix="sida-generate-") as scratch:
        net, manifest, info = fetch_generator(run_uri, checkpoint, Path(scratch), endpoint_url=endpoint_url)
    labels_mode = parse_class_labels(class_labels, net.label_dim)
    latent = net.img_channels == LATENT_CHANNELS
    decode = None
    if latent and vae:
        from ray_jobs.datasets import stage_folder
        from sida_core.vae import LatentDecoder, load_vae

        decode = LatentDecoder(load_vae(stage_folder(vae, endpoint_url=endpoint_url, what="vae"), dev))
        latent = False  # images from here on
    elif latent:
        log(f"note: {info['checkpoint']} generates {LATENT_CHANNELS}-channel latents (EDM2 latent space); without "
            f"--vae (the SD-VAE decoder folder) they are written as float16 latents")
        if not as_npz:
            raise ExportError(f"--out {out}: a latent-space generator writes PNGs only through --vae (the SD-VAE "
                              "decoder folder); give --vae or --out FILE.npz")
    elif vae:
        raise ExportError(f"--vae: {info['checkpoint']} generates {net.img_channels}-channel images, not latents")
    elif not as_npz and net.img_channels not in (1, 3):
        raise ExportError(f"--out {out}: PNGs need 1 or 3 channels, the generator has {net.img_channels}; give FILE.npz")
    net.to(dev)
    t0 = time.time()
    tmp_dir = None if as_npz else out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    arrays, labels = [], []
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:  # the temp file / folder exists before any work is done
            f = stack.enter_context(atomic_file(out_path)) if as_npz else None
            if tmp_dir is not None:
                tmp_dir.mkdir()
            bar = stack.enter_context(tqdm(total=len(seed_list), desc=f"generate {info['checkpoint']}", unit="img",
                                           disable=not progress))
            for chunk, x, lab in sample_seeds(net, seed_list, sigma_init=info["sigma_init"], batch=batch,
                                              class_labels=labels_mode, device=dev):
                labels.append(lab.numpy())
                if decode is not None:
                    x = decode(x)
                if latent:
                    arrays.append(x.half().numpy())
                elif as_npz:
                    arrays.append(to_uint8(x))
                else:
                    _write_pngs(tmp_dir, chunk, to_uint8(x))
                bar.update(len(chunk))
            bar.close()
            if f is not None:
                _savez(f, {"latents" if latent else "arr_0": np.concatenate(arrays),
                           "seeds": np.asarray(seed_list, dtype=np.int64), "labels": np.concatenate(labels)})
        if tmp_dir is not None:
            if out_path.is_dir():
                out_path.rmdir()  # empty (checked above)
            os.rename(tmp_dir, out_path)
            tmp_dir = None
    except OSError as exc:
        raise _write_error(out, exc) from None
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"out": str(out_path), "format": "npz" if as_npz else "png", "images": len(seed_list),
            "latents": latent, "seeds": _seed_text(seed_list), "class_labels": class_labels,
            "checkpoint": info["checkpoint"], "kimg": info["kimg"], "device": str(dev),
            "seconds": round(time.time() - t0, 2)}


def _savez(f, arrays: dict) -> None:
    """``np.savez`` (uncompressed; ``np.load`` reads it) with fixed zip timestamps: same images, same bytes."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, arr in arrays.items():
            with z.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.ascontiguousarray(arr), allow_pickle=False)


def _write_pngs(folder: Path, seeds: list[int], images) -> None:
    """EDM's ``--subdirs`` layout: ``folder/{seed - seed % 1000:06d}/{seed:06d}.png``."""
    from PIL import Image

    for seed, img in zip(seeds, images):
        sub = folder / f"{seed - seed % 1000:06d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(sub / f"{seed:06d}.png")


def _seed_text(seeds: list[int]) -> str:
    """A compact form of a seed list: ``0-999`` or ``0,5,7-9``."""
    parts, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            parts.append(str(seeds[start]) if i - 1 == start else f"{seeds[start]}-{seeds[i - 1]}")
            start = i
    return ",".join(parts)
