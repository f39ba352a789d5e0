"""The one checkpoint format of this project (plain torch + JSON + stdlib; no Ray).

A checkpoint is a **directory** holding exactly two files::

    ckpt-000000102400/            # name: checkpoint_name(cur_nimg) = "ckpt-{cur_nimg:012d}"
      state.pt                    # torch.save(dict) -- tensors and plain containers only
      manifest.json               # UTF-8 JSON object, written last

``state.pt`` is a ``dict`` of named entries (e.g. ``{"generator": G.state_dict(), "fake_score": ...,
"generator_ema": ..., "opt_psi": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}}``) whose
leaves are tensors, ``str``/``int``/``float``/``bool``/``None``, nested in ``dict``/``list``/``tuple``.
This is checked on save, so ``torch.load(..., weights_only=True)`` always loads it (no pickle code runs).
Anything else (numpy arrays, objects) is metadata and goes into the manifest via ``extra``.

``manifest.json`` holds::

    format          "sida-checkpoint"
    version         1
    kind            what this is, e.g. "teacher" or "distill"
    kimg            float, images seen / 1000
    cur_nimg        int, images seen (counted globally over all workers)
    config          the run config as JSON (e.g. RunConfig.model_dump(mode="json"))
    network         what rebuilds the nets, e.g. {"arch", "img_resolution", "img_channels", "label_dim",
                    "kwargs"} -- the arguments of sida_core.networks.build_denoiser
    files           {"state.pt": {"sha256": hex, "bytes": int}}
    content_hash    sha256 hex of the lines "NAME:SHA256\\n" over ``files``, sorted by NAME
    created         ISO-8601 UTC time of writing
    torch           torch.__version__ of the writer
    manifest_sha256 sha256 hex of the canonical JSON (sort_keys, separators "," ":", UTF-8) of every other
                    key of the manifest -- so an edited manifest is detected too
    ...             plus the keys of ``extra`` (they may not shadow the keys above)

Atomicity: :func:`save_checkpoint` writes both files into a hidden sibling ``.NAME.tmp-XXXX``, fsyncs
them (manifest last) and the folder, then renames the folder into place; an existing target is first
renamed aside to ``.NAME.old-XXXX`` and removed after the swap. A crash leaves at worst a hidden
temporary folder (never picked up by :func:`find_latest_valid`; without a complete manifest it never
verifies) or, between the two renames, the previous version under ``.NAME.old-XXXX``. A target path
never holds a half-written checkpoint.

Verification (:func:`load_checkpoint`, :func:`verify_checkpoint`) checks format and version, the
manifest hash, and the size and sha256 of every listed file; any failure raises :class:`CheckpointError`
with one line naming the path and the problem.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

# torch itself is imported where tensors are saved or loaded: readers of run folders that never load one (`sida
# leaderboard`, the storage layer) should not pay its seconds of start-up

FORMAT = "sida-checkpoint"
VERSION = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
NAME_RE = re.compile(r"^ckpt-(\d+)$")
_RESERVED = {"format", "version", "kind", "kimg", "cur_nimg", "config", "network", "files", "content_hash",
             "created", "torch", "manifest_sha256"}
_PLAIN_LEAVES = (str, int, float, bool, type(None))

def _is_tensor(obj) -> bool:
    import torch

    return isinstance(obj, torch.Tensor)


__all__ = ["CheckpointError", "FORMAT", "VERSION", "checkpoint_name", "find_latest_valid", "load_checkpoint", "sha256_file",
           "save_checkpoint", "verify_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or of another format; ``str(err)`` is one line."""


def checkpoint_name(cur_nimg: int) -> str:
    """The directory name of the checkpoint taken after ``cur_nimg`` images: ``ckpt-{cur_nimg:012d}``."""
    return f"ckpt-{int(cur_nimg):012d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_hash(files: Mapping[str, Mapping[str, Any]]) -> str:
    return hashlib.sha256("".join(f"{n}:{files[n]['sha256']}\n" for n in sorted(files)).encode()).hexdigest()


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_state(obj: Any, where: str = "state") -> None:
    """Raise TypeError unless ``obj`` is loadable with ``torch.load(weights_only=True)``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be str or int")
            _check_state(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_state(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_LEAVES) and not _is_tensor(obj):
        raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__name__} cannot go into {STATE_FILE} "
                        f"(tensors and plain containers only); convert it to a tensor or pass it as extra metadata")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # a pydantic model, e.g. RunConfig
        obj = obj.model_dump(mode="json")
    return json.loads(json.dumps(obj, default=lambda o: str(o) if isinstance(o, os.PathLike) else _no_json(o)))


def _no_json(o: Any):
    raise TypeError(f"{type(o).__name__} is not JSON serialisable (manifest values must be JSON)")


def save_checkpoint(directory: str | os.PathLike, state: dict, *, kind: str, kimg: float, cur_nimg: int,
                    config: Mapping[str, Any], network: Mapping[str, Any],
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` and its manifest to the checkpoint directory ``directory`` atomically; returns it."""
    import torch

    target = Path(directory)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_state(state)
    extra = dict(extra or {})
    if clash := sorted(_RESERVED & extra.keys()):
        raise ValueError(f"extra may not set reserved manifest keys {clash}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    old = None
    try:
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        files = {STATE_FILE: {"sha256": sha256_file(tmp / STATE_FILE), "bytes": (tmp / STATE_FILE).stat().st_size}}
        manifest = {"format": FORMAT, "version": VERSION, "kind": str(kind), "kimg": float(kimg),
                    "cur_nimg": int(cur_nimg), "config": _jsonable(config), "network": _jsonable(network),
                    "files": files, "content_hash": _content_hash(files),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "torch": torch.__version__, **_jsonable(extra)}
        manifest["manifest_sha256"] = _manifest_hash(manifest)
        with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync(target.parent)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)  # put the previous version back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _read_manifest(d: Path) -> dict:
    path = d / MANIFEST_FILE
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a checkpoint directory (does not exist or is not a folder)")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing manifest (incomplete or not a {FORMAT})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({' '.join(str(exc).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format must be {FORMAT!r}, got {got!r}")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: unsupported version {manifest.get('version')!r} (this code reads {VERSION})")
    if manifest.get("manifest_sha256") != _manifest_hash(manifest):
        raise CheckpointError(f"{path}: manifest_sha256 mismatch (the manifest was edited or is corrupt)")
    files = manifest.get("files")
    if not isinstance(files, dict) or STATE_FILE not in files:
        raise CheckpointError(f"{path}: files must list {STATE_FILE!r}")
    if manifest.get("content_hash") != _content_hash(files):
        raise CheckpointError(f"{path}: content_hash does not match the listed file hashes")
    return manifest


def verify_checkpoint(directory: str | os.PathLike, *, hashes: bool = True) -> dict:
    """Check manifest, file presence, sizes and (if ``hashes``) sha256; return the manifest or raise."""
    d = Path(directory)
    manifest = _read_manifest(d)
    for name, info in manifest["files"].items():
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing file listed in the manifest")
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"{path}: size {size} bytes, manifest says {info.get('bytes')} (truncated or modified)")
        if hashes and sha256_file(path) != info.get("sha256"):
            raise CheckpointError(f"{path}: sha256 mismatch with the manifest (corrupt or modified)")
    return manifest


def load_checkpoint(directory: str | os.PathLike, *, map_location: Any = "cpu",
                    verify: bool = True) -> tuple[dict, dict]:
    """Verify and load a checkpoint directory; returns ``(state, manifest)``.

    ``verify=False`` skips only the sha256 of the files (format, manifest hash and sizes are always checked).
    ``state.pt`` is read with ``weights_only=True``.
    """
    import torch

    d = Path(directory)
    manifest = verify_checkpoint(d, hashes=verify)
    try:
        state = torch.load(d / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{d / STATE_FILE}: cannot be loaded ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]})") from None
    return state, manifest


def find_latest_valid(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint ``root/ckpt-NNNN`` (largest NNNN) that verifies; warns about each one skipped."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME_RE.match(p.name)) and p.is_dir()]
    for _, path in sorted(found, reverse=True):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping invalid checkpoint {path}: {exc}", RuntimeWarning, stacklevel=2)
    return None
