"""Config presets (paper Tables 6 and 7), ``--set`` overrides, and one-line error messages for bad configs."""
from __future__ import annotations

from pathlib import Path

import pytest

from schemas.loader import ConfigError, apply_overrides, load_run_config, parse_value, read_yaml, validate
from schemas.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))

# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------
# Paper facts, one row per column of Table 6 (EDM teachers) and Table 7 (EDM2 on ImageNet 512x512):
# (batch, per GPU, GPUs, gradient accumulation rounds, lr, ema Mimg, fp16, Adam eps, lambda_adv_psi)
TABLE = {
    "cifar10_uncond": (256, 32, 8, 1, 1e-5, 0.5, False, 1e-8, 1),
    "cifar10_cond": (256, 32, 8, 1, 1e-5, 0.5, False, 1e-8, 1),
    "imagenet64_cond": (8192, 32, 8, 32, 4e-6, 2, True, 1e-6, 1),
    "ffhq64": (512, 64, 8, 1, 1e-5, 0.5, True, 1e-6, 1),
    "afhqv2_64": (512, 64, 8, 1, 5e-6, 0.5, True, 1e-6, 1),
    "edm2_xs": (2048, 64, 16, 2, 5e-5, 2, True, 1e-6, 100),
    "edm2_s": (2048, 64, 8, 4, 5e-5, 2, True, 1e-6, 100),
    "edm2_m": (2048, 32, 8, 8, 5e-5, 2, True, 1e-6, 100),
    "edm2_l": (2048, 32, 8, 8, 5e-5, 2, True, 1e-6, 100),
    "edm2_xl": (2048, 16, 8, 16, 5e-5, 2, True, 1e-6, 100),
    "edm2_xxl": (2048, 2, 8, 128, 5e-5, 2, True, 1e-6, 100),
}
# (data kind, resolution, channels, cond, num_classes): CIFAR-10 reads EDM's image zip directly; the larger EDM sets
# and EDM2's SD-VAE latent zips (4 x 64 x 64 for 512 x 512 images) are prepared once and streamed (`sida dataset
# prepare`). Every teacher network comes from its .pkl (tests/test_presets.py starts each).
DATA = {
    "cifar10_uncond": ("zip", 32, 3, False, 0),
    "cifar10_cond": ("zip", 32, 3, True, 10),
    "imagenet64_cond": ("prepared", 64, 3, True, 1000),
    "ffhq64": ("prepared", 64, 3, False, 0),
    "afhqv2_64": ("prepared", 64, 3, False, 0),
    **{f"edm2_{s}": ("prepared", 64, 4, True, 1000) for s in ("xs", "s", "m", "l", "xl", "xxl")},
}


def _preset(name: str) -> RunConfig:
    path = ROOT / "configs" / f"{name}.yaml"
    return validate(RunConfig, read_yaml(path), source=str(path))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates(path, monkeypatch):
    if path.stem == "digits":  # runs out of the box: full loader, including the file-existence checks
        monkeypatch.chdir(ROOT)
        cfg = load_run_config(path)
    else:  # placeholder data/teacher paths: schema only
        cfg = validate(RunConfig, read_yaml(path), source=str(path))
    assert cfg.batch.total == cfg.rounds * cfg.batch.per_worker * cfg.scaling.num_workers


def test_every_table_column_has_a_preset():
    assert set(TABLE) <= {p.stem for p in PRESETS}
    names = [_preset(n).name for n in TABLE]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_matches_paper_table(name):
    total, per, gpus, rounds, lr, ema, fp16, eps, lam_psi = TABLE[name]
    cfg = _preset(name)
    assert (cfg.batch.total, cfg.batch.per_worker, cfg.scaling.num_workers) == (total, per, gpus)
    assert cfg.rounds == rounds
    assert cfg.scaling.use_gpu is True
    assert cfg.optimizer.lr_psi == cfg.optimizer.lr_theta == pytest.approx(lr, rel=1e-12)
    assert (cfg.optimizer.beta1, cfg.optimizer.beta2) == (0.0, 0.999)
    assert cfg.optimizer.eps == pytest.approx(eps, rel=1e-12)
    assert cfg.ema.ema_mimg == ema
    assert cfg.precision == ("fp16" if fp16 else "fp32")
    assert cfg.method == "sida"
    loss = cfg.loss
    assert (loss.alpha, loss.lambda_sid, loss.lambda_adv_theta, loss.lambda_adv_psi) == (1.0, 100, 0.01, lam_psi)
    assert (loss.sigma_init, loss.t_max) == (2.5, 800)
    edm2 = name.startswith("edm2")
    assert (loss.p_mean, loss.p_std) == ((-0.4, 1.0) if edm2 else (-1.2, 1.2))
    assert (cfg.stages.fake_score_only_kimg, cfg.stages.sid_until_kimg) == (100, 200)
    assert cfg.total_kimg >= 10_000
    assert (cfg.metric.name, cfg.metric.num_images) == ("fid_inception", 50000)
    assert cfg.metric.enabled and cfg.metric.reference  # EDM2: FID of the latents decoded by the SD-VAE (metric.vae)
    assert bool(cfg.metric.vae) is edm2
    assert cfg.data.path and cfg.teacher.path and cfg.teacher.path.endswith(".pkl")


@pytest.mark.parametrize("name", sorted(DATA))
def test_preset_data_and_network(name):
    kind, res, channels, cond, ncls = DATA[name]
    cfg = _preset(name)
    assert (cfg.data.kind, cfg.data.resolution, cfg.data.channels, cfg.data.cond, cfg.data.label_dim) == \
        (kind, res, channels, cond, ncls)
    assert cfg.teacher.network == type(cfg.teacher.network)()  # left to the .pkl: the file decides the network


# --------------------------------------------------------------------------------------------------
# --set overrides
# --------------------------------------------------------------------------------------------------
def test_parse_value_types():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e-5") == 1e-5 and parse_value("-2E3") == -2000.0 and parse_value("0.5") == 0.5
    assert parse_value("true") is True and parse_value("false") is False
    assert parse_value("[2, 2, 2]") == [2, 2, 2]
    assert parse_value("null") is None
    assert parse_value("sid2a") == "sid2a" and parse_value("[unclosed") == "[unclosed"


def test_apply_overrides_nested_numbers_bools_lists():
    data = {"loss": {"alpha": 1.0}}
    out = apply_overrides(data, ["loss.alpha=1.2", "optimizer.lr_psi=4e-6", "batch.total=512",
                                 "scaling.use_gpu=true", "teacher.network.kwargs.channel_mult=[1, 2, 2, 2]",
                                 "name=a=b", "init_generator=null"])
    assert out is data
    assert out["loss"] == {"alpha": 1.2}
    assert out["optimizer"] == {"lr_psi": 4e-6}
    assert out["batch"]["total"] == 512 and out["scaling"]["use_gpu"] is True
    assert out["teacher"]["network"]["kwargs"]["channel_mult"] == [1, 2, 2, 2]
    assert out["name"] == "a=b" and out["init_generator"] is None


def test_overrides_reach_the_validated_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("name: base\nloss:\n  alpha: 1.0\n")
    cfg = load_run_config(tmp_path / "run.yaml", ["loss.alpha=1.2", "optimizer.lr_theta=2e-5", "batch.total=64",
                                                  "batch.per_worker=16", "scaling.num_workers=2",
                                                  "scaling.use_gpu=false", "method=sid",
                                                  "teacher.network.kwargs.channel_mult=[1, 2]"])
    assert cfg.loss.alpha == 1.2 and cfg.optimizer.lr_theta == 2e-5 and cfg.method == "sid"
    assert cfg.rounds == 2 and cfg.scaling.use_gpu is False
    assert cfg.teacher.network.kwargs["channel_mult"] == [1, 2]


def test_override_applies_to_a_preset():
    path = ROOT / "configs" / "edm2_xxl.yaml"
    cfg = validate(RunConfig, apply_overrides(read_yaml(path), ["batch.per_worker=4"]))
    assert cfg.rounds == 64


# --------------------------------------------------------------------------------------------------
# Bad configs: one clear line naming the field and what was expected
# --------------------------------------------------------------------------------------------------
# (id, YAML text or None for "no file", --set overrides, substrings the message must contain)
BAD = [
    ("wrong_type", "loss:\n  alpha: abc\n", [], ["loss.alpha", "valid number", "'abc'"]),
    ("unknown_top_key", "lossy: {}\n", [], ["lossy", "unknown key", "did you mean 'loss'", "expected one of"]),
    ("unknown_nested_key", "loss:\n  lamda_sid: 10\n", [],
     ["loss.lamda_sid", "unknown key", "did you mean 'lambda_sid'", "alpha"]),
    ("negative_batch", "batch:\n  total: -256\n", [], ["batch.total", "greater than 0", "-256"]),
    ("zero_batch", "batch:\n  per_worker: 0\n", [], ["batch.per_worker", "greater than 0"]),
    ("fractional_batch", "batch:\n  total: 2.5\n", [], ["batch.total", "valid integer"]),
    ("batch_not_divisible", "batch:\n  total: 100\n  per_worker: 32\n", [],
     ["batch.total", "divisible", "batch.per_worker", "scaling.num_workers"]),
    ("batch_not_divisible_workers", "batch:\n  total: 256\n  per_worker: 32\nscaling:\n  num_workers: 3\n", [],
     ["batch.total", "divisible", "32 x 3"]),
    ("elastic_range_not_dividing", "batch:\n  total: 256\n  per_worker: 32\nscaling:\n  num_workers: [2, 3]\n", [],
     ["batch.total (256)", "each worker count in scaling.num_workers [2, 3]", "32 x 3 = 96 does not divide it"]),
    ("elastic_min_above_max", "name: x\n", ["scaling.num_workers=[4, 2]"],
     ["scaling.num_workers", "1 <= min <= max", "[4, 2]"]),
    ("elastic_min_zero", "name: x\n", ["scaling.num_workers=[0, 2]"], ["scaling.num_workers", "1 <= min <= max"]),
    ("elastic_three_numbers", "name: x\n", ["scaling.num_workers=[1, 2, 4]"],
     ["scaling.num_workers", "[min, max] of two whole numbers", "[1, 2, 4]"]),
    ("workers_zero", "name: x\n", ["scaling.num_workers=0"], ["scaling.num_workers", "whole number >= 1", "got 0"]),
    ("unknown_method", "method: gan\n", [], ["method", "'sid', 'sida', 'sid2a' or 'add'", "'gan'"]),
    ("legacy_protocol_for_fd_digits", "metric:\n  protocol: legacy_tensorflow\n", [],
     ["metric.protocol", "'legacy_tensorflow'", "fd_digits is defined in 'clean' mode only"]),
    ("unknown_protocol", "metric:\n  protocol: tf2\n", [], ["metric.protocol", "'clean' or 'legacy_tensorflow'", "'tf2'"]),
    ("unknown_precision", "precision: fp8\n", [], ["precision", "'fp32', 'fp16' or 'bf16'", "'fp8'"]),
    ("t_max_too_large", "loss:\n  t_max: 1200\n", [], ["loss.t_max", "less than or equal to 1000"]),
    ("negative_lambda", "loss:\n  lambda_adv_psi: -1\n", [], ["loss.lambda_adv_psi", "greater than or equal to 0"]),
    ("stages_out_of_order", "stages:\n  fake_score_only_kimg: 300\n  sid_until_kimg: 200\n", [],
     ["stages.sid_until_kimg", "stages.fake_score_only_kimg", ">="]),
    ("sid2a_without_init", "method: sid2a\n", [], ["init_generator", "required", "sid2a"]),
    ("init_generator_with_sid", "method: sid\ninit_generator: g\n", [], ["init_generator", "only used by method 'sid2a'"]),
    ("no_teacher_for_user_data", "data:\n  kind: zip\n  path: d.zip\n", [], ["teacher.path", "required", "digits"]),
    ("data_kind_without_path", "data:\n  kind: folder\n", [], ["data.path", "required", "folder"]),
    ("no_reference_for_user_data", "data:\n  kind: zip\n  path: d.zip\nteacher:\n  path: t\n", [],
     ["metric.reference", "required", "sida fid-stats"]),
    ("inception_without_reference", "metric:\n  name: fid_inception\n", [], ["metric.reference", "fid_inception"]),
    ("scorer_gpus_negative", "metric:\n  gpus_per_scorer: -1\n", [], ["metric.gpus_per_scorer", "greater than or equal to 0"]),
    ("name_with_slash", "name: a/b\n", [], ["name", "without slashes"]),
    ("negative_lr", "optimizer:\n  lr_theta: -1e-5\n", [], ["optimizer.lr_theta", "greater than 0"]),
    ("adam_beta2_one", "optimizer:\n  beta2: 1.0\n", [], ["optimizer.beta2", "less than 1"]),
    ("channels_2", "data:\n  channels: 2\n", [], ["data.channels", "1, 3 or 4", "2"]),
    ("channels_4_images", "data:\n  channels: 4\n", [], ["data.channels must be 4 exactly for data.kind 'latents'", "got 4 with data.kind 'digits'"]),  # noqa: E501
    ("cond_without_classes", "data:\n  cond: true\n  num_classes: 0\n", [], ["data.num_classes", ">= 2", "data.cond"]),
    ("unknown_metric", "metric:\n  name: is50k\n", [], ["metric.name", "'fd_digits', 'fid_inception' or 'fd_dinov2'"]),
    ("unknown_arch", "teacher:\n  network:\n    arch: unet9\n", [], ["teacher.network.arch", "'songunet', 'adm', 'edm2' or 'mlp'"]),  # noqa: E501
    ("section_not_mapping", "loss: 3\n", [], ["loss", "mapping"]),
    ("two_errors", "loss:\n  alpha: abc\n  t_max: 2000\n", [], ["loss.alpha", "; loss.t_max"]),
    ("bad_bool_from_set", "name: x\n", ["scaling.use_gpu=maybe"], ["scaling.use_gpu", "valid boolean"]),
    ("set_without_equals", "name: x\n", ["loss.alpha"], ["--set", "'loss.alpha'", "KEY=VALUE"]),
    ("set_through_a_value", "name: x\n", ["name.first=1"], ["--set", "name", "not a section"]),
    ("missing_teacher_file", "teacher:\n  path: nowhere/teacher.pkl\n", [], ["teacher.path", "nowhere/teacher.pkl", "does not exist"]),  # noqa: E501
    ("missing_data_file", "teacher:\n  path: teacher.pkl\ndata:\n  kind: zip\n  path: nowhere/data.zip\n"
     "metric:\n  reference: teacher.pkl\n", [],
     ["data.path", "nowhere/data.zip", "does not exist"]),
    ("missing_init_generator_file", "method: sid2a\ninit_generator: nowhere/sid\n", [],
     ["init_generator", "nowhere/sid", "does not exist"]),
    ("missing_config_file", None, [], ["config file", "run.yaml", "does not exist"]),
    ("invalid_yaml", "loss: [1, 2\nname: x\n", [], ["run.yaml", "not valid YAML", "line"]),
    ("logging_mlflow_without_uri", "logging:\n  mlflow: {experiment: x}\n", [],
     ["logging.mlflow.tracking_uri", "required"]),
    ("logging_mlflow_empty_uri", "logging:\n  mlflow: {tracking_uri: ' '}\n", [],
     ["logging.mlflow.tracking_uri", "file:./mlruns"]),
    ("logging_wandb_mode", "logging:\n  wandb: {project: p, mode: dryrun}\n", [], ["logging.wandb.mode", "'offline'"]),
    ("logging_every_s", "name: x\n", ["logging.every_s=0"], ["logging.every_s", "greater than 0"]),
    ("yaml_tab_indent", "loss:\n\talpha: 1\n", [], ["run.yaml", "not valid YAML"]),
    ("yaml_is_a_list", "- loss\n- batch\n", [], ["run.yaml", "mapping", "list"]),
    ("yaml_is_a_scalar", "just text\n", [], ["run.yaml", "mapping", "str"]),
    ("yaml_empty", "", [], ["run.yaml", "is empty", "mapping"]),
    ("yaml_only_comments", "# nothing yet\n", [], ["run.yaml", "is empty"]),
    ("yaml_duplicate_section", "loss:\n  alpha: 1.2\nbatch:\n  total: 64\nloss:\n  lambda_sid: 10\n", [],
     ["run.yaml", "line 5", "duplicate key 'loss'", "first at line 1"]),
    ("yaml_duplicate_nested_key", "loss:\n  alpha: 1.2\n  alpha: 1.0\n", [], ["duplicate key 'alpha'"]),
    ("nan_alpha", "loss:\n  alpha: .nan\n", [], ["loss.alpha", "finite number"]),
    ("nan_from_set", "name: x\n", ["loss.alpha=nan"], ["loss.alpha", "finite number"]),
    ("inf_lr", "optimizer:\n  lr_psi: .inf\n", [], ["optimizer.lr_psi", "finite number"]),
    ("inf_total_kimg", "total_kimg: .inf\n", [], ["total_kimg", "finite number"]),
    ("inf_lambda", "name: x\n", ["loss.lambda_adv_psi=.inf"], ["loss.lambda_adv_psi", "finite number"]),
]


@pytest.mark.parametrize("text,overrides,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_has_one_clear_line(text, overrides, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pkl").write_bytes(b"x")  # exists, for the cases that get past teacher.path
    cfg_path = tmp_path / "run.yaml"
    if text is not None:
        cfg_path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_run_config(cfg_path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for bad in ("Traceback", "pydantic", "errors.pydantic.dev", "ValidationError", "For further information"):
        assert bad not in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


def test_yaml_merge_keys_may_override_and_a_directory_is_named(tmp_path):
    """A ``<<: *anchor`` merge followed by an overriding key is not a duplicate; a folder given as the config
    says it is a folder, not that it does not exist."""
    (tmp_path / "run.yaml").write_text("base: &b {alpha: 1.0, lambda_sid: 100}\nloss:\n  <<: *b\n  alpha: 1.2\n")
    assert read_yaml(tmp_path / "run.yaml")["loss"] == {"alpha": 1.2, "lambda_sid": 100}
    with pytest.raises(ConfigError, match=r"config file '.*' is a directory; expected a YAML file"):
        load_run_config(tmp_path)


def test_binary_config_file(tmp_path):
    (tmp_path / "run.yaml").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="run.yaml.*cannot be read as UTF-8 text"):
        load_run_config(tmp_path / "run.yaml")


def test_enough_bad_cases():
    assert len(BAD) >= 20
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_sweep_plans_valid_trials(path):
    """Every committed sweep (the experiments in docs/experiments) expands into trials that validate as run configs
    before anything starts, so `sida sweep FILE` does not fail minutes into a run."""
    from schemas.sweep import load_sweep, plan_trials

    sweep, base, _ = load_sweep(path)
    plans = plan_trials(sweep, base, source=str(path), storage_uri="runs/sweeps/x", layers=[sweep.set])
    assert len(plans) == len(sweep.expand()) >= 2
    assert len({p.name for p in plans}) == len(plans)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pipelines").glob("*.yaml")), ids=lambda p: p.stem)
def test_committed_pipeline_loads(path):
    from schemas.sweep import load_pipeline, plan_trials

    pipeline, base, _ = load_pipeline(path)
    assert pipeline.stages
    for st in pipeline.stages:  # every stage's trials validate, running the stage's methods
        plans = plan_trials(st, base, source=str(path), storage_uri=f"runs/pipelines/x/{st.name}",
                            layers=[pipeline.set, st.set], method=st.method)
        assert sorted({p.cfg.method for p in plans}) == sorted(set(st.methods()))


def test_a_pipeline_stage_may_run_several_methods_side_by_side():
    from schemas.sweep import load_pipeline

    pipeline, _, _ = load_pipeline(ROOT / "configs" / "pipelines" / "digits_methods.yaml")
    assert [st.methods() for st in pipeline.stages] == [["sid"], ["sida", "add"], ["sid2a"]]


def test_elastic_workers_keep_the_total_batch(tmp_path):
    """``scaling.num_workers: [min, max]``: every worker count in the range divides the total batch, the rounds follow
    the live count, and the config round-trips through JSON (config.json) as a list."""
    digits = ROOT / "configs" / "digits.yaml"
    cfg = load_run_config(digits, ["batch.total=48", "batch.per_worker=4", "scaling.num_workers=[1, 4]"])
    s = cfg.scaling
    assert (s.elastic, s.min_workers, s.max_workers, s.describe()) == (True, 1, 4, "1-4")
    assert [cfg.rounds_with(w) for w in (1, 2, 3, 4)] == [12, 6, 4, 3] and cfg.rounds == 3
    with pytest.raises(ConfigError, match=r"16 x 3 = 48 does not divide it"):
        load_run_config(digits, ["batch.total=64", "batch.per_worker=16", "scaling.num_workers=[2, 3]"])
    dumped = cfg.model_dump(mode="json")
    assert dumped["scaling"]["num_workers"] == [1, 4]
    assert validate(RunConfig, dumped).scaling.num_workers == (1, 4)
    same = load_run_config(digits, ["scaling.num_workers=[2, 2]"]).scaling  # [n, n] is just n
    assert (same.num_workers, same.elastic) == (2, False)
