"""Every preset in configs/ starts from its real teacher format: for each, a tiny teacher of the preset's *family*
(same class and options, small widths) is written in that family's published file format (EDM / EDM2 ``.pkl``,
tests/edm_pickles.py), a small synthetic dataset of the preset's shape in the preset's data format, and the preset
runs through ``sida train``'s normal path on one CPU worker with overrides that shrink only sizes: import the
teacher, distill two steps, checkpoint, score (FID with the real Inception network against the synthetic data's
reference statistics)."""
from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from edm_pickles import write_edm_pickle
from schemas.loader import load_run_config
from schemas.run import RunConfig
from sida_core.networks import build_denoiser

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
NUM_REAL = 8  # synthetic images per dataset (and reference statistics over them)


def test_there_are_twelve_presets():
    assert len(PRESETS) == 12, PRESETS


def tiny_family_spec(cfg) -> dict:
    """The preset's teacher family (class + options as the published file has them) at tiny widths."""
    d = cfg.data
    path = Path(cfg.teacher.path).name
    iface = {"img_resolution": d.resolution, "img_channels": d.channels, "label_dim": d.label_dim}
    if path.startswith("edm2-"):  # EDM2's U-Net on SD-VAE latents: 4 levels, attention at 16 and 8
        kw = {"model_channels": 16, "channel_mult": [1, 2, 3, 4], "num_blocks": 1, "attn_resolutions": [16, 8],
              "channels_per_head": 16, "dropout": 0.0}
        return {"arch": "edm2", **iface, "kwargs": kw}
    if "-adm" in path:  # EDM's ImageNet-64 ADM: DhariwalUNet, 4 levels, attention at 32/16/8
        kw = {"model_channels": 8, "channel_mult": [1, 2, 3, 4], "num_blocks": 1, "attn_resolutions": [32, 16, 8],
              "dropout": 0.10, "augment_dim": 0}
        return {"arch": "adm", **iface, "kwargs": kw}
    if path.startswith("edm-"):  # EDM's DDPM++ ('vp' networks), CIFAR-10 [2, 2, 2] or FFHQ / AFHQ [1, 2, 2, 2]
        mult = [2, 2, 2] if d.resolution == 32 else [1, 2, 2, 2]
        kw = {"model_channels": 8, "channel_mult": mult, "num_blocks": 1, "attn_resolutions": [16], "dropout": 0.13,
              "augment_dim": 9}
        return {"arch": "songunet", **iface, "kwargs": kw}
    raise AssertionError(f"no tiny family for {path}")


def write_zip_dataset(path: Path, resolution: int, channels: int, num_classes: int, seed: int) -> Path:
    """An EDM ``dataset_tool`` zip: ``00000/img00000000.png``… plus ``dataset.json`` labels when conditional."""
    rng = np.random.default_rng(seed)
    names, labels = [], []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(NUM_REAL):
            yy, xx = np.mgrid[:resolution, :resolution] / resolution
            base = 127 + 100 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0.5, 2) * yy))
            img = np.clip(base[..., None] + rng.normal(0, 20, (resolution, resolution, channels)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img.squeeze(-1) if channels == 1 else img).save(buf, format="PNG")
            name = f"00000/img{i:08d}.png"
            zf.writestr(name, buf.getvalue())
            names.append(name)
            labels.append([name, int(rng.integers(num_classes))] if num_classes else None)
        zf.writestr("dataset.json", json.dumps({"labels": labels if num_classes else None}))
    return path


def write_latent_zip(path: Path, resolution: int, num_classes: int, seed: int) -> Path:
    """An EDM2 ``dataset_tool encode`` zip: ``00000/img-mean-std-00000000.npy`` (8, R, R) moments + ``dataset.json``."""
    rng = np.random.default_rng(seed)
    labels = []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(NUM_REAL):
            mean = rng.normal(0, 4, (4, resolution, resolution)).astype(np.float32)
            std = np.exp(rng.normal(-1, 0.2, (4, resolution, resolution))).astype(np.float32)
            buf = io.BytesIO()
            np.save(buf, np.concatenate([mean, std]))
            name = f"00000/img-mean-std-{i:08d}.npy"
            zf.writestr(name, buf.getvalue())
            labels.append([name, int(rng.integers(num_classes))])
        zf.writestr("dataset.json", json.dumps({"labels": labels}))
    return path


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray

    from ray_jobs.cluster import worker_env

    saved = os.environ.get("SIDA_CACHE")
    os.environ["SIDA_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # imported teachers of this module only
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": worker_env()})
    yield
    ray.shutdown()
    if saved is not None:
        os.environ["SIDA_CACHE"] = saved


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from tests.tiny_vae import write_tiny_vae

    return write_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Reference statistics (real Inception, the presets' legacy_tensorflow protocol) of each synthetic dataset shape,
    made once."""
    from pipelines.fid_stats import run_fid_stats

    made = {}

    def get(resolution: int, channels: int, num_classes: int) -> tuple[Path, Path]:
        key = (resolution, channels, num_classes)
        if key not in made:
            root = tmp_path_factory.mktemp(f"data{resolution}")
            data = write_zip_dataset(root / "data.zip", resolution, channels, num_classes, seed=resolution)
            out = root / "ref"
            run_fid_stats(str(data), str(out), metric="fid_inception", resolution=resolution, channels=channels,
                          progress=False, protocol="legacy_tensorflow")
            made[key] = (data, out)
        return made[key]

    return get


# Presets whose shrunken run is the same code path as another's (AFHQv2 = FFHQ's family, format and precision; the
# EDM2 sizes = EDM2-XS once batch and width are shrunk; CIFAR-10 conditional = the unconditional one's format and
# data kind, with the labels that ImageNet-64 carries through Ray Train) go through the same loop without Ray Train
# (the `sida distill` engine): Ray Train's start-up is ~40 s a run on 2 cores, and the suite must stay short.
IN_PROCESS = {"afhqv2_64", "cifar10_cond", "edm2_s", "edm2_m", "edm2_l", "edm2_xl", "edm2_xxl"}

SHRINK = ["batch.total=2", "batch.per_worker=2", "scaling.num_workers=1", "scaling.use_gpu=false",
          "scaling.cpus_per_worker=1", "total_kimg=0.004", "checkpoint_every_kimg=0.004", "log_every_kimg=0.002",
          "stages.fake_score_only_kimg=0", "stages.sid_until_kimg=0.002", "metric.num_images=4",
          "metric.batch_size=4", "metric.cpus_per_scorer=1", "device=cpu",
          "precision=fp32"]  # like use_gpu=false, a CPU adaptation: fp16 autocast convolutions on a CPU are ~8x slower


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_starts_from_its_published_teacher_format(preset, ray_local, references, tiny_vae, tmp_path):
    from pipelines.train import run_train
    from store.run_store import RunStore
    from store.storage import Storage

    config = ROOT / "configs" / f"{preset}.yaml"
    storage = tmp_path / "runs"
    raw = RunConfig.model_validate(yaml.safe_load(config.read_text()))  # the preset's shapes (files not checked)
    d = raw.data
    if preset == "digits":  # the built-in teacher, trained here (tiny)
        sets = ["teacher.network.kwargs={model_channels: 8, channel_mult: [1, 2, 2], num_blocks: 1, "
                "attn_resolutions: [], dropout: 0.0}", "teacher.train.kimg=0.1", "teacher.train.batch=32",
                "metric.num_images=64", "metric.batch_size=64"]
        imported = None
    elif d.channels == 4:  # EDM2: latents; FID of their decodings by a tiny stand-in SD-VAE (2x, not 8x, upsampling)
        data = write_latent_zip(tmp_path / "latents.zip", d.resolution, d.num_classes, seed=0)
        _, ref = references(2 * d.resolution, 3, d.num_classes)
        sets = [f"data.path={data}", f"metric.vae={tiny_vae}", f"metric.reference={ref}"]
    else:
        data, ref = references(d.resolution, d.channels, d.num_classes if d.cond else 0)
        sets = [f"data.path={data}", f"metric.reference={ref}"]
    if preset != "digits" and d.kind == "prepared":  # the preset's own path: prepared once, then streamed
        from ray_jobs.datasets import prepare_dataset

        prepared = prepare_dataset(str(data), str(tmp_path / "prepared"), shard_size=3, progress=False,
                                   log=lambda m: None)
        assert prepared["shards"] > 1
        sets[0] = f"data.path={tmp_path / 'prepared'}"
    if preset != "digits":
        spec = tiny_family_spec(raw)
        torch.manual_seed(0)
        net = build_denoiser(spec["arch"], spec["img_resolution"], spec["img_channels"], spec["label_dim"],
                             spec["kwargs"]).eval()
        teacher = write_edm_pickle(tmp_path / Path(raw.teacher.path).name, net, spec, marker=tmp_path / "EXECUTED",
                                   edm2=spec["arch"] == "edm2")
        sets.append(f"teacher.path={teacher}")
        imported = spec
    if preset in IN_PROCESS:
        check_in_process(config, [*SHRINK, *sets], tmp_path, imported)
        return
    out = run_train(str(config), [*SHRINK, *sets, f"storage.uri={storage}"], name=preset, log=lambda m: None)
    assert out["status"] == "finished", out
    assert out["checkpoints"] == ["ckpt-000000000004"] and out["metric_rows"] >= 1
    store = RunStore(Storage(str(storage)).child(preset))
    rows = store.read_rows()
    if raw.metric.enabled:
        assert [r["checkpoint"] for r in rows] == ["ckpt-000000000004"] and math.isfinite(rows[0]["value"]), rows
    else:
        assert rows == []
    state, manifest = store.load_checkpoint("ckpt-000000000004")
    assert manifest["network"]["arch"] == (imported or {"arch": "songunet"})["arch"]
    if imported is not None:
        teacher_manifest = json.loads(store.storage.read_bytes("teacher/manifest.json"))
        assert teacher_manifest["imported"]["class_name"] in ("EDMPrecond", "Precond")
        assert teacher_manifest["network"]["kwargs"] == imported["kwargs"]
        assert not (tmp_path / "EXECUTED").exists()
    # Two steps: fake-score + SiD, then fake-score + SiDA; both updates were taken and G_theta left the teacher.
    rows = store.read_metrics().to_pylist()
    assert [r["stage"] for r in rows] == ["sid", "sida"] and all(r["G_updated"] == 1.0 for r in rows), rows
    phi, _ = store.load_checkpoint("teacher")
    assert any(not torch.equal(state["generator"][k], v) for k, v in phi["net"].items())


def check_in_process(config: Path, sets: list[str], tmp_path: Path, spec: dict) -> None:
    """The preset through the single-process engine: import the teacher, two steps, one checkpoint."""
    from pipelines.distill import run_distill, run_store_of
    from sida_core import checkpoint as ckpt

    cfg = load_run_config(config, [*sets, "metric.enabled=false"])
    store = run_store_of(cfg, str(tmp_path / "run"))
    out = run_distill(cfg, store, progress=False, log=lambda m: None)
    state, manifest = ckpt.load_checkpoint(out["checkpoint"])
    assert Path(out["checkpoint"]).name == "ckpt-000000000004" and manifest["network"]["kwargs"] == spec["kwargs"]
    rows = store.read_metrics().to_pylist()
    assert [r["stage"] for r in rows] == ["sid", "sida"] and all(r["G_updated"] == 1.0 for r in rows), rows
    teacher = ckpt.load_checkpoint(Path(out["teacher"]))[1]
    assert teacher["imported"]["class_name"] in ("EDMPrecond", "Precond") and not (tmp_path / "EXECUTED").exists()
