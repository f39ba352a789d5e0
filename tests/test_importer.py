"""Safe import of EDM / EDM2 / SiD pickles and plain state dicts (sida_core/importer.py).

Every fixture is written by tests/edm_pickles.py in the published formats without EDM code; its embedded
``module_src`` would leave a marker file if it ever ran.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edm_pickles import Evil, write_edm_pickle
from sida_core import checkpoint as ckpt
from sida_core.importer import ImportError_, cached_import, import_network, import_to_checkpoint, read_pickle
from sida_core.networks import build_denoiser

ROOT = Path(__file__).resolve().parents[1]
SIDA = Path(sys.executable).parent / "sida"
TINY = {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "dropout": 0.0,
        "augment_dim": 9}


def spec_of(label_dim=10, **kw):
    return {"arch": "songunet", "img_resolution": 8, "img_channels": 3, "label_dim": label_dim,
            "kwargs": {**TINY, **kw}}


def make_net(spec, seed=0):
    torch.manual_seed(seed)
    net = build_denoiser(spec["arch"], spec["img_resolution"], spec["img_channels"], spec["label_dim"], spec["kwargs"])
    with torch.no_grad():  # non-trivial weights everywhere (EDM's zero-init output layers would hide mistakes)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def outputs(net, label_dim=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 0.5, 2.0, 40.0])
    c = torch.eye(label_dim)[:4] if label_dim else None
    with torch.no_grad():
        return net(x, sigma, c), net(x, sigma, c, return_flag="encoder")


@pytest.fixture()
def edm_file(tmp_path):
    spec = spec_of()
    net = make_net(spec)
    path = write_edm_pickle(tmp_path / "edm-tiny.pkl", net, spec, marker=tmp_path / "EXECUTED")
    return path, net, spec


def test_edm_pickle_round_trip_is_exact_and_never_runs_module_src(edm_file, tmp_path):
    path, net, spec = edm_file
    imported = import_network(path)
    assert not (tmp_path / "EXECUTED").exists()
    assert imported.spec == {**spec, "precond": "edm", "precond_kwargs": {}}
    for a, b in zip(outputs(imported.net), outputs(net)):
        assert torch.equal(a, b)
    prov = imported.provenance
    assert prov["format"] == "edm-pkl" and prov["class_name"] == "EDMPrecond" and prov["key"] == "ema"
    assert len(prov["module_src_sha256"]) == 64 and prov["num_params"] == sum(p.numel() for p in net.parameters())
    assert prov["init_kwargs"]["model_type"] == "SongUNet"
    # exactly the globals EDM's own pickles use (TEACHER_FORMATS.md), nothing else
    _, seen = read_pickle(path)
    assert seen == {"torch_utils.persistence._reconstruct_persistent_obj", "torch._utils._rebuild_tensor_v2",
                    "torch._utils._rebuild_parameter", "torch.storage._load_from_bytes", "collections.OrderedDict",
                    "torch.nn.modules.container.ModuleDict", "numpy.dtype", "numpy._core.multiarray.scalar"}


def test_unconditional_and_protocol2_pickles(tmp_path):
    spec = spec_of(label_dim=0)
    net = make_net(spec, seed=3)
    path = write_edm_pickle(tmp_path / "p2.pkl", net, spec, marker=tmp_path / "EXECUTED", protocol=2)
    imported = import_network(path)
    for a, b in zip(outputs(imported.net, 0), outputs(net, 0)):
        assert torch.equal(a, b)
    assert not (tmp_path / "EXECUTED").exists()


def test_edm2_container_float16_is_cast_to_float32(tmp_path):
    spec = spec_of()
    net = make_net(spec, seed=4)
    path = write_edm_pickle(tmp_path / "edm2-format.pkl", net, spec, marker=tmp_path / "EXECUTED", edm2=True)
    imported = import_network(path)
    assert imported.provenance["source_dtypes"] == ["float16"]
    assert all(t.dtype == torch.float32 for t in imported.state_dict.values() if t.is_floating_point())
    for k, v in net.state_dict().items():  # exactly the float16-rounded weights
        assert torch.equal(imported.state_dict[k], v.half().float()), k


def test_sid_pickle_with_several_networks_picks_by_key(tmp_path):
    spec = spec_of()
    g, f = make_net(spec, seed=5), make_net(spec, seed=6)
    path = write_edm_pickle(tmp_path / "sida-snapshot.pkl", g, spec, marker=tmp_path / "EXECUTED",
                            extra_nets={"fake_score": (f, spec)})
    with pytest.raises(ImportError_, match="no 'generator' key .*networks: ema, fake_score"):
        import_network(path, key="generator")
    for key, ref in (("ema", g), ("fake_score", f)):
        for a, b in zip(outputs(import_network(path, key=key).net), outputs(ref)):
            assert torch.equal(a, b)


FAMILIES = {  # every network family a published EDM / EDM2 / SiD file holds, tiny, with the files' options
    "ddpmpp-edm": ("songunet", "edm", {}, {**TINY}),
    "ncsnpp-ve": ("songunet", "ve", {"sigma_min": 0.02, "sigma_max": 100.0},
                  {**TINY, "embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
                   "decoder_type": "standard", "resample_filter": [1, 3, 3, 1]}),
    "ncsnpp-skip-edm": ("songunet", "edm", {}, {**TINY, "embedding_type": "fourier", "channel_mult_noise": 2,
                                                 "encoder_type": "skip", "decoder_type": "skip",
                                                 "resample_filter": [1, 3, 3, 1]}),
    "ddpmpp-vp": ("songunet", "vp", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}, {**TINY}),
    "adm-edm": ("adm", "edm", {}, {"model_channels": 64, "channel_mult": [1, 2], "num_blocks": 1,
                                   "attn_resolutions": [4], "dropout": 0.1, "augment_dim": 0}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_edm_family_round_trips_exactly(tmp_path, family):
    arch, precond, pkw, kw = FAMILIES[family]
    spec = {**spec_of(), "arch": arch, "kwargs": kw, "precond": precond, "precond_kwargs": pkw}
    torch.manual_seed(0)
    net = make_net_spec(spec)
    path = write_edm_pickle(tmp_path / f"{family}.pkl", net, spec, marker=tmp_path / "EXECUTED")
    imported = import_network(path)
    assert imported.spec == spec and not (tmp_path / "EXECUTED").exists()
    for a, b in zip(outputs(imported.net), outputs(net)):
        assert torch.equal(a, b)


def make_net_spec(spec):
    from sida_core.importer import build_network

    net = build_network(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_cli_teacher_import_to_s3(tmp_path, edm_file, s3_bucket):
    from store.storage import Storage

    path, net, _ = edm_file
    uri = f"{s3_bucket.uri}/teachers/tiny"
    env = _env(tmp_path)  # the s3_server fixture put the S3 credentials into os.environ
    cmd = [str(SIDA)] if SIDA.exists() else [sys.executable, "-m", "pipelines.cli"]
    proc = subprocess.run(cmd + ["teacher", "import", str(path), "--out", uri, "--endpoint-url", s3_bucket.endpoint_url],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    storage = Storage(uri, endpoint_url=s3_bucket.endpoint_url)
    assert sorted(storage.listdir()) == ["manifest.json", "state.pt"]
    local = tmp_path / "fetched"
    storage.download_dir("", local)
    state, manifest = ckpt.load_checkpoint(local)
    assert manifest["imported"]["class_name"] == "EDMPrecond"
    assert all(torch.equal(state["net"][k], v) for k, v in net.state_dict().items())


EDM2_TINY = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
             "channels_per_head": 8}


@pytest.mark.parametrize("logvar", [True, False], ids=["edm2-precond", "sid-edm2-generator"])
def test_edm2_network_pickle(tmp_path, logvar):
    """EDM2's Precond (float16 in the file), and the SiD authors' EDM2 generator class, which has no logvar head."""
    spec = {"arch": "edm2", "img_resolution": 8, "img_channels": 4, "label_dim": 10,
            "kwargs": {**EDM2_TINY, **({} if logvar else {"logvar_channels": 0})}}
    net = make_net(spec, seed=9)
    path = write_edm_pickle(tmp_path / "edm2-img512-tiny.pkl", net, spec, marker=tmp_path / "EXECUTED", edm2=True,
                            class_name=None if logvar else "EDM_2_Precond_Generator")
    imported = import_network(path)
    assert not (tmp_path / "EXECUTED").exists()
    assert imported.spec["arch"] == "edm2" and imported.spec["kwargs"] == spec["kwargs"]
    assert imported.provenance["format"] == "edm2-pkl" and imported.provenance["source_dtypes"] == ["float16"]
    half = make_net(spec, seed=9)
    half.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})
    g = torch.Generator().manual_seed(2)
    x, sigma, c = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.1, 1.0, 10.0]), torch.eye(10)[:3]
    with torch.no_grad():
        assert torch.equal(imported.net(x, sigma, c), half(x, sigma, c))
        if logvar:
            assert torch.equal(imported.net(x, sigma, c, return_logvar=True)[1], half(x, sigma, c, return_logvar=True)[1])
    assert hasattr(imported.net, "logvar_linear") and (imported.net.logvar_linear is None) is not logvar


def test_edm_constructor_is_what_edm_records(tmp_path):
    """sida export's "edm" field: the class and constructor arguments EDM's pickles record for the same network."""
    from edm_pickles import edm_init_kwargs
    from sida_core.importer import edm_constructor

    for spec in (spec_of(), {**spec_of(label_dim=0), "kwargs": {**TINY, "augment_dim": 0}},
                 {"arch": "edm2", "img_resolution": 8, "img_channels": 4, "label_dim": 10, "kwargs": EDM2_TINY}):
        net = make_net(spec)
        recorded = edm_init_kwargs(net, spec)[id(net)]
        recorded.pop("use_fp16")
        out = edm_constructor({**spec, "precond": "edm2" if spec["arch"] == "edm2" else "edm", "precond_kwargs": {}})
        assert out["init_kwargs"] == recorded
        assert out["class_name"] == ("training.networks_edm2.Precond" if spec["arch"] == "edm2"
                                     else "training.networks.EDMPrecond")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dicts_need_an_architecture_and_load_strictly(tmp_path, suffix):
    spec = spec_of()
    net = make_net(spec, seed=7)
    path = tmp_path / f"weights{suffix}"
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    if suffix == ".pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    with pytest.raises(ImportError_, match="holds no architecture"):
        import_network(path)
    for a, b in zip(outputs(import_network(path, spec=spec).net), outputs(net)):
        assert torch.equal(a, b)
    wrong = spec_of(model_channels=32)
    with pytest.raises(ImportError_, match=r"shape .* the network expects"):
        import_network(path, spec=wrong)
    other = {**spec, "kwargs": {**spec["kwargs"], "num_blocks": 2}}
    with pytest.raises(ImportError_, match=r"weights do not fit the architecture: \d+ missing \(first: model\."):
        import_network(path, spec=other)


def test_backbone_only_state_dict_gets_the_precond_prefix(tmp_path):
    spec = spec_of()
    net = make_net(spec, seed=8)
    torch.save(net.model.state_dict(), tmp_path / "backbone.pth")
    for a, b in zip(outputs(import_network(tmp_path / "backbone.pth", spec=spec).net), outputs(net)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("target", [("os", "system", "echo pwned > {m}"), ("builtins", "eval", "open('{m}','w')"),
                                    ("subprocess", "Popen", "touch {m}"), ("training.networks", "Foo", None)])
def test_hostile_or_unknown_globals_are_refused_and_nothing_is_written(tmp_path, target):
    module, name, arg = target
    marker = tmp_path / "PWNED"
    if module == "training.networks":
        sys.modules.setdefault("training", type(sys)("training"))
        mod = type(sys)("training.networks")

        class Foo:
            pass

        Foo.__module__, Foo.__qualname__ = "training.networks", "Foo"
        mod.Foo = Foo
        sys.modules["training.networks"] = mod
        try:
            payload = {"ema": Foo()}
            data = pickle.dumps(payload)
        finally:
            sys.modules.pop("training.networks", None)
    else:
        fn = getattr(__import__(module), name)
        module = fn.__module__  # os.system pickles as posix.system
        cmd = arg.format(m=marker)
        data = pickle.dumps({"ema": Evil(fn, cmd if name != "Popen" else ["sh", "-c", cmd])})
    path = tmp_path / "evil.pkl"
    path.write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(ImportError_) as err:
        import_to_checkpoint(path, out)
    msg = str(err.value)
    assert "\n" not in msg and f"it references {module}.{name}" in msg and "refusing to load evil.pkl" in msg
    assert not marker.exists() and not out.exists()


def _damaged(tmp_path, edm_file):
    path, _, _ = edm_file
    good = path.read_bytes()
    yield "empty", b"", "empty file"
    yield "text", b"hello, this is not a pickle\n", "not a pickle"
    yield "zip", b"PK\x03\x04" + good[:100], "zip archive"
    for cut in (2, len(good) // 3, len(good) - 5):
        yield f"truncated{cut}", good[:cut], "not a readable network pickle"


def test_damaged_files_give_one_line_errors(tmp_path, edm_file):
    for name, data, needle in _damaged(tmp_path, edm_file):
        p = tmp_path / f"{name}.pkl"
        p.write_bytes(data)
        with pytest.raises(ImportError_, match=needle) as err:
            import_network(p)
        assert "\n" not in str(err.value), name


def test_bit_flips_never_crash_the_importer(tmp_path, edm_file):
    """A flipped byte either still loads (a weight changed: pickles carry no checksum) or is a one-line error."""
    path, _, _ = edm_file
    good = bytearray(path.read_bytes())
    gen = torch.Generator().manual_seed(0)
    outcomes = {"loaded": 0, "refused": 0}
    for i in torch.randint(0, len(good), (60,), generator=gen).tolist() + list(range(0, 400, 7)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        p = tmp_path / "flipped.pkl"
        p.write_bytes(bytes(bad))
        try:
            import_network(p)
            outcomes["loaded"] += 1
        except ImportError_ as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and not (tmp_path / "EXECUTED").exists()


def test_missing_ema_and_wrong_architecture_override(tmp_path, edm_file):
    path, net, spec = edm_file
    other = write_edm_pickle(tmp_path / "nokey.pkl", net, spec, marker=tmp_path / "EXECUTED", key="G_ema")
    with pytest.raises(ImportError_, match="no 'ema' key .*networks: G_ema"):
        import_network(other)
    adm = {**spec, "arch": "adm", "kwargs": {}}
    with pytest.raises(ImportError_, match=r"holds a EDMPrecond \(songunet/edm\), but the config says adm/edm"):
        import_network(path, spec=adm)


def test_import_to_checkpoint_records_provenance_and_cache_is_by_content(tmp_path, edm_file):
    path, net, _ = edm_file
    out, imported = import_to_checkpoint(path, tmp_path / "teacher")
    state, manifest = ckpt.load_checkpoint(out)
    assert manifest["kind"] == "teacher" and manifest["network"] == imported.spec
    prov = manifest["imported"]
    assert prov["source_sha256"] == imported.provenance["source_sha256"] and prov["class_name"] == "EDMPrecond"
    assert {k: torch.equal(v, net.state_dict()[k]) for k, v in state["net"].items()} == {k: True for k in state["net"]}
    first = cached_import(path, tmp_path / "cache")
    mtime = (first / "manifest.json").stat().st_mtime_ns
    assert cached_import(path, tmp_path / "cache") == first and (first / "manifest.json").stat().st_mtime_ns == mtime


def _env(tmp_path):
    return {**os.environ, "SIDA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _sida(args, tmp_path):
    cmd = [str(SIDA)] if SIDA.exists() else [sys.executable, "-m", "pipelines.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT,
                          timeout=300)


def test_cli_teacher_import(tmp_path, edm_file):
    path, net, _ = edm_file
    proc = _sida(["teacher", "import", path, "--out", tmp_path / "imported"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["arch"] == "songunet" and out["num_params"] == sum(p.numel() for p in net.parameters())
    assert "imported" in proc.stderr and f"{out['num_params']:,} parameters" in proc.stderr
    ckpt.verify_checkpoint(tmp_path / "imported")
    # a hostile pickle: one line, exit 2, nothing written
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Evil(os.system, f"touch {tmp_path / 'PWNED'}")}))
    proc = _sida(["teacher", "import", evil, "--out", tmp_path / "evil-out"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "it references posix.system" in proc.stderr or "it references os.system" in proc.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "evil-out").exists()
    # a state dict without --config
    torch.save(net.state_dict(), tmp_path / "w.pt")
    proc = _sida(["teacher", "import", tmp_path / "w.pt", "--out", tmp_path / "w-out"], tmp_path)
    assert proc.returncode == 2 and "pass --config" in proc.stderr and "Traceback" not in proc.stderr


def test_cyclic_or_malformed_module_trees_are_one_line_errors(tmp_path):
    """Hand-made streams with the allowed globals only: a ModuleDict that contains itself, bad constructor values."""
    import collections

    from edm_pickles import _Container, _fake_modules, _Persistent

    with _fake_modules() as (pers, _):
        fn = pers._reconstruct_persistent_obj
        loop = _Container(torch.nn.ModuleDict, {})
        loop.state.update(_modules=collections.OrderedDict(self=loop), _parameters={}, _buffers={})
        kw = {"img_resolution": 8, "img_channels": 3, "label_dim": 0}
        backbone = dict(type="class", version=6, module_src="", class_name="SongUNet",
                        state={"_modules": {"enc": loop}, "_parameters": {}, "_buffers": {},
                               "_init_kwargs": {"img_resolution": 8, "in_channels": 3, "out_channels": 3}})
        meta = dict(type="class", version=6, module_src="", class_name="EDMPrecond",
                    state={"_modules": {"model": _Persistent(fn, backbone)}, "_parameters": {}, "_buffers": {},
                           "_init_kwargs": kw})
        (tmp_path / "cyclic.pkl").write_bytes(pickle.dumps({"ema": _Persistent(fn, meta)}))
        meta2 = dict(meta, state={**meta["state"], "_init_kwargs": {**kw, "img_resolution": "huge"}})
        (tmp_path / "badkw.pkl").write_bytes(pickle.dumps({"ema": _Persistent(fn, meta2)}))
    for name, needle in (("cyclic.pkl", "module tree is cyclic"), ("badkw.pkl", "unexpected content .*ValueError")):
        with pytest.raises(ImportError_, match=needle) as err:
            import_network(tmp_path / name)
        assert "\n" not in str(err.value)


def test_teacher_path_on_s3_is_fetched_once_and_imported_like_a_local_file(tmp_path, edm_file, s3_bucket, monkeypatch):
    """teacher.path may be an s3:// object (a published .pkl) or checkpoint folder: fetched once per node into the
    cache (the run config keeps the URI), then imported exactly as the local file is; a missing one is one line."""
    from pipelines.cli import _user_errors
    from ray_jobs.datasets import local_teacher_config
    from schemas.run import RunConfig
    from sida_core.training_loop import imported_teacher_path, load_network
    from store.storage import Storage

    monkeypatch.setenv("SIDA_CACHE", str(tmp_path / "cache"))
    path, net, _ = edm_file
    Storage(f"{s3_bucket.uri}/teachers", endpoint_url=s3_bucket.endpoint_url).upload_file(path, "edm-tiny.pkl")
    uri = f"{s3_bucket.uri}/teachers/edm-tiny.pkl"
    cfg = RunConfig.model_validate({"teacher": {"path": uri}, "storage": {"endpoint_url": s3_bucket.endpoint_url}})
    logs: list[str] = []
    local = local_teacher_config(cfg, logs.append)
    fetched = Path(local.teacher.path)
    assert fetched.read_bytes() == path.read_bytes() and str(tmp_path / "cache") in str(fetched)
    assert cfg.teacher.path == uri and len(logs) == 1 and uri in logs[0]
    assert local_teacher_config(cfg, logs.append).teacher.path == str(fetched) and len(logs) == 1  # cached: no fetch
    imported, _ = load_network(imported_teacher_path(local, None, logs.append), "net", "cpu")
    assert all(torch.equal(a, b) for a, b in zip(outputs(imported), outputs(net)))

    # a checkpoint folder on S3 (what `sida teacher import --out s3://...` writes) is staged whole
    folder = imported_teacher_path(local, None, logs.append)
    Storage(f"{s3_bucket.uri}/teachers/tiny-ckpt", endpoint_url=s3_bucket.endpoint_url).upload_dir(
        folder, "", last=["manifest.json"])
    as_folder = local_teacher_config(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"path": f"{s3_bucket.uri}/teachers/tiny-ckpt"})}))
    assert sorted(p.name for p in Path(as_folder.teacher.path).iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "state.pt"]

    missing = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"path": f"{s3_bucket.uri}/teachers/nope.pkl"})})
    with pytest.raises(_user_errors()) as err:
        local_teacher_config(missing)
    assert str(err.value).startswith(f"teacher.path {s3_bucket.uri}/teachers/nope.pkl: no such object")
