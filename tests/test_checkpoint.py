"""The checkpoint format (sida_core/checkpoint.py): round trip, manifest, hashes, atomicity, latest-valid search."""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime

import numpy as np
import pytest
import torch
from torch import nn

from schemas.run import RunConfig
from sida_core import checkpoint as ck
from sida_core.checkpoint import (CheckpointError, checkpoint_name, find_latest_valid, load_checkpoint,
                                  save_checkpoint, verify_checkpoint)

NETWORK = {"arch": "songunet", "img_resolution": 8, "img_channels": 1, "label_dim": 0, "kwargs": {"model_channels": 16}}


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def _adam_like_state(net: nn.Module) -> dict:
    """The structure of ``torch.optim.Adam(...).state_dict()`` (building a real optimizer imports torch._dynamo,
    which costs seconds): int keys, tensors, a betas tuple, None and bool leaves."""
    params = list(net.parameters())
    return {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                      for i, p in enumerate(params)},
            "param_groups": [{"lr": 1e-5, "betas": (0.0, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False,
                              "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                              "fused": None, "params": list(range(len(params)))}]}


def _state(seed: int = 0) -> dict:
    net = _net(seed)
    net(torch.randn(2, 1, 6, 6))  # materialise the lazy layer, update BatchNorm running stats
    return {"generator": net.state_dict(), "opt": _adam_like_state(net), "rng": {"torch": torch.get_rng_state()},
            "step": 3, "note": "plain", "nothing": None, "pair": (1, 2.5)}


def _save(path, seed: int = 0, cur_nimg: int = 1024, **kw):
    return save_checkpoint(path, _state(seed), kind="distill", kimg=cur_nimg / 1000, cur_nimg=cur_nimg,
                           config={"name": "t", "loss": {"alpha": 1.0}}, network=NETWORK, **kw)


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_restores_module_and_optimizer(tmp_path):
    state = _state(1)
    out = save_checkpoint(tmp_path / checkpoint_name(2048), state, kind="distill", kimg=2.048, cur_nimg=2048,
                          config={"name": "t"}, network=NETWORK)
    assert out == tmp_path / "ckpt-000000002048"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "state.pt"]
    loaded, manifest = load_checkpoint(out)
    _assert_same(state, loaded)
    net = _net(5)
    net(torch.zeros(1, 1, 6, 6))  # materialise the lazy layer
    net.load_state_dict(loaded["generator"])
    _assert_same(net.state_dict(), state["generator"])
    assert isinstance(loaded["pair"], tuple) and list(loaded["opt"]["state"]) == [0, 1, 2, 3, 4, 5]
    assert manifest["cur_nimg"] == 2048


def test_manifest_content(tmp_path):
    cfg = RunConfig(name="demo")
    out = save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, kind="teacher", kimg=1.5, cur_nimg=1500,
                          config=cfg, network=NETWORK, extra={"fid": 3.25, "best": True})
    m = json.loads((out / "manifest.json").read_text())
    assert (m["format"], m["version"], m["kind"], m["kimg"], m["cur_nimg"]) == ("sida-checkpoint", 1, "teacher", 1.5, 1500)
    assert m["config"] == cfg.model_dump(mode="json") and m["network"] == NETWORK
    data = (out / "state.pt").read_bytes()
    assert m["files"] == {"state.pt": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    assert m["content_hash"] == hashlib.sha256(f"state.pt:{m['files']['state.pt']['sha256']}\n".encode()).hexdigest()
    assert datetime.fromisoformat(m["created"]).tzinfo is not None
    assert (m["fid"], m["best"]) == (3.25, True)
    assert load_checkpoint(out)[1] == m


def test_state_must_load_with_weights_only(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\].*numpy.ndarray"):
        save_checkpoint(tmp_path / "c", {"rng": {"numpy": np.zeros(3)}}, kind="distill", kimg=0, cur_nimg=0,
                        config={}, network={})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "c", {}, kind="distill", kimg=0, cur_nimg=0, config={}, network={},
                        extra={"kimg": 5})
    assert list(tmp_path.iterdir()) == []


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_in_state_is_caught(tmp_path):
    out = _save(tmp_path / "c")
    _flip_byte(out / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: sha256 mismatch") as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value) and str(out) in str(info.value)


def test_edited_manifest_is_caught(tmp_path):
    out = _save(tmp_path / "c")
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    m["kimg"] = 999.0
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="manifest_sha256 mismatch"):
        load_checkpoint(out)
    # a consistent-looking edit of a file hash is still caught by content_hash / the file hash
    m["kimg"] = 1.024
    m["files"]["state.pt"]["sha256"] = "0" * 64
    m["manifest_sha256"] = ck._manifest_hash(m)
    path.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="content_hash"):
        load_checkpoint(out)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format="other"), "format must be 'sida-checkpoint'"),
    (lambda m: m.update(version=2), "unsupported version 2"),
])
def test_wrong_format_or_version(tmp_path, edit, match):
    out = _save(tmp_path / "c")
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    m["manifest_sha256"] = ck._manifest_hash(m)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(out)


def test_missing_pieces(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nope")
    out = _save(tmp_path / "a")
    (out / "state.pt").unlink()
    with pytest.raises(CheckpointError, match=r"state\.pt: missing file"):
        load_checkpoint(out)
    out = _save(tmp_path / "b")
    (out / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="missing manifest"):
        load_checkpoint(out)
    out = _save(tmp_path / "c")
    (out / "manifest.json").write_text('{"format": "sida-check')  # torn write
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        load_checkpoint(out)


def test_truncated_state_never_loads(tmp_path):
    out = _save(tmp_path / "c")
    data = (out / "state.pt").read_bytes()
    (out / "state.pt").write_bytes(data[: len(data) // 2])
    for verify in (True, False):
        with pytest.raises(CheckpointError, match="truncated"):
            load_checkpoint(out, verify=verify)


def test_crash_while_writing_leaves_nothing_loadable(tmp_path, monkeypatch):
    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)  # checkpoint.py imports torch where it saves
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / checkpoint_name(1024))
    assert list(tmp_path.iterdir()) == []  # no target, temp folder cleaned up
    assert find_latest_valid(tmp_path) is None


def test_leftover_temp_folder_is_ignored(tmp_path):
    good = _save(tmp_path / checkpoint_name(1000), cur_nimg=1000)
    # a hard crash (no cleanup) after state.pt but before the manifest
    tmp = tmp_path / f".{checkpoint_name(2000)}.tmp-deadbeef"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes((good / "state.pt").read_bytes())
    assert find_latest_valid(tmp_path) == good
    with pytest.raises(CheckpointError, match="missing manifest"):
        load_checkpoint(tmp)


def test_find_latest_valid_skips_corrupt_newest(tmp_path):
    assert find_latest_valid(tmp_path / "missing") is None
    assert find_latest_valid(tmp_path) is None
    paths = [_save(tmp_path / checkpoint_name(n), seed=i, cur_nimg=n) for i, n in enumerate([512, 1024, 99000])]
    (tmp_path / "notes").mkdir()  # not a checkpoint name: ignored
    assert find_latest_valid(tmp_path) == paths[2]  # numeric order, not mtime
    _flip_byte(paths[2] / "state.pt")
    with pytest.warns(RuntimeWarning, match=rf"skipping invalid checkpoint .*{paths[2].name}.*sha256"):
        assert find_latest_valid(tmp_path) == paths[1]
    (paths[1] / "manifest.json").unlink()
    (paths[0] / "state.pt").write_bytes(b"")
    with pytest.warns(RuntimeWarning) as record:
        assert find_latest_valid(tmp_path) is None
    assert len(record) == 3


def test_atomic_overwrite(tmp_path):
    target = tmp_path / checkpoint_name(1024)
    _save(target, seed=0)
    _save(target, seed=1)
    loaded, _ = load_checkpoint(target)
    _assert_same(loaded["generator"], _state(1)["generator"])
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp / old folders left


def test_failed_overwrite_keeps_previous_version(tmp_path, monkeypatch):
    target = tmp_path / checkpoint_name(1024)
    _save(target, seed=0)
    real_rename, calls = os.rename, []

    def flaky_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder into place
            raise OSError("power cut")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="power cut"):
        _save(target, seed=1)
    monkeypatch.undo()
    loaded, _ = load_checkpoint(target)
    _assert_same(loaded["generator"], _state(0)["generator"])
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert verify_checkpoint(target)["kind"] == "distill"


def test_a_resume_never_silently_restarts_over_damaged_checkpoints(tmp_path):
    """RunStore.load_latest_valid (what every resume reads): the newest that verifies; None when nothing was ever
    committed (an upload cut before its manifest); an error, not None, when committed checkpoints all fail."""
    from store.run_store import RunStore
    from store.storage import Storage

    store = RunStore(Storage(str(tmp_path / "run")))
    (tmp_path / "run" / checkpoint_name(256)).mkdir(parents=True)  # never committed: no manifest
    with pytest.warns(RuntimeWarning):
        assert store.load_latest_valid() is None
    paths = [_save(tmp_path / "run" / checkpoint_name(n), seed=i, cur_nimg=n) for i, n in enumerate([512, 1024])]
    assert store.load_latest_valid()[2] == paths[1].name
    _flip_byte(paths[1] / "state.pt")
    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        assert store.load_latest_valid()[2] == paths[0].name
    (paths[0] / "state.pt").write_bytes(b"")
    with pytest.warns(RuntimeWarning), pytest.raises(CheckpointError) as info:
        store.load_latest_valid()
    msg = str(info.value)
    assert "none of its 2 committed checkpoint(s) verifies" in msg and paths[1].name in msg and "\n" not in msg
