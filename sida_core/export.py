"""A one-step generator out of the pipeline: its weights as a plain file plus the JSON that rebuilds it (no Ray).

``export_generator(state_dict, out, network=..., sigma_init=...)`` writes two files::

    OUT                 the state dict of the project's network (EDMPrecond; parameter names ``model.*``):
                        ``torch.save`` (``.pt``, loads with ``weights_only=True``) or safetensors
    OUT.json            format, weights file name + sha256, ``network`` (the arguments of
                        :func:`sida_core.networks.build_denoiser`), ``sigma_init``, ``source`` (run, checkpoint,
                        kimg, content hash), ``score`` (its leaderboard score or null), ``edm`` (see below)

The generator is x = D(sigma_init z; sigma_init, c) with z ~ N(0, I) (:func:`sida_core.losses.generate`).
:func:`load_exported` is the reverse: files -> the project's network, hash-checked. Both files are written
atomically (temp file in the same folder, fsync, rename), weights first, so the JSON never describes a
half-written weights file; a crash in between leaves new weights whose sha256 the old JSON does not match.
"""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional

import torch
from torch import nn

from sida_core.checkpoint import sha256_file

FORMAT = "sida-generator"
VERSION = 1
FORMATS = {"pt": (".pt", ".pth"), "safetensors": (".safetensors",)}


class ExportError(ValueError):
    """Bad input to ``sida export`` / ``sida generate``, or a missing / mismatched exported file; one line."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Write ``path`` through a hidden temp file in the same folder, fsynced and renamed over it on success;
    on any error the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def metadata_path(weights: str | os.PathLike) -> Path:
    """The JSON beside an exported weights file: ``FILE.json``."""
    return Path(f"{weights}.json")


def format_of(out: str | os.PathLike, fmt: Optional[str] = None) -> str:
    """``fmt`` checked against the suffix of ``out``, or the format the suffix names when ``fmt`` is None."""
    suffix = Path(out).suffix.lower()
    by_suffix = next((f for f, sfx in FORMATS.items() if suffix in sfx), None)
    if fmt is None:
        if by_suffix is None:
            raise ExportError(f"--format: expected one of {', '.join(FORMATS)} (or an --out ending in "
                              f"{', '.join(s for v in FORMATS.values() for s in v)}), got none for {out}")
        return by_suffix
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if by_suffix is not None and by_suffix != fmt:
        raise ExportError(f"--out {out}: the suffix {suffix} says {by_suffix}, but --format is {fmt}")
    return fmt


def plain_tensors(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses shared or strided ones; a ``.pt`` of
    views would store their whole base storage)."""
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ExportError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.detach().to("cpu", copy=True).contiguous()
    return out


def edm_names(network: Mapping[str, Any]) -> Optional[dict]:
    """EDM-style constructor of ``network`` (``"edm"`` in the JSON): ``{"class_name", "init_kwargs"}`` as EDM / EDM2
    record them, so EDM / SiD code can rebuild the net and load the exported state dict (sida_core.importer owns the
    mapping both ways)."""
    from sida_core.importer import edm_constructor

    return edm_constructor(network) if network.get("arch") else None


def export_generator(state_dict: Mapping[str, Any], out: str | os.PathLike, *, network: Mapping[str, Any],
                     sigma_init: float, fmt: Optional[str] = None, source: Optional[Mapping[str, Any]] = None,
                     score: Optional[Mapping[str, Any]] = None) -> dict:
    """Write ``state_dict`` to ``out`` (``fmt``: pt or safetensors; default from the suffix) and the metadata to
    ``out.json``; returns the metadata. ``source``: where the weights came from (run_uri, checkpoint, key, kimg,
    content_hash, ...); ``score``: its leaderboard score, if any."""
    out = Path(out)
    fmt = format_of(out, fmt)
    tensors = plain_tensors(state_dict)
    with atomic_file(out) as f:
        if fmt == "pt":
            torch.save(tensors, f)
        else:
            from safetensors.torch import save

            f.write(save(tensors))
    meta = {"format": FORMAT, "version": VERSION, "weights": out.name, "weights_format": fmt,
            "weights_sha256": sha256_file(out), "tensors": len(tensors),
            "parameters": int(sum(t.numel() for t in tensors.values())),
            "network": dict(network), "sigma_init": float(sigma_init),
            "generator": "x = D(sigma_init * z; sigma_init, c), z ~ N(0, I): sida_core.losses.generate",
            "source": dict(source or {}), "score": dict(score) if score else None,
            "edm": edm_names(network)}
    with atomic_file(metadata_path(out)) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode())
    return meta


def read_metadata(path: str | os.PathLike) -> tuple[Path, dict]:
    """(weights path, metadata) for an exported file given as the weights file or its ``.json``."""
    path = Path(path)
    weights = path.with_name(path.name.removesuffix(".json")) if path.suffix == ".json" else path
    meta_file = metadata_path(weights)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{meta_file}: missing (an exported generator is FILE plus FILE.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{meta_file}: unreadable ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ExportError(f"{meta_file}: not a {FORMAT} v{VERSION} metadata file")
    return weights, meta


def load_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of an exported generator; the weights' sha256 is checked against the JSON."""
    weights, meta = read_metadata(path)
    if not weights.is_file():
        raise ExportError(f"{weights}: missing (its metadata {metadata_path(weights).name} is there)")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise ExportError(f"{weights}: sha256 does not match {metadata_path(weights).name} (modified or half-written)")
    if meta["weights_format"] == "safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return state, meta


def load_exported(path: str | os.PathLike, device: Any = "cpu") -> nn.Module:
    """The project's network rebuilt from an exported generator (``FILE`` or ``FILE.json``), in eval mode;
    ``net.sigma_init`` is set from the metadata, so ``losses.generate(net, z, c, net.sigma_init)`` samples."""
    from sida_core.training_loop import build_from_spec

    state, meta = load_state_dict(path)
    net = build_from_spec(meta["network"])
    net.load_state_dict(state)
    net.sigma_init = meta["sigma_init"]
    return net.to(device).eval()

