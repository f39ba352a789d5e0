"""``sida teacher import SRC --out URI``: a published EDM / EDM2 / SiD network, or a state dict, converted once into a
verified project checkpoint (local folder or ``s3://``) with its provenance. No code from SRC is ever run
(see sida_core/importer.py)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence


def run_teacher_import(src: str, out: str, *, key: Optional[str] = None, config: Optional[str] = None,
                       overrides: Sequence[str] = (), endpoint_url: Optional[str] = None) -> dict:
    """Import ``src`` into the checkpoint folder ``out``; returns the one-line summary as a dict.

    ``config`` (+ ``overrides``) gives the architecture for a plain state dict: ``teacher.network`` and the data's
    resolution / channels / classes. For a ``.pkl`` the file decides (a config, if given, must agree).
    """
    from store.storage import Storage
    from schemas.loader import ConfigError, load_run_config
    from sida_core.importer import import_to_checkpoint
    from sida_core.training_loop import network_spec

    spec = None
    if config is not None:
        spec = network_spec(load_run_config(config, overrides))
    elif Path(src).suffix.lower() != ".pkl":
        raise ConfigError(f"{src}: a state dict holds no architecture; pass --config CONFIG (teacher.network and "
                          f"data.resolution / channels / num_classes say what to build)")
    storage = Storage(out, endpoint_url=endpoint_url)
    if storage.exists("manifest.json"):
        raise ConfigError(f"--out {storage.uri} already holds a checkpoint; pick another folder")
    with tempfile.TemporaryDirectory(prefix="sida-import-") as scratch:
        local, imported = import_to_checkpoint(src, Path(scratch) / "ckpt", spec=spec, key=key)  # ImportError_: 1 line
        storage.upload_dir(local, "", last=["manifest.json"])
    prov, net = imported.provenance, imported.spec
    return {"out": storage.uri, "format": prov["format"], "class_name": prov.get("class_name"), "arch": net["arch"],
            "precond": net.get("precond", "edm"), "img_resolution": net["img_resolution"],
            "img_channels": net["img_channels"], "label_dim": net["label_dim"], "num_params": prov["num_params"],
            "source_sha256": prov["source_sha256"], "module_src_sha256": prov.get("module_src_sha256")}
