"""The cluster-launcher YAMLs in cluster/ pass Ray's own checks (its JSON schema, then ray up's preparation and
validate_config; no cloud access), and broken ones fail with one line naming the file and the problem."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from ray_jobs.cluster_config import validate_cluster_file
from schemas.loader import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NOT_CLUSTER_CONFIGS = {"runtime_env.yaml"}  # a job runtime environment (tests/test_jobs.py loads it)
CLUSTER_YAMLS = sorted(p for p in (ROOT / "cluster").glob("*.yaml") if p.name not in NOT_CLUSTER_CONFIGS)


def test_every_expected_cluster_is_there():
    assert {p.name for p in CLUSTER_YAMLS} == {"aws-8xh100.yaml", "aws-8xa100.yaml", "gcp-8xgpu.yaml", "onprem.yaml"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.stem)
def test_cluster_yaml_validates_against_rays_schema(path):
    summary = validate_cluster_file(path)
    assert summary["cluster_name"].startswith("sida-")
    raw = yaml.safe_load(path.read_text())
    mounts = raw["file_mounts"]
    assert "~/.ray/auth_token" in mounts and "~/.sida/storage.env" in mounts and "~/sida-ray/sida_core" in mounts
    assert any("pip install" in c and "~/sida-ray" in c for c in raw["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in raw[k][-1] for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    for local in mounts.values():  # the project folders the YAML ships exist (relative to the repo root)
        if not local.startswith("~"):
            assert (ROOT / local).exists(), local


@pytest.mark.parametrize("path,instance,gpus", [("aws-8xh100.yaml", "p5.48xlarge", 8), ("aws-8xa100.yaml", "p4d.24xlarge", 8),
                                                ("gcp-8xgpu.yaml", "a2-highgpu-8g", 8), ("gcp-8xgpu.yaml", "a3-highgpu-8g", 8)])
def test_gpu_node_types(path, instance, gpus):
    raw = yaml.safe_load((ROOT / "cluster" / path).read_text())
    types = [t for t in raw["available_node_types"].values()
             if instance in (t["node_config"].get("InstanceType"), t["node_config"].get("machineType"))]
    assert len(types) == 1 and types[0]["resources"]["GPU"] == gpus and types[0]["max_workers"] >= 2


def _broken(tmp_path, name, edit) -> Path:
    data = yaml.safe_load((ROOT / "cluster" / "aws-8xh100.yaml").read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BROKEN = [
    ("misspelled_top_key", lambda d: d.__setitem__("setup_comands", d.pop("setup_commands")),
     ["setup_comands", "unknown key", "did you mean 'setup_commands'"]),
    ("no_provider", lambda d: d.pop("provider"), ["provider", "required key is missing"]),
    ("misspelled_node_key", lambda d: d["available_node_types"]["gpu_8xh100"].__setitem__("min_worker", 1),
     ["available_node_types.gpu_8xh100.min_worker", "unknown key", "did you mean 'min_workers'"]),
    ("unknown_provider", lambda d: d["provider"].__setitem__("type", "awz"), ["provider.type", "'awz'", "aws"]),
    ("bad_head_type", lambda d: d.__setitem__("head_node_type", "headd"), ["head_node_type", "available_node_types"]),
    ("gpu_count_not_int", lambda d: d["available_node_types"]["gpu_8xh100"]["resources"].__setitem__("GPU", "eight"),
     ["available_node_types.gpu_8xh100.resources.GPU", "'eight'", "integer"]),
    ("no_resources", lambda d: d["available_node_types"]["head"].pop("resources"),
     ["available_node_types.head.resources", "required key is missing"]),
]


@pytest.mark.parametrize("edit,needles", [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_cluster_yaml_fails_with_one_line(edit, needles, tmp_path, capsys):
    path = _broken(tmp_path, "broken.yaml", edit)
    with pytest.raises(ConfigError) as info:
        validate_cluster_file(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"invalid cluster config {path}: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    # and through the CLI: exit code 2, one line, the file named
    assert main(["cluster", "validate", str(ROOT / "cluster" / "onprem.yaml"), str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid cluster config") and "broken.yaml" in err


def test_cli_validates_every_shipped_yaml(capsys):
    assert main(["cluster", "validate", *map(str, CLUSTER_YAMLS)]) == 0
    assert capsys.readouterr().out.count("\n") == len(CLUSTER_YAMLS)


def test_not_yaml_and_not_a_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("cluster_name: [x\n")
    (tmp_path / "b.yaml").write_text("- aws\n")
    with pytest.raises(ConfigError, match="a.yaml.*not valid YAML"):
        validate_cluster_file(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="b.yaml.*mapping"):
        validate_cluster_file(tmp_path / "b.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "cluster" / "jobs").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_job_files_pass_the_pre_submission_checks(path):
    from schemas.job import check_job, load_job_spec

    job = check_job(load_job_spec(path))
    assert job.entrypoint().startswith(f"sida {job.spec.kind} ")
    assert not [w for w in job.warnings if "local folder" in w]


def test_readme_table_matches_the_presets():
    """The README's Table 6/7 -> preset -> cluster table is computed from configs/, not typed from memory."""
    from schemas.loader import read_yaml, validate
    from schemas.run import RunConfig

    readme = (ROOT / "README.md").read_text()
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = validate(RunConfig, read_yaml(preset), source=str(preset))
        rows = [ln for ln in readme.splitlines() if f"| `configs/{preset.name}` |" in ln]
        assert len(rows) == 1, preset.name
        cells = [c.strip() for c in rows[0].strip("|").split("|")]
        assert cells[3:6] == [str(cfg.batch.total), str(cfg.batch.per_worker), str(cfg.rounds)], (preset.name, cells)
        if cfg.scaling.use_gpu:
            assert cells[2].startswith(f"{cfg.scaling.num_workers} × "), (preset.name, cells)
