"""``sida export`` and ``sida generate`` on tiny run folders made without Ray or training.

A run here is config.json, two 'distill' checkpoints of a tiny MLP generator with random weights, leaderboard
rows that make the older checkpoint the best (pinned, as the scorers do), so ``best`` != ``latest``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.cli import main
from store.run_store import RunStore
from store.storage import Storage
from schemas.leaderboard import LeaderboardRow
from schemas.loader import load_run_config
from sida_core import checkpoint as ckpt
from sida_core.export import export_generator, load_exported, load_state_dict
from sida_core.networks import build_denoiser
from sida_core.training_loop import build_from_spec, load_network
from tests.recipes import CONFIG, ROOT, TINY_TEACHER

MLP = {"hidden": 32, "enc_layers": 1, "dec_layers": 1, "emb_channels": 16}
BEST, LATEST = "ckpt-000000000064", "ckpt-000000000128"
SIDA = Path(sys.executable).parent / "sida"


def make_run(storage: Storage, scratch: Path, *, label_dim: int = 0, channels: int = 1, scored: bool = True,
             arch: str = "mlp", kwargs: dict = MLP) -> RunStore:
    """config.json + checkpoints BEST and LATEST (different random weights); rows: BEST scores lower, pinned."""
    cfg = load_run_config(CONFIG, TINY_TEACHER + ["loss.sigma_init=2.0"]).model_dump(mode="json")
    spec = {"arch": arch, "img_resolution": 8, "img_channels": channels, "label_dim": label_dim, "kwargs": kwargs}
    store = RunStore(storage)
    store.write_config(cfg)
    for i, name in enumerate((BEST, LATEST)):
        torch.manual_seed(i)
        net = build_denoiser(**spec)
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0, 0.3)  # the zero-initialised output layer would make every image the same
        nimg = int(name.split("-")[1])
        local = ckpt.save_checkpoint(scratch / f"{storage.uri.replace('/', '_')}-{name}", {
            "generator_ema": net.state_dict(), "generator": net.state_dict()}, kind="distill", kimg=nimg / 1000,
            cur_nimg=nimg, config=cfg, network=spec, extra={"method": "sida"})
        store.upload_checkpoint(local, name)
        if scored:
            store.write_row(LeaderboardRow(
                run=store.name, run_uri=store.uri, config_summary="tiny", method="sida", alpha=1.2, lambda_sid=100.0,
                lambda_adv_theta=0.01, lambda_adv_psi=1.0, lr_theta=1e-5, lr_psi=1e-5, checkpoint=name,
                checkpoint_uri=storage.uri_of(name), checkpoint_hash=ckpt.verify_checkpoint(local)["content_hash"],
                kimg=nimg / 1000, cur_nimg=nimg, metric="fd_digits", value=5.0 + i, num_images=100, seed=0,
                reference="test", extractor_id="test", time=time.time()))
    if scored:
        store.pin(BEST, "lowest fd_digits")
    return store


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunStore:
    root = tmp_path_factory.mktemp("runs")
    return make_run(Storage(str(root / "r1")), root)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory) -> RunStore:
    root = tmp_path_factory.mktemp("runs")
    return make_run(Storage(str(root / "cond")), root, label_dim=10)


def out_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def sida(args, timeout=120) -> subprocess.CompletedProcess:
    cmd = [str(SIDA)] if SIDA.exists() else [sys.executable, "-m", "pipelines.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "SIDA_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_export_round_trip_gives_identical_outputs(run, tmp_path, capsys, fmt):
    out = tmp_path / "nested" / f"g.{fmt}"
    assert main(["export", run.uri, "--format", fmt, "--out", str(out)]) == 0
    summary = out_json(capsys)
    assert summary["checkpoint"] == BEST and summary["format"] == fmt and Path(summary["metadata"]).is_file()
    meta = json.loads(Path(f"{out}.json").read_text())
    source, _ = load_network(run.storage.path_of(f"pinned/{BEST}"), "generator_ema")
    manifest = ckpt.verify_checkpoint(run.storage.path_of(BEST))
    assert meta["network"] == manifest["network"] and meta["sigma_init"] == 2.0 and "edm" in meta
    assert meta["source"]["run_uri"] == run.uri and meta["source"]["checkpoint"] == BEST
    assert meta["source"]["kimg"] == 0.064 and meta["source"]["content_hash"] == manifest["content_hash"]
    assert meta["score"]["metric"] == "fd_digits" and meta["score"]["value"] == 5.0
    if fmt == "pt":
        state = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(out))
    assert sorted(state) == sorted(source.state_dict()) and all(k.startswith("model.") for k in state)
    fresh = build_from_spec(meta["network"])  # what a user does with the JSON spec
    fresh.load_state_dict(state)
    loaded = load_exported(out)
    x, sigma = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((5,), 2.0)
    with torch.no_grad():
        want = source.eval()(x, sigma)
        assert not torch.equal(want, torch.zeros_like(want))
        assert torch.equal(fresh.eval()(x, sigma), want) and torch.equal(loaded(x, sigma), want)
    assert loaded.sigma_init == 2.0 and not list(tmp_path.rglob(".*.tmp"))


def test_export_latest_and_by_name(run, tmp_path, capsys):
    for which, want in (("latest", LATEST), (BEST, BEST)):
        out = tmp_path / f"{which}.safetensors"
        assert main(["export", run.uri, "--checkpoint", which, "--out", str(out)]) == 0  # format from the suffix
        assert out_json(capsys)["checkpoint"] == want
        meta = json.loads(Path(f"{out}.json").read_text())
        assert meta["source"]["checkpoint"] == want and meta["weights_format"] == "safetensors"
    assert meta["score"]["value"] == 5.0
    state, _ = load_state_dict(tmp_path / "latest.safetensors")
    net, _ = load_network(run.storage.path_of(LATEST), "generator_ema")
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def test_songunet_export_and_rgb_pngs(tmp_path, capsys):
    """The U-Net (EDM's parameter names under ``model.``), conditional, 3 channels: both formats round-trip and
    PNGs are RGB."""
    unet = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])
    store = make_run(Storage(str(tmp_path / "runs" / "unet")), tmp_path, arch="songunet", kwargs=unet, channels=3,
                     label_dim=10)
    source, _ = load_network(store.storage.path_of(f"pinned/{BEST}"), "generator_ema")
    x, sigma = torch.randn(3, 3, 8, 8), torch.full((3,), 2.0)
    c = torch.eye(10)[[1, 2, 3]]
    for fmt in ("pt", "safetensors"):
        assert main(["export", store.uri, "--out", str(tmp_path / f"u.{fmt}")]) == 0
        assert any(k.startswith("model.enc.") for k in torch.load(tmp_path / "u.pt", weights_only=True))
        with torch.no_grad():
            assert torch.equal(load_exported(tmp_path / f"u.{fmt}")(x, sigma, c), source.eval()(x, sigma, c))
    assert main(["generate", store.uri, "--seeds", "5-7", "--class-labels", "4", "--out", str(tmp_path / "png")]) == 0
    with Image.open(tmp_path / "png" / "000000" / "000006.png") as im:
        assert im.mode == "RGB" and im.size == (8, 8)
    capsys.readouterr()
    whole, split = (npz(store, tmp_path / f"{b}.npz", capsys, "--num", 40, "--batch", b) for b in (40, 3))
    assert whole["arr_0"].shape == (40, 8, 8, 3) and np.array_equal(whole["arr_0"], split["arr_0"])


def test_safetensors_of_shared_and_strided_tensors(tmp_path):
    net = build_denoiser("mlp", 8, 1, 0, MLP)
    sd = dict(net.state_dict())
    w = next(k for k, v in sd.items() if v.dim() == 2)
    sd["tied"] = sd[w]  # shares memory with w
    sd["strided"] = sd[w].t()  # a non-contiguous view
    meta = export_generator(sd, tmp_path / "g.safetensors", network={}, sigma_init=2.5)
    state, _ = load_state_dict(tmp_path / "g.safetensors.json")
    assert meta["tensors"] == len(sd) and torch.equal(state["strided"], sd[w].t()) and torch.equal(state["tied"], sd[w])


def test_export_from_s3(s3_bucket, tmp_path, capsys):
    store = make_run(Storage(f"{s3_bucket.uri}/runs/r1", endpoint_url=s3_bucket.endpoint_url), tmp_path)
    out = tmp_path / "g.pt"
    assert main(["export", store.uri, "--out", str(out), "--endpoint-url", s3_bucket.endpoint_url]) == 0
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["source"]["run_uri"] == f"{s3_bucket.uri}/runs/r1" and meta["source"]["checkpoint"] == BEST
    assert meta["source"]["source"] == f"{s3_bucket.uri}/runs/r1/pinned/{BEST}"
    assert torch.load(out, weights_only=True).keys() == load_exported(out).state_dict().keys()


# ------------------------------------------------------------------------------------------------ generate
def npz(run, path, capsys, *args) -> dict:
    assert main(["generate", run.uri, "--out", str(path), "--quiet", *map(str, args)]) == 0
    capsys.readouterr()
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_generate_is_deterministic_per_seed_and_independent_of_batch(run, tmp_path, capsys):
    a = npz(run, tmp_path / "a.npz", capsys, "--num", 1000, "--batch", 1000)
    assert sorted(a) == ["arr_0", "labels", "seeds"]
    assert a["arr_0"].shape == (1000, 8, 8, 1) and a["arr_0"].dtype == np.uint8
    assert a["seeds"].tolist() == list(range(1000)) and (a["labels"] == -1).all()
    assert len(np.unique(a["arr_0"].reshape(1000, -1), axis=0)) == 1000  # a different image per seed
    npz(run, tmp_path / "again.npz", capsys, "--num", 1000, "--batch", 1000)  # the same command again
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "again.npz").read_bytes()
    for batch in (64, 7):
        assert np.array_equal(npz(run, tmp_path / f"b{batch}.npz", capsys, "--seeds", "0-999", "--batch", batch)["arr_0"],
                              a["arr_0"])
    part = npz(run, tmp_path / "part.npz", capsys, "--seeds", "10-19", "--num", 10)
    assert np.array_equal(part["arr_0"], a["arr_0"][10:20]) and part["seeds"].tolist() == list(range(10, 20))
    mixed = npz(run, tmp_path / "mixed.npz", capsys, "--seeds", "7,3,500-501")
    assert np.array_equal(mixed["arr_0"], a["arr_0"][[7, 3, 500, 501]])
    latest = npz(run, tmp_path / "latest.npz", capsys, "--num", 10, "--checkpoint", "latest")
    assert not np.array_equal(latest["arr_0"], a["arr_0"][:10])  # another checkpoint, other images
    # x = G(sigma_init z) with z from torch.Generator().manual_seed(seed), converted as EDM does
    net, _ = load_network(run.storage.path_of(BEST), "generator_ema")
    z = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(999))
    with torch.no_grad():
        x = net.eval()(2.0 * z, torch.full((1,), 2.0))
    assert np.array_equal((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()[0], a["arr_0"][999])
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_generate_png_layout_is_edms_and_deterministic(run, tmp_path, capsys):
    ref = npz(run, tmp_path / "ref.npz", capsys, "--seeds", "0-1004")
    for name in ("p1", "p2"):
        assert main(["generate", run.uri, "--seeds", "0-1004", "--batch", "300", "--out", str(tmp_path / name)]) == 0
        summary = out_json(capsys)
    assert summary["images"] == 1005 and summary["seeds"] == "0-1004" and summary["format"] == "png"
    files = sorted(p.relative_to(tmp_path / "p1").as_posix() for p in (tmp_path / "p1").rglob("*") if p.is_file())
    assert len(files) == 1005 and files[0] == "000000/000000.png" and files[999] == "000000/000999.png"
    assert files[1000:] == [f"001000/{s:06d}.png" for s in range(1000, 1005)]
    assert sorted(p.name for p in (tmp_path / "p1").iterdir()) == ["000000", "001000"]
    assert all((tmp_path / "p1" / f).read_bytes() == (tmp_path / "p2" / f).read_bytes() for f in files)
    for seed in (0, 999, 1004):
        with Image.open(tmp_path / "p1" / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png") as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), ref["arr_0"][seed, :, :, 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1", "p2", "ref.npz"]  # temp folders renamed away


def test_conditional_generator_class_labels(cond_run, tmp_path, capsys):
    fixed = npz(cond_run, tmp_path / "k.npz", capsys, "--num", 50, "--class-labels", 3)
    assert fixed["labels"].tolist() == [3] * 50 and fixed["arr_0"].shape == (50, 8, 8, 1)
    rand = npz(cond_run, tmp_path / "r.npz", capsys, "--num", 200, "--batch", 33)
    assert rand["labels"].min() >= 0 and rand["labels"].max() <= 9 and len(set(rand["labels"].tolist())) == 10
    assert np.array_equal(npz(cond_run, tmp_path / "r2.npz", capsys, "--seeds", "100-199")["labels"], rand["labels"][100:])
    none = npz(cond_run, tmp_path / "n.npz", capsys, "--num", 20, "--class-labels", "none")
    assert (none["labels"] == -1).all()
    # the label reaches the net: images of class 3 differ from random-class images of the same seeds
    with_3 = rand["labels"][:50] != 3
    assert not np.array_equal(fixed["arr_0"][with_3], rand["arr_0"][:50][with_3])
    assert main(["generate", cond_run.uri, "--num", "5", "--class-labels", "10", "--out", str(tmp_path / "x.npz")]) == 2
    one_line_error(capsys, "--class-labels", "0..9")
    assert not (tmp_path / "x.npz").exists()


def test_latent_generator_writes_float16_latents(tmp_path, capsys):
    store = make_run(Storage(str(tmp_path / "runs" / "latent")), tmp_path, channels=4)
    out = tmp_path / "lat.npz"
    assert main(["generate", store.uri, "--num", "12", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "SD-VAE decoder" in captured.err and "--vae" in captured.err
    assert json.loads(captured.out)["latents"] is True
    with np.load(out) as f:
        assert sorted(f.files) == ["labels", "latents", "seeds"]
        assert f["latents"].dtype == np.float16 and f["latents"].shape == (12, 4, 8, 8)
    assert main(["generate", store.uri, "--num", "12", "--out", str(tmp_path / "pngs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].startswith("error: --out") and "--vae" in err[1] and "FILE.npz" in err[1]
    assert not (tmp_path / "pngs").exists()
    # with the SD-VAE decoder folder (a tiny stand-in: 2x upsampling), latents become images: PNGs and npz agree
    from tests.tiny_vae import write_tiny_vae

    vae = write_tiny_vae(tmp_path / "vae")
    assert main(["generate", store.uri, "--num", "3", "--vae", str(vae), "--out", str(tmp_path / "img.npz"), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["latents"] is False
    assert main(["generate", store.uri, "--num", "3", "--vae", str(vae), "--out", str(tmp_path / "png"), "--quiet"]) == 0
    with np.load(tmp_path / "img.npz") as f:
        imgs = f["arr_0"]
    assert imgs.shape == (3, 16, 16, 3) and imgs.dtype == np.uint8 and imgs.std() > 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / "000000" / "000002.png")), imgs[2])


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, needles", [
    (["generate", "{run}", "--seeds", "0-x", "--out", "{tmp}/o.npz"], ["--seeds", "0-49999"]),
    (["generate", "{run}", "--seeds", "9-3", "--out", "{tmp}/o.npz"], ["--seeds", "9-3"]),
    (["generate", "{run}", "--seeds", "0-9", "--num", "5", "--out", "{tmp}/o.npz"], ["--num 5", "10 seeds"]),
    (["generate", "{run}", "--out", "{tmp}/o.npz"], ["--num", "--seeds"]),
    (["generate", "{run}", "--num", "0", "--out", "{tmp}/o.npz"], ["--num", "positive"]),
    (["generate", "{run}", "--num", "3", "--batch", "x", "--out", "{tmp}/o.npz"], ["--batch", "positive"]),
    (["generate", "{run}", "--num", "3", "--device", "tpu", "--out", "{tmp}/o.npz"], ["--device", "auto, cpu or cuda"]),
    (["generate", "{run}", "--num", "3", "--class-labels", "2", "--out", "{tmp}/o.npz"], ["unconditional"]),
    (["generate", "{run}", "--num", "3", "--out", "{tmp}/o.png"], ["--out", "FILE.npz"]),
    (["generate", "{run}", "--num", "3", "--out", "{tmp}/afile/o.npz"], ["--out", "is a file, not a folder"]),
    (["generate", "{run}", "--num", "3", "--checkpoint", "ckpt-000000000999", "--out", "{tmp}/o.npz"],
     ["ckpt-000000000999: no such checkpoint", BEST]),
    (["generate", "{tmp}/no-run", "--num", "3", "--out", "{tmp}/o.npz"], ["not a run folder"]),
    (["export", "gs://bucket/run", "--out", "{tmp}/g.pt"], ["RUN_URI gs://bucket/run", "s3://BUCKET/PREFIX"]),
    (["export", "{run}", "--format", "onnx", "--out", "{tmp}/o.onnx"], ["--format", "pt, safetensors", "'onnx'"]),
    (["export", "{run}", "--out", "{tmp}/o.bin"], ["--format", "pt, safetensors"]),
    (["export", "{run}", "--format", "pt", "--out", "{tmp}/o.safetensors"], ["--out", "says safetensors"]),
    (["export", "{run}", "--out", "{tmp}/afile/g.pt"], ["--out", "is a file, not a folder"]),
    (["generate", "{run}", "--num", "3", "--out", "{tmp}/" + "x" * 260 + ".npz"], ["--out", "cannot write"]),
    (["generate", "{run}", "--num", "3", "--out", "{tmp}/" + "x" * 260], ["--out", "cannot write"]),
    (["export", "{run}", "--out", "{tmp}/" + "x" * 260 + ".pt"], ["--out", "cannot write"]),
    # names the OS takes, but not their temp files' longer names: the failure comes at writing, after generating
    (["generate", "{run}", "--num", "3", "--out", "{tmp}/" + "x" * 246 + ".npz"], ["--out", "cannot write"]),
    (["generate", "{run}", "--num", "3", "--out", "{tmp}/" + "x" * 250], ["--out", "cannot write"]),
    (["export", "{run}", "--out", "{tmp}/" + "x" * 247 + ".pt"], ["--out", "cannot write"]),
    (["export", "{run}", "--checkpoint", "nope", "--out", "{tmp}/g.pt"], ["nope: no such checkpoint"]),
    (["export", "{run}", "--key", "teacher", "--out", "{tmp}/g.pt"], ["'teacher'", "generator_ema"]),
])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, args, needles):
    (tmp_path / "afile").write_text("x")
    assert main([a.format(run=run.uri, tmp=tmp_path) for a in args]) == 2
    one_line_error(capsys, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unscored_run_has_no_best(tmp_path, capsys):
    store = make_run(Storage(str(tmp_path / "runs" / "new")), tmp_path, scored=False)
    assert main(["export", store.uri, "--out", str(tmp_path / "g.pt")]) == 2
    one_line_error(capsys, "no scored checkpoint yet", "--checkpoint latest")
    assert main(["export", store.uri, "--checkpoint", "latest", "--out", str(tmp_path / "g.pt")]) == 0
    assert out_json(capsys)["checkpoint"] == LATEST


def test_console_script_errors_and_success(run, tmp_path):
    for args, needles in (
            (["generate", run.uri, "--seeds", "1,,2", "--out", tmp_path / "o.npz"], ["--seeds"]),
            (["export", tmp_path / "missing", "--format", "pt", "--out", tmp_path / "g.pt"], ["not a run folder"])):
        proc = sida(args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines
    assert not list(tmp_path.iterdir())
    proc = sida(["generate", run.uri, "--num", 20, "--out", tmp_path / "g.npz", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["images"] == 20 and "generate ckpt-" in proc.stderr  # the progress bar
