"""Job specs: what ``sida submit JOB.yaml`` sends to a Ray cluster through the Jobs API.

A job is one ``sida`` command run on the cluster: ``train`` (a run config), ``sweep`` / ``pipeline`` (their
own config files) or ``evaluate`` (a run in storage). The referenced config is validated here, before
submission, by the validator registered for the job's kind in :data:`CONFIG_VALIDATORS` (RunConfig for
``train``, SweepConfig / PipelineConfig with every trial planned for ``sweep`` / ``pipeline``). No Ray here.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator

from schemas.loader import ConfigError, apply_overrides, is_remote, read_yaml, validate
from schemas.run import Strict, check_num_workers

JobKind = Literal["train", "sweep", "pipeline", "evaluate"]
KINDS: tuple[str, ...] = ("train", "sweep", "pipeline", "evaluate")


class JobResources(Strict):
    """What the job needs from the cluster. For ``train`` these override the run config's ``scaling`` section
    (unset: the config's own values); for other kinds they are what the submission check compares."""

    num_workers: Union[PositiveInt, tuple[PositiveInt, PositiveInt], None] = None  # [min, max]: elastic (train)
    use_gpu: Optional[bool] = None                   # one GPU per worker, as Ray Train's ScalingConfig
    cpus_per_worker: Optional[PositiveFloat] = None
    driver_cpus: NonNegativeFloat = 0.0               # reserved for the job's driver (the sida process itself)

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        return None if v is None else check_num_workers(v)

    @property
    def min_workers(self) -> int:
        """Workers the job needs to start (the lower end of an elastic range)."""
        w = self.num_workers
        return (w[0] if isinstance(w, tuple) else w) or 0


# Secrets never travel in a runtime_env: Ray writes it in plain text to every node's runtime_env_agent.log, and
# the dashboard and `ray job list` show it to anyone holding the cluster's token. Credentials come from the
# nodes' own environment (instance profile, or ~/.sida/storage.env exported before `ray start`).
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


def _no_secrets(names: Any, field: str) -> None:
    found = [n for n in names if n in SECRET_ENV]
    if found:
        raise ValueError(f"{field}: {', '.join(found)} would be written in clear to the cluster's Ray logs and "
                         "shown in its dashboard; give the nodes their own credentials (an instance profile, or "
                         "~/.sida/storage.env exported before `ray start`, see README) and remove it here")


class JobStorage(Strict):
    """Where the job's runs go (``train``: overrides the run config's ``storage`` section). No secrets here:
    credentials come from the cluster's nodes (instance profile, or their environment: SECRET_ENV)."""

    uri: str
    endpoint_url: Optional[str] = None
    region: Optional[str] = None


class RuntimeEnvSpec(Strict):
    """The part of Ray's runtime_env a job may set; ``working_dir`` is made by ``sida submit`` (the config)."""

    env_vars: dict[str, str] = Field(default_factory=dict)
    pip: Optional[list[str]] = None
    py_modules: Optional[list[str]] = None

    @field_validator("env_vars", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:  # YAML reads 1 and true as numbers/bools; Ray wants strings
        if isinstance(v, dict):
            _no_secrets(v, "runtime_env.env_vars")
        return {k: (str(x).lower() if isinstance(x, bool) else str(x)) for k, x in v.items()} if isinstance(v, dict) else v


class JobSpec(Strict):
    """One job: the ``sida`` command, its config, resources, runtime environment, storage and tags."""

    kind: JobKind
    config: Optional[str] = None       # train / sweep / pipeline: the config file, relative to the job file
    run_uri: Optional[str] = None      # evaluate: the run folder in storage (s3://... on a cluster)
    name: Optional[str] = None         # train: the run name (--name); default CONFIG_NAME-YYYYmmdd-HHMMSS
    overrides: list[str] = Field(default_factory=list)  # KEY=VALUE, as --set
    args: list[str] = Field(default_factory=list)       # extra arguments for the command, e.g. ["--repeats", "3"]
    resources: JobResources = Field(default_factory=JobResources)
    runtime_env: Union[RuntimeEnvSpec, str] = Field(default_factory=RuntimeEnvSpec)  # or a YAML file of one
    forward_env: list[str] = Field(default_factory=list)  # variables copied from the submitting shell (no SECRET_ENV)
    storage: Optional[JobStorage] = None
    tags: dict[str, str] = Field(default_factory=dict)  # Ray job metadata
    program: str = "sida"              # how the cluster runs sida (installed by the cluster's setup commands)

    @field_validator("forward_env")
    @classmethod
    def _forward_no_secrets(cls, v: list[str]) -> list[str]:
        _no_secrets(v, "forward_env")
        return v

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        if v not in KINDS:
            raise ValueError(f"unknown job kind {v!r}; expected one of: {', '.join(KINDS)}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (not v or any(ch in v for ch in "/\\ \t\n")):
            raise ValueError("must be a non-empty name without slashes or spaces")
        return v

    @field_validator("tags", mode="before")
    @classmethod
    def _tag_strings(cls, v: Any) -> Any:
        return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "evaluate":
            if not self.run_uri:
                raise ValueError("run_uri is required for kind 'evaluate' (the run folder to score, e.g. s3://bucket/runs/NAME)")
            if self.config:
                raise ValueError("config is not used by kind 'evaluate' (it reads the run's stored config.json)")
        else:
            if not self.config:
                raise ValueError(f"config is required for kind {self.kind!r} (the {self.kind} config file)")
            if self.run_uri:
                raise ValueError(f"run_uri is only used by kind 'evaluate', not {self.kind!r}")
        if self.kind != "train":
            for key in ("name", "storage") + (("overrides",) if self.overrides else ()):
                if getattr(self, key):
                    raise ValueError(f"{key} is only used by kind 'train' for now (sida {self.kind} takes its "
                                     f"settings from its own file); pass extra arguments in args")
        for item in self.overrides:
            if "=" not in item:
                raise ValueError(f"overrides: {item!r} is not KEY=VALUE, e.g. loss.alpha=1.2")
        return self


# ----------------------------------------------------------------------------------------------- checking
@dataclass(frozen=True)
class Request:
    """What a job asks of the cluster: ``workers`` x (cpus, gpus), the driver's CPUs, and the scorer actors'
    CPUs / GPUs (``metric.num_scorers`` x ``cpus_per_scorer`` / ``gpus_per_scorer`` while scoring is on)."""

    workers: int = 0
    cpus_per_worker: float = 0.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.0
    scorer_cpus: float = 0.0
    scorer_gpus: float = 0.0

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + self.driver_cpus + self.scorer_cpus

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker + self.scorer_gpus


@dataclass
class CheckedJob:
    """A job ready to submit: the validated spec, the config file to upload, the ``--set`` overrides the
    command gets, what it asks of the cluster, storage, and warnings for the user."""

    spec: JobSpec
    config_path: Optional[Path]
    overrides: list[str]
    request: Request
    name: Optional[str] = None
    storage_uri: Optional[str] = None
    config: Optional[BaseModel] = None  # the validated config, when its kind has a validator
    warnings: list[str] = field(default_factory=list)
    staged: dict[str, str] = field(default_factory=dict)  # file name -> text for the working_dir (default: the config)

    @property
    def config_file(self) -> Path:
        """The config file of a kind that has one (every kind but ``evaluate``)."""
        if self.config_path is None:
            raise ValueError(f"a {self.spec.kind} job has no config file")
        return self.config_path

    def entrypoint(self, config_arg: Optional[str] = None) -> str:
        """The shell command run on the cluster; ``config_arg``: the config's path there (default: its name)."""
        s = self.spec
        words: list[str] = [s.kind]
        if s.kind == "evaluate":
            words.append(str(s.run_uri))
        else:
            words.append(config_arg or self.config_file.name)
        if s.kind == "train":
            words += ["--name", self.name] if self.name else []
            words += [w for o in self.overrides for w in ("--set", o)]
        words += s.args
        return " ".join([s.program, *(shlex.quote(str(w)) for w in words)])

    @property
    def run_uri(self) -> Optional[str]:
        return f"{self.storage_uri.rstrip('/')}/{self.name}" if self.storage_uri and self.name else None


def _check_train(job: CheckedJob) -> None:
    """Validate the run config with the job's overrides, storage and resources applied (as ``sida train`` will)."""
    from schemas.run import RunConfig

    s, r = job.spec, job.spec.resources
    workers = f"[{r.num_workers[0]},{r.num_workers[1]}]" if isinstance(r.num_workers, tuple) else r.num_workers
    derived = [f"scaling.{k}={v}" for k, v in (("num_workers", workers), ("use_gpu", r.use_gpu),
                                               ("cpus_per_worker", r.cpus_per_worker)) if v is not None]
    if s.storage is not None:
        derived += [f"storage.{k}={v}" for k, v in s.storage.model_dump().items() if v is not None]
    job.overrides = [*s.overrides, *derived]
    data = apply_overrides(read_yaml(job.config_file), job.overrides)
    cfg = validate(RunConfig, data, source=str(job.config_file))
    job.config = cfg
    job.storage_uri = cfg.storage.uri
    m = cfg.metric
    # elastic ([min, max]): the job can start once min workers fit; it grows to max as nodes join
    job.request = Request(cfg.scaling.min_workers, cfg.scaling.cpus_per_worker, 1.0 if cfg.scaling.use_gpu else 0.0,
                          r.driver_cpus, scorer_cpus=m.num_scorers * m.cpus_per_scorer if m.enabled else 0.0,
                          scorer_gpus=m.num_scorers * m.gpus_per_scorer if m.enabled else 0.0)
    _check_cluster_paths(job, cfg, cfg.storage.uri)
    if not job.name:
        import time

        job.name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_cluster_paths(job: CheckedJob, cfg, uri: str) -> None:
    """Refuse what cannot work on a cluster: a relative storage URI or a relative path to a teacher, data,
    init generator or reference (only the config travels); warn about local storage on a cluster."""
    if not is_remote(uri) and not os.path.isabs(uri.removeprefix("file://")):
        raise ConfigError(f"storage.uri {uri!r} is a relative local path: a job runs in a temporary folder on the "
                          f"cluster; use s3://BUCKET/PREFIX (or, on a single-node cluster, an absolute path)")
    if not is_remote(uri):
        job.warnings.append(f"storage.uri {uri!r} is a local folder: only right on a single-node cluster (or a "
                            f"shared file system mounted at that path on every node); use s3://BUCKET/PREFIX")
    for dotted in ("teacher.path", "init_generator", "data.path", "metric.reference"):
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if node is not None and not is_remote(str(node)) and not os.path.isabs(str(node).removeprefix("file://")):
            raise ConfigError(f"{dotted} {str(node)!r} is a relative local path: on the cluster only the config "
                              f"file is uploaded; use an absolute path present on every node")


def _check_search(job: CheckedJob) -> None:
    """A sweep or pipeline file, validated as ``sida sweep`` / ``sida pipeline`` will (every trial of every
    stage a valid RunConfig); its base run config is staged beside it and the staged copy's ``base`` names it.
    The request is one trial: its driver CPUs, workers and scorers (Tune runs more in parallel if they fit)."""
    import yaml

    from schemas.sweep import (PipelineConfig, SearchConfig, SweepConfig, load_pipeline, load_sweep, plan_trials,
                               storage_config)

    sweep = job.spec.kind == "sweep"
    cfg: SweepConfig | PipelineConfig
    if sweep:
        cfg, base, base_path = load_sweep(job.config_file)
        searches: list[tuple[SearchConfig, list[dict], Optional[str]]] = [(cfg, [cfg.set], None)]
    else:
        cfg, base, base_path = load_pipeline(job.config_file)
        searches = [(st, [cfg.set, st.set], st.method) for st in cfg.stages]
    plans = [p for search, layers, method in searches
             for p in plan_trials(search, base, source=str(job.config_file), storage_uri="s3://submit-check/runs",
                                  layers=layers, method=method)]
    uri = storage_config(base, [cfg.set]).uri
    for p in plans:
        _check_cluster_paths(job, p.cfg, uri)
    job.warnings = list(dict.fromkeys(job.warnings))  # one warning per kind, not per trial
    c, r = plans[0].cfg, job.spec.resources
    m = c.metric
    job.request = Request(c.scaling.min_workers, c.scaling.cpus_per_worker, 1.0 if c.scaling.use_gpu else 0.0,
                          max(r.driver_cpus, cfg.trial_cpus),
                          scorer_cpus=m.num_scorers * m.cpus_per_scorer if m.enabled else 0.0,
                          scorer_gpus=m.num_scorers * m.gpus_per_scorer if m.enabled else 0.0)
    job.storage_uri = uri
    base_name = Path(base_path).name
    if base_name == job.config_file.name:
        base_name = f"base-{base_name}"
    staged = dict(read_yaml(job.config_file), base=base_name)
    job.staged = {job.config_file.name: yaml.safe_dump(staged, sort_keys=False), base_name: Path(base_path).read_text()}


# The one place a kind's config validator plugs in. A validator fills job.overrides / job.request / job.config (and
# may add warnings); without one, the file is only checked to be a YAML mapping and the request comes from the spec's
# ``resources``.
CONFIG_VALIDATORS: dict[str, Callable[[CheckedJob], None]] = {"train": _check_train, "sweep": _check_search,
                                                              "pipeline": _check_search}


def _resolve(path: str, base: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(os.path.normpath(base / p))


def load_runtime_env(value: Union[RuntimeEnvSpec, str], base: Path) -> RuntimeEnvSpec:
    if isinstance(value, RuntimeEnvSpec):
        return value
    path = _resolve(value, base)
    return validate(RuntimeEnvSpec, read_yaml(path), source=str(path))


def load_job_spec(path: Union[str, os.PathLike]) -> JobSpec:
    """Read and validate a job file; relative paths in it (config, runtime_env) are relative to its folder."""
    path = Path(path)
    spec = validate(JobSpec, read_yaml(path), source=str(path))
    base = path.resolve().parent
    if spec.config:
        spec.config = str(_resolve(spec.config, base))
    spec.runtime_env = load_runtime_env(spec.runtime_env, base)
    return spec


def check_job(spec: JobSpec) -> CheckedJob:
    """Validate what the job references (its config, by kind) and derive what it asks of the cluster."""
    r = spec.resources
    request = Request(r.min_workers, r.cpus_per_worker or (1.0 if r.num_workers else 0.0),
                      1.0 if r.use_gpu else 0.0, r.driver_cpus)
    job = CheckedJob(spec, Path(spec.config) if spec.config else None, list(spec.overrides), request, name=spec.name)
    if job.config_path is not None:
        read_yaml(job.config_path)  # exists, is YAML, is a mapping
    validator = CONFIG_VALIDATORS.get(spec.kind)
    if validator is not None:
        validator(job)
    elif job.config_path is not None:
        job.warnings.append(f"{spec.kind} config {job.config_path.name} is not validated before submission yet "
                            f"(no {spec.kind} config schema); sida {spec.kind} validates it on the cluster")
    if spec.kind == "evaluate" and spec.run_uri and not is_remote(spec.run_uri) and not os.path.isabs(spec.run_uri):
        raise ConfigError(f"run_uri {spec.run_uri!r} is a relative local path: use the run's s3:// URI "
                          f"(or, on a single-node cluster, an absolute path)")
    return job
