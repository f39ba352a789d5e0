"""Safe import of published teachers and generators into this project's networks (no Ray, no pydantic).

Reads, **without ever executing code from the file**:

* EDM ``.pkl`` (NVlabs/edm ``training_loop``): a dict whose ``ema`` is the network. Every network class is stored
  through EDM's ``torch_utils.persistence`` as a call ``_reconstruct_persistent_obj(meta)`` whose ``meta`` holds
  ``class_name``, the object's ``state`` (``__dict__`` with ``_parameters``, ``_buffers``, ``_modules``,
  ``_init_args`` / ``_init_kwargs``) and the *source code* of the module that defined it. Loading such a file the
  normal way runs that source (``exec``); here it is only hashed, for provenance.
* EDM2 ``.pkl`` (NVlabs/edm2): an ``EasyDict`` with ``ema`` stored in float16 (cast to float32 here).
* SiD / SiDA generator and fake-score pickles (the authors' code writes EDM's format).
* Plain state dicts: ``.pt`` / ``.pth`` (``torch.load(weights_only=True)``) and ``.safetensors``; their
  architecture must be given (a network spec).

:class:`SafeUnpickler` allows only the handful of globals these files use (``ALLOWED``); any other global is
refused with one line naming it. Persistent objects become inert :class:`PersistentStub` records; their tensors
are flattened into a state dict; the architecture is chosen from ``class_name`` + ``_init_kwargs`` and loaded
with ``strict=True``. Errors are :class:`ImportError_`, one line each.

A *network spec* is the dict this project stores in every checkpoint manifest (``network``):
``{"arch", "img_resolution", "img_channels", "label_dim", "kwargs", "precond", "precond_kwargs"}``, the arguments
of :func:`sida_core.networks.build_denoiser`.
"""
from __future__ import annotations

import collections
import hashlib
import io
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from sida_core.checkpoint import sha256_file

__all__ = ["ALLOWED", "ImportError_", "ImportedNetwork", "PersistentStub", "SafeUnpickler", "build_network",
           "edm_constructor", "import_network", "read_pickle", "sha256_file", "spec_from_stub"]

EDM_PERSISTENCE_VERSION = 6  # NVlabs/edm and edm2 torch_utils/persistence.py: _version


class ImportError_(ValueError):
    """A checkpoint cannot be imported; ``str(err)`` is one line naming the file and the problem."""


@dataclass
class PersistentStub:
    """Inert record of one EDM-persistent object: its class name, state and a hash of its (never run) source."""

    class_name: str
    state: dict
    module_src_sha256: Optional[str] = None

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())


class _InertModule:
    """Stands in for a non-persistent ``torch.nn`` container (ModuleDict, ModuleList, Sequential): data only."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _EasyDict(dict):
    """EDM2 pickles wrap the top level in ``dnnlib.util.EasyDict``; a plain dict is all that is needed."""

    def __setstate__(self, state):  # EasyDict pickles through dict's own items; nothing else to restore
        if isinstance(state, dict):
            self.update(state)


def _reconstruct_persistent_obj(meta):
    """Replacement for EDM's ``_reconstruct_persistent_obj``: records, never executes ``meta['module_src']``."""
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError(f"persistent object metadata must be a dict, got {type(meta).__name__}")
    if meta.get("type") != "class":
        raise pickle.UnpicklingError(f"persistent object of type {meta.get('type')!r} (only 'class' objects are read)")
    if meta.get("version") != EDM_PERSISTENCE_VERSION:
        raise pickle.UnpicklingError(f"persistence format version {meta.get('version')!r} "
                                     f"(this importer reads version {EDM_PERSISTENCE_VERSION})")
    src = meta.get("module_src")
    digest = hashlib.sha256(src.encode("utf-8", "replace")).hexdigest() if isinstance(src, str) else None
    state = meta.get("state")
    return PersistentStub(class_name=str(meta.get("class_name")), state=state if isinstance(state, dict) else {},
                          module_src_sha256=digest)


def _load_storage_bytes(b: bytes):
    """Tensor storages inside a pickle are nested legacy ``torch.save`` blobs: read them with weights_only."""
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


try:  # numpy >= 2 spells it numpy._core; pickles written under numpy 1.x say numpy.core (both are allowed)
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]  # same module, numpy 1.x name
_NUMPY_MULTIARRAY = {"scalar": _multiarray.scalar, "_reconstruct": _multiarray._reconstruct}

def _codecs_encode(text, encoding="utf-8", errors="strict"):
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (pickles use latin1)")
    return text.encode("latin1", errors)


#: (module, name) -> object. Everything a network pickle of EDM / EDM2 / SiD needs, nothing that can run code.
ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,  # protocol-2 pickles spell builtins the Python-2 way
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,  # protocol-2 pickles store bytes as _codecs.encode(text, 'latin1')
    ("torch.nn.modules.container", "ModuleDict"): _InertModule,
    ("torch.nn.modules.container", "ModuleList"): _InertModule,
    ("torch.nn.modules.container", "Sequential"): _InertModule,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _NUMPY_MULTIARRAY["scalar"],
    ("numpy._core.multiarray", "scalar"): _NUMPY_MULTIARRAY["scalar"],
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_MULTIARRAY["_reconstruct"],
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_MULTIARRAY["_reconstruct"],
    ("torch", "float16"): torch.float16, ("torch", "float32"): torch.float32, ("torch", "bfloat16"): torch.bfloat16,
}


class SafeUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only :data:`ALLOWED` globals and never runs code from the stream."""

    def __init__(self, file, name: str = "checkpoint"):
        super().__init__(file)
        self.name = name
        self.globals_seen: set[str] = set()

    def find_class(self, module: str, name: str):
        obj = ALLOWED.get((module, name))
        if obj is None:
            raise ImportError_(f"refusing to load {self.name}: it references {module}.{name}, which a network "
                               f"checkpoint never needs (only EDM / EDM2 / SiD network pickles are read)")
        self.globals_seen.add(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise ImportError_(f"refusing to load {self.name}: it uses pickle persistent ids ({str(pid)[:60]}); "
                           f"a torch.save zip file should be named .pt / .pth")


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def read_pickle(path: Path) -> tuple[Any, set[str]]:
    """Unpickle ``path`` with :class:`SafeUnpickler`; returns (object, globals used). One-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImportError_(f"{path}: empty file (not a network pickle)")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if not head.startswith(b"\x80"):
            what = "a zip archive (a torch.save file? name it .pt)" if head.startswith(b"PK") else "not a pickle"
            raise ImportError_(f"{path}: {what}; expected an EDM / EDM2 / SiD network pickle")
        unpickler = SafeUnpickler(f, name=path.name)
        try:
            obj = unpickler.load()
        except ImportError_:
            raise
        except RecursionError:
            raise ImportError_(f"{path}: nested too deeply to be a network pickle") from None
        except Exception as exc:  # noqa: BLE001 - truncated / corrupt / hostile streams all end here
            raise ImportError_(f"{path}: not a readable network pickle ({_one_line(exc)})") from None
    return obj, unpickler.globals_seen


# ---------------------------------------------------------------------------------------------------- state dicts
def _children(state: Mapping) -> Mapping:
    mods = state.get("_modules")
    return mods if isinstance(mods, Mapping) else {}


def stub_state_dict(stub, prefix: str = "", out: Optional[dict] = None, _path: tuple = ()) -> dict:
    """Flatten a stub tree into a state dict (parameters and persistent buffers), as ``nn.Module.state_dict``."""
    out = {} if out is None else out
    if id(stub) in _path or len(_path) > 64:  # pickle memos can build cycles; real networks are shallow trees
        raise ImportError_(f"{prefix or 'network'}: module tree is cyclic or deeper than 64 levels")
    state = stub.state if isinstance(stub, PersistentStub) else getattr(stub, "__dict__", {})
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        entries = state.get(group) or {}
        if not isinstance(entries, Mapping):
            raise ImportError_(f"{prefix or 'network'}: {group} is a {type(entries).__name__}, expected a mapping")
        for name, t in entries.items():
            if t is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(t, torch.Tensor):
                raise ImportError_(f"{prefix}{name}: expected a tensor, got {type(t).__name__}")
            out[prefix + name] = t.detach()
    for name, child in _children(state).items():
        if child is None:
            continue
        if not isinstance(child, (PersistentStub, _InertModule)):
            raise ImportError_(f"{prefix}{name}: unexpected module object {type(child).__name__}")
        stub_state_dict(child, f"{prefix}{name}.", out, (*_path, id(stub)))
    return out


def _to_float32(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors to float32 (EDM2 ships float16); others unchanged; all contiguous and unshared."""
    return {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------- architectures
PRECONDS = {"EDMPrecond": "edm", "VPPrecond": "vp", "VEPrecond": "ve"}
BACKBONES = {"SongUNet": "songunet", "DhariwalUNet": "adm"}
EDM2_PRECONDS = ("Precond", "EDM_2_Precond_EncoderDecoder", "EDM_2_Precond_Generator", "EDM2Precond")
_INTERFACE = ("img_resolution", "img_channels", "label_dim")
_BACKBONE_INTERFACE = ("img_resolution", "in_channels", "out_channels", "label_dim")
_PRECOND_KWARGS = {"edm": ("sigma_data",), "vp": ("beta_d", "beta_min", "M", "epsilon_t"),
                   "ve": ("sigma_min", "sigma_max")}


def _jsonable(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    raise ImportError_(f"constructor argument of type {type(v).__name__} is not plain data")


def spec_from_stub(stub: PersistentStub, where: str = "network") -> dict:
    """The project network spec for an EDM / EDM2 / SiD persistent network (chosen by class name + kwargs)."""
    name = stub.class_name.rsplit(".", 1)[-1]
    kw = {k: _jsonable(v) for k, v in stub.init_kwargs.items()}
    if stub.init_args:
        raise ImportError_(f"{where}: {name} was built with positional arguments; only keyword-built networks "
                           f"(as EDM / EDM2 write them) can be mapped to an architecture")
    missing = [k for k in ("img_resolution", "img_channels") if k not in kw]  # label_dim defaults to 0
    if missing:
        raise ImportError_(f"{where}: {name}'s constructor arguments lack {', '.join(missing)}")
    iface = {"img_resolution": int(kw.pop("img_resolution")), "img_channels": int(kw.pop("img_channels")),
             "label_dim": int(kw.pop("label_dim", 0))}
    if name in EDM2_PRECONDS:
        kw.pop("use_fp16", None)  # compute precision is the run's `precision`, master weights float32
        if _children(stub.state).get("logvar_linear") is None:  # SiD's EDM_2_Precond_Generator: no logvar head
            kw["logvar_channels"] = 0
        return {"arch": "edm2", **iface, "kwargs": kw, "precond": "edm2", "precond_kwargs": {}}
    if name not in PRECONDS:
        known = ", ".join([*PRECONDS, *EDM2_PRECONDS[:1]])
        raise ImportError_(f"{where}: unsupported network class {name!r} (this importer maps {known})")
    backbone = _children(stub.state).get("model")
    if not isinstance(backbone, PersistentStub):
        raise ImportError_(f"{where}: {name} has no persistent backbone at .model")
    bname = backbone.class_name.rsplit(".", 1)[-1]
    if bname not in BACKBONES:
        raise ImportError_(f"{where}: unsupported backbone class {bname!r} (this importer maps "
                           f"{', '.join(BACKBONES)})")
    bkw = {k: _jsonable(v) for k, v in backbone.init_kwargs.items() if k not in _BACKBONE_INTERFACE}
    precond = PRECONDS[name]
    pkw = {k: kw[k] for k in _PRECOND_KWARGS[precond] if k in kw}
    return {"arch": BACKBONES[bname], **iface, "kwargs": bkw, "precond": precond, "precond_kwargs": pkw}


def build_network(spec: Mapping[str, Any]) -> nn.Module:
    """The project network for ``spec`` (the one place a spec becomes a module)."""
    from sida_core.networks import build_denoiser

    extra = {}
    if spec.get("precond", "edm") not in ("edm", "edm2") or spec.get("precond_kwargs"):
        extra = {"precond": spec["precond"], "precond_kwargs": dict(spec.get("precond_kwargs") or {})}
    return build_denoiser(spec["arch"], int(spec["img_resolution"]), int(spec["img_channels"]),
                          int(spec.get("label_dim", 0)), dict(spec.get("kwargs") or {}), **extra)


def edm_constructor(spec: Mapping[str, Any]) -> dict:
    """EDM-style constructor of a project network: ``{"class_name", "init_kwargs"}`` as EDM's pickles record them
    (for ``sida export``: EDM / SiD users rebuild the net with their own code and load the exported state dict)."""
    iface = {k: spec[k] for k in _INTERFACE if k in spec}
    if spec["arch"] == "edm2":
        return {"class_name": "training.networks_edm2.Precond", "init_kwargs": {**iface, **spec.get("kwargs", {})}}
    inv_p = {v: k for k, v in PRECONDS.items()}
    inv_b = {v: k for k, v in BACKBONES.items()}
    if spec.get("precond", "edm") not in inv_p or spec["arch"] not in inv_b:
        return {"class_name": None, "init_kwargs": None,
                "note": f"arch {spec['arch']!r} has no EDM counterpart; rebuild it with sida_core.networks"}
    kwargs = {**iface, **dict(spec.get("precond_kwargs") or {}), "model_type": inv_b[spec["arch"]],
              **dict(spec.get("kwargs") or {})}
    return {"class_name": f"training.networks.{inv_p[spec.get('precond', 'edm')]}", "init_kwargs": kwargs}


def load_strict(net: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first missing / unexpected / misshapen key."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ImportError_(f"{where}: weights do not fit the architecture: {'; '.join(parts)} keys")
    for k, v in own.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise ImportError_(f"{where}: weights do not fit the architecture: {k} has shape {tuple(sd[k].shape)}, "
                               f"the network expects {tuple(v.shape)}")
    net.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------------- the importer
@dataclass
class ImportedNetwork:
    """A network read from a published file, with what says where it came from."""

    net: nn.Module
    spec: dict
    state_dict: dict
    provenance: dict = field(default_factory=dict)


def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        return "pickle"
    if suffix in (".pt", ".pth"):
        return "state_dict"
    if suffix == ".safetensors":
        return "safetensors"
    raise ImportError_(f"{path}: unknown file type {suffix or '(none)'!r}; expected .pkl (EDM / EDM2 / SiD), "
                       f".pt / .pth (a state dict) or .safetensors")


def _pick(obj: Any, key: Optional[str], path: Path) -> tuple[Any, str]:
    """The network inside a pickle's top level: ``obj[key]`` (default ``ema``) or the object itself."""
    if isinstance(obj, PersistentStub):
        return obj, "(top level)"
    if not isinstance(obj, Mapping):
        raise ImportError_(f"{path}: top level is a {type(obj).__name__}, expected a dict with an 'ema' network")
    key = key or "ema"
    if key not in obj:
        nets = [k for k, v in obj.items() if isinstance(v, PersistentStub)]
        raise ImportError_(f"{path}: no {key!r} key (has: {', '.join(map(str, obj)) or 'nothing'}; networks: "
                           f"{', '.join(map(str, nets)) or 'none'}); pick one with --key")
    net = obj[key]
    if not isinstance(net, PersistentStub):
        raise ImportError_(f"{path}: {key!r} is a {type(net).__name__}, not an EDM-persistent network")
    return net, key


def _read_state_dict(path: Path, fmt: str, key: Optional[str]) -> dict[str, torch.Tensor]:
    if path.stat().st_size == 0:
        raise ImportError_(f"{path}: empty file")
    sd: Any  # whatever the file holds; checked below
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only refuses code; anything else is a corrupt file
        raise ImportError_(f"{path}: not a readable {fmt.replace('_', ' ')} ({_one_line(exc)})") from None
    if key:
        if not isinstance(sd, Mapping) or key not in sd:
            raise ImportError_(f"{path}: no {key!r} entry in the file")
        sd = sd[key]
    elif isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        nested = [k for k, v in sd.items() if isinstance(v, Mapping)]
        raise ImportError_(f"{path}: holds no tensors at the top level (entries: {', '.join(map(str, nested)) or 'none'}); "
                           f"pick the state dict with --key")
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ImportError_(f"{path}: expected a mapping of parameter names to tensors")
    return dict(sd)


def _fit_prefix(sd: dict, net: nn.Module) -> dict:
    """A backbone-only state dict (FastGen / plain SongUNet keys) gets the precond's ``model.`` prefix."""
    own = net.state_dict()
    if set(sd) != set(own) and all(k.startswith("model.") for k in own) and set(f"model.{k}" for k in sd) == set(own):
        return {f"model.{k}": v for k, v in sd.items()}
    return sd


def import_network(path, *, spec: Optional[Mapping[str, Any]] = None, key: Optional[str] = None) -> ImportedNetwork:
    """Read ``path`` (EDM / EDM2 / SiD ``.pkl``, ``.pt`` / ``.pth`` state dict, ``.safetensors``) into a project net.

    For pickles the architecture comes from the file (``spec``, if given, must agree with it: a wrong-architecture
    override is an error); for state dicts ``spec`` is required. Weights are cast to float32 and loaded strictly.
    """
    path = Path(path)
    try:
        return _import_network(path, spec, key)
    except ImportError_:
        raise
    except Exception as exc:  # noqa: BLE001 - an untrusted file must never end in a traceback
        raise ImportError_(f"{path}: unexpected content ({_one_line(exc)})") from None


def _import_network(path: Path, spec: Optional[Mapping[str, Any]], key: Optional[str]) -> ImportedNetwork:
    if not path.is_file():
        raise ImportError_(f"{path}: no such file")
    fmt = _file_format(path)
    digest = sha256_file(path)
    prov: dict[str, Any] = {"source": str(path), "source_name": path.name, "source_sha256": digest, "format": fmt}
    if fmt == "pickle":
        obj, seen = read_pickle(path)
        stub, used_key = _pick(obj, key, path)
        file_spec = spec_from_stub(stub, where=str(path))
        if spec is not None and _arch_of(spec) != _arch_of(file_spec):
            raise ImportError_(f"{path}: holds a {stub.class_name} ({_arch_of(file_spec)}), but the config says "
                               f"{_arch_of(spec)}; drop teacher.network (the file decides) or fix it")
        sd = stub_state_dict(stub)
        prov.update(format="edm2-pkl" if file_spec["arch"] == "edm2" else "edm-pkl", key=used_key,
                    class_name=stub.class_name, init_kwargs=_jsonable(stub.init_kwargs),
                    module_src_sha256=stub.module_src_sha256, globals=sorted(seen),
                    source_dtypes=sorted({str(t.dtype).replace("torch.", "") for t in sd.values()}))
        spec = file_spec
    else:
        if spec is None:
            raise ImportError_(f"{path}: a {fmt.replace('_', ' ')} file holds no architecture; give the network "
                               f"(teacher.network in the config, and the data's resolution / channels / classes)")
        sd = _read_state_dict(path, fmt, key)
        prov.update(key=key, source_dtypes=sorted({str(t.dtype).replace("torch.", "") for t in sd.values()}))
    spec = dict(spec)
    try:
        with torch.random.fork_rng(devices=[]):  # construction draws init weights: keep the caller's RNG as it was
            net = build_network(spec)
    except (TypeError, ValueError) as exc:
        raise ImportError_(f"{path}: cannot build the network it describes ({_one_line(exc)})") from None
    sd = _fit_prefix(_to_float32(sd), net)
    load_strict(net, sd, str(path))
    net = net.eval().requires_grad_(False)
    prov["num_params"] = sum(p.numel() for p in net.parameters())
    return ImportedNetwork(net=net, spec=spec, state_dict=net.state_dict(), provenance=prov)


def _arch_of(spec: Mapping[str, Any]) -> str:
    return f"{spec['arch']}/{spec.get('precond', 'edm')}" if spec["arch"] != "edm2" else "edm2"


IMPORT_SUFFIXES = (".pkl", ".pt", ".pth", ".safetensors")


def is_importable(path) -> bool:
    """True for a file this module imports (a published network), False for a project checkpoint folder."""
    p = Path(path)
    return p.suffix.lower() in IMPORT_SUFFIXES and not p.is_dir()


def import_to_checkpoint(src, out, *, spec: Optional[Mapping[str, Any]] = None, key: Optional[str] = None,
                         kind: str = "teacher") -> tuple[Path, ImportedNetwork]:
    """Import ``src`` and write it as a verified project checkpoint folder ``out`` (``state['net']``), atomically.

    The manifest records the provenance (source sha256, class name, init kwargs, source-code hash, parameter count).
    Nothing is written when the import fails.
    """
    from sida_core import checkpoint as ckpt

    imported = import_network(src, spec=spec, key=key)
    prov = imported.provenance
    path = ckpt.save_checkpoint(out, {"net": imported.state_dict}, kind=kind, kimg=0.0, cur_nimg=0,
                                config={"imported_from": prov["source_name"]}, network=imported.spec,
                                extra={"imported": prov})  # hashed from the written file; every load verifies
    return path, imported


def cached_import(src, cache_root, *, spec: Optional[Mapping[str, Any]] = None, key: Optional[str] = None) -> Path:
    """The project checkpoint of ``src`` under ``cache_root``, imported once and keyed by content (file sha256 plus,
    for state dicts, the architecture): every worker, trial and rerun on this machine shares it."""
    import json

    from sida_core import checkpoint as ckpt

    src = Path(src)
    if not src.is_file():
        raise ImportError_(f"teacher.path {src}: no such file")
    recipe = {"sha256": sha256_file(src), "key": key, "spec": None if src.suffix.lower() == ".pkl" else spec, "v": 1}
    tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]
    out = Path(cache_root) / f"imported-{src.stem[:40]}-{tag}"
    if out.exists():
        try:
            ckpt.verify_checkpoint(out)
            return out
        except ckpt.CheckpointError:
            pass  # a damaged cache entry is simply imported again (save_checkpoint replaces it atomically)
    path, _ = import_to_checkpoint(src, out, spec=spec, key=key)
    return path
