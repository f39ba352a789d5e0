"""Test fixtures in the EDM / EDM2 / SiD pickle formats, written without any EDM code.

EDM's ``torch_utils.persistence`` reduces every network object to ``_reconstruct_persistent_obj(meta)`` with
``meta = {type: 'class', version: 6, module_src, class_name, state}``. Here a throw-away module is registered under
``torch_utils.persistence`` (and ``dnnlib.util`` for EDM2's ``EasyDict``) only while *writing*; each of the project's
modules is reduced the same way, its ``module_src`` a program that would leave a marker file and abort if anyone
ran it. Non-persistent torch containers (``ModuleDict``) are pickled as torch pickles them: the class plus its
``__dict__``.
"""
from __future__ import annotations

import contextlib
import copyreg
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

#: project class name -> the class name EDM / EDM2 records (equal where the project kept EDM's names)
EDM_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet"}


def poison_source(marker: Path) -> str:
    """Module source that proves execution: it writes ``marker`` and aborts."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n"
            f"raise SystemExit('module_src of a checkpoint was executed')\n")


@contextlib.contextmanager
def _fake_modules():
    """``torch_utils.persistence`` and ``dnnlib.util`` exist only while writing (pickle looks functions up by name)."""
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    pers = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called by the importer under test
        raise AssertionError("the real persistence loader must not run in these tests")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": pers,
                        "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util})
    try:
        yield pers, util
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Persistent:
    """Pickles as EDM's persistent objects do: ``(_reconstruct_persistent_obj, (meta,))``."""

    def __init__(self, fn, meta):
        self.fn, self.meta = fn, meta

    def __reduce__(self):
        return self.fn, (self.meta,)


class _Container:
    """Pickles as a torch container (ModuleDict / ModuleList): NEWOBJ of the real class, then BUILD its state."""

    def __init__(self, cls, state):
        self.cls, self.state = cls, state

    @property  # pickle checks that NEWOBJ's class is the object's own
    def __class__(self):
        return self.cls

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (self.cls,), self.state


def _mirror(module: nn.Module, fn, src: str, kwargs_of: Mapping[int, dict], dtype: Optional[torch.dtype],
            names: Optional[Mapping[int, str]] = None):
    state = dict(vars(module))
    state["_parameters"] = {k: (None if v is None else _cast(v, dtype, param=True)) for k, v in module._parameters.items()}
    state["_buffers"] = {k: (None if v is None else _cast(v, dtype)) for k, v in module._buffers.items()}
    state["_modules"] = {k: (None if v is None else _mirror(v, fn, src, kwargs_of, dtype, names))
                         for k, v in module._modules.items()}
    if type(module).__module__.startswith("torch.nn"):
        return _Container(type(module), state)
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(kwargs_of.get(id(module), {}))
    name = (names or {}).get(id(module)) or EDM_NAMES.get(type(module).__name__, type(module).__name__)
    return _Persistent(fn, dict(type="class", version=6, module_src=src, class_name=name, state=state))


def _cast(t: torch.Tensor, dtype, param: bool = False):
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return nn.Parameter(t, requires_grad=False) if param else t


def edm_init_kwargs(net: nn.Module, spec: Mapping[str, Any], fp16: bool = False) -> dict[int, dict]:
    """The ``_init_kwargs`` EDM records for the precond and its backbone (what the importer reads)."""
    iface = dict(img_resolution=spec["img_resolution"], img_channels=spec["img_channels"], label_dim=spec["label_dim"])
    kw = dict(spec.get("kwargs") or {})
    if spec["arch"] == "edm2":
        return {id(net): {**iface, "use_fp16": True, **kw}}
    model_type = {"songunet": "SongUNet", "adm": "DhariwalUNet"}[spec["arch"]]
    top = {**iface, "use_fp16": fp16, **dict(spec.get("precond_kwargs") or {}), "model_type": model_type, **kw}
    backbone = dict(img_resolution=spec["img_resolution"], in_channels=spec["img_channels"],
                    out_channels=spec["img_channels"], label_dim=spec["label_dim"], **kw)
    return {id(net): top, id(net.model): backbone}


def write_edm_pickle(path: Path, net: nn.Module, spec: Mapping[str, Any], *, marker: Path, key: str = "ema",
                     edm2: bool = False, extra: Optional[dict] = None, extra_nets: Optional[dict] = None,
                     protocol: int = pickle.DEFAULT_PROTOCOL, class_name: Optional[str] = None) -> Path:
    """Write ``net`` as EDM (dict, float32) or EDM2 (EasyDict, ``ema`` in float16) would; returns ``path``.
    ``extra_nets``: more networks under other keys, ``{key: (net, spec)}`` (SiD's snapshots hold several).
    ``class_name``: the top network's recorded class (default: EDM's name for the project class)."""
    with _fake_modules() as (pers, util):
        fn = pers._reconstruct_persistent_obj
        src = poison_source(marker)
        dtype = torch.float16 if edm2 else None
        top = _mirror(net, fn, src, edm_init_kwargs(net, spec), dtype, {id(net): class_name} if class_name else None)
        extra = {**(extra or {}), **{k: _mirror(n, fn, src, edm_init_kwargs(n, s), dtype)
                                     for k, (n, s) in (extra_nets or {}).items()}}
        if edm2:
            data = util.EasyDict(encoder=None, dataset_kwargs={"class_name": "training.dataset.ImageFolderDataset"},
                                 loss_fn=None, **{key: top}, **(extra or {}))
        else:
            data = {key: top, "loss_fn": None, "augment_pipe": None,
                    "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset"}, **(extra or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
    return path


class Evil:
    """Reduces to ``os.system``-style calls: what a hostile checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args
