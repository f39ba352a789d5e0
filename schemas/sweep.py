"""Sweep and staged-pipeline files (``sida sweep``, ``sida pipeline``): pydantic models plus the expansion of a
search into trial points, each validated as a :class:`schemas.run.RunConfig` before anything starts.

An axis is a friendly alias (``alpha``, ``lambda_sid``, ``lambda_adv_theta``, ``lambda_adv_psi``, ``lr`` (both
learning rates), ``lr_theta``, ``lr_psi``, ``method``) or any dotted RunConfig field (``loss.sigma_init``,
``ema.ema_mimg``, ...). Grid search: each axis is a list, the trials are the cartesian product (plus any explicit
``points``). Random search: each axis is a list (a uniform choice) or ``{uniform: [lo, hi]}`` /
``{log_uniform: [lo, hi]}``; ``num_samples`` points are drawn with ``seed``, so a re-run draws the same trials.
"""
from __future__ import annotations

import difflib
import itertools
import math
import random
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from schemas.run import Method, RunConfig, Strict, check_name
from sida_core.methods import get_method, method_names

ALIASES: dict[str, tuple[str, ...]] = {
    "alpha": ("loss.alpha",),
    "lambda_sid": ("loss.lambda_sid",),
    "lambda_adv_theta": ("loss.lambda_adv_theta",),
    "lambda_adv_psi": ("loss.lambda_adv_psi",),
    "lr": ("optimizer.lr_theta", "optimizer.lr_psi"),
    "lr_theta": ("optimizer.lr_theta",),
    "lr_psi": ("optimizer.lr_psi",),
    "method": ("method",),
}
# Fields a sweep manages itself: where trials live, what they are called, where SiD²A starts from.
RESERVED = ("name", "storage", "init_generator")
PAPER_ALPHAS = (-0.25, 0.0, 0.5, 0.75, 1.0, 1.2, 1.5)  # the SiDA paper's alpha grid (Figure 2)
DISTRIBUTIONS = ("uniform", "log_uniform")


def _leaf_paths(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        sub = next((a for a in (f.annotation, *typing.get_args(f.annotation))
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        out += _leaf_paths(sub, f"{prefix}{name}.") if sub is not None else [prefix + name]
    return out


LEAF_PATHS = tuple(_leaf_paths())


def axis_paths(axis: str) -> tuple[str, ...]:
    """The RunConfig fields an axis sets; ValueError (one line, with a suggestion) for an unknown axis."""
    if axis in ALIASES:
        return ALIASES[axis]
    top = axis.split(".", 1)[0]
    if top in RESERVED:
        raise ValueError(f"axis {axis!r} cannot be swept: the sweep sets {', '.join(RESERVED)} itself")
    if axis in LEAF_PATHS or (axis.startswith(("teacher.network.kwargs.", "network.kwargs."))):
        return (axis,)
    close = difflib.get_close_matches(axis, [*ALIASES, *LEAF_PATHS], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ValueError(f"unknown axis {axis!r}; {hint}expected an alias ({', '.join(ALIASES)}) or a dotted "
                     f"run-config field such as loss.sigma_init")


def _check_name(v: str) -> str:
    return check_name(v)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class DivergenceConfig(Strict):
    """When the stopper ends a trial (its reason goes to the trial's status.json and events/).

    NaN/Inf always ends a trial (the Ray Train loop records it as ``diverged``). ``loss_factor``: a loss in
    ``losses`` whose magnitude exceeds this factor x its first non-zero reported magnitude. ``fid_factor``: a
    live score above this factor x the trial's best so far. None switches a rule off.
    """

    loss_factor: Optional[PositiveFloat] = 1e4
    losses: list[str] = Field(default_factory=lambda: ["loss_G", "loss_psi"])
    fid_factor: Optional[PositiveFloat] = 3.0


class AshaConfig(Strict):
    """Optional early stopping of the worse trials (ASHA on the best score vs kimg), for large sweeps."""

    scheduler: Literal["asha"] = "asha"
    grace_kimg: PositiveFloat = 10.0       # no trial is cut before this many kimg
    reduction_factor: float = Field(3.0, gt=1)
    max_kimg: Optional[PositiveFloat] = None  # default: the trials' total_kimg


class SearchConfig(Strict):
    """What varies and how trials run; shared by a sweep file and each stage of a pipeline."""

    search: Literal["grid", "random"] = "grid"
    axes: dict[str, Any] = Field(default_factory=dict)
    points: list[dict[str, Any]] = Field(default_factory=list)  # extra hand-picked trials (axis -> value)
    num_samples: PositiveInt = 1  # random search: how many points to draw
    seed: int = 0                 # random search: the draw's seed
    set: dict[str, Any] = Field(default_factory=dict)  # dotted run-config overrides for every trial
    max_concurrent_trials: Optional[PositiveInt] = None
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    early_stopping: Optional[AshaConfig] = None

    @field_validator("axes")
    @classmethod
    def _axes(cls, axes: dict[str, Any]) -> dict[str, Any]:
        for name, values in axes.items():
            axis_paths(name)
            if isinstance(values, dict):
                if len(values) != 1 or next(iter(values)) not in DISTRIBUTIONS:
                    raise ValueError(f"axes.{name}: expected a list of values or one of "
                                     f"{{uniform: [lo, hi]}}, {{log_uniform: [lo, hi]}}, got {values!r}")
                (kind, rng), = values.items()
                if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(v, (int, float)) for v in rng)
                        or not rng[0] < rng[1] or (kind == "log_uniform" and rng[0] <= 0)):
                    raise ValueError(f"axes.{name}: {kind} needs [lo, hi] with lo < hi"
                                     f"{' and lo > 0' if kind == 'log_uniform' else ''}, got {rng!r}")
            elif not isinstance(values, list):
                raise ValueError(f"axes.{name}: expected a list of values, got {values!r}")
            elif not values:
                raise ValueError(f"axes.{name}: empty grid (give at least one value)")
        return axes

    @field_validator("points")
    @classmethod
    def _points(cls, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, p in enumerate(points):
            for name in p:
                try:
                    axis_paths(name)
                except ValueError as exc:
                    raise ValueError(f"points[{i}]: {exc}") from None
        return points

    @field_validator("set")
    @classmethod
    def _set(cls, s: dict[str, Any]) -> dict[str, Any]:
        for key in s:
            if key.split(".", 1)[0] in ("name", "init_generator"):
                raise ValueError(f"set.{key}: the sweep sets this field itself")
        return s

    @model_validator(mode="after")
    def _check(self):
        if self.search == "grid":
            dist = [n for n, v in self.axes.items() if isinstance(v, dict)]
            if dist:
                raise ValueError(f"axes.{dist[0]}: a distribution needs search: random (grid search takes lists)")
        if not self.axes and not self.points:
            raise ValueError("axes: nothing to sweep (give at least one axis or one entry in points)")
        return self

    def expand(self) -> list[dict[str, Any]]:
        """The trial points (axis -> value), in a fixed order."""
        if self.search == "grid":
            names = list(self.axes)
            grid = [dict(zip(names, combo)) for combo in itertools.product(*(self.axes[n] for n in names))] \
                if names else []
        else:
            rng = random.Random(self.seed)
            grid = []
            for _ in range(self.num_samples):
                point = {}
                for name, values in self.axes.items():
                    if isinstance(values, list):
                        point[name] = rng.choice(values)
                    else:
                        (kind, (lo, hi)), = values.items()
                        point[name] = rng.uniform(lo, hi) if kind == "uniform" else \
                            math.exp(rng.uniform(math.log(lo), math.log(hi)))
                grid.append(point)
        return grid + [dict(p) for p in self.points]


class SweepConfig(SearchConfig):
    """``sida sweep SWEEP.yaml``: one Tune experiment over a base run config."""

    name: str
    base: str  # the run config YAML (relative to the sweep file), e.g. ../digits.yaml
    trial_cpus: PositiveFloat = 1.0  # the trial's driver (Tune function trainable: trainer + scoring coordinator)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)


class StageConfig(SearchConfig):
    """One stage of a pipeline: a Tune experiment; ``init_from`` names the earlier stage whose lowest-score
    checkpoint initialises the generator (SiD²A)."""

    name: str
    method: Optional[Method] = None
    init_from: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @model_validator(mode="after")
    def _check(self):
        if not self.axes and not self.points:
            self.axes = {"method": [self.method or "sida"]}  # a stage may be a single run
        return super()._check()

    def methods(self) -> list[str]:
        """The methods this stage's trials run: its ``method`` axis (several methods side by side, same budget),
        else its ``method`` (default sida)."""
        axis = (self.axes or {}).get("method")
        return [str(m) for m in axis] if isinstance(axis, list) and axis else [self.method or "sida"]


class PipelineConfig(Strict):
    """``sida pipeline staged.yaml``: stages run in order in one storage folder; resumable stage by stage."""

    name: str
    base: str
    set: dict[str, Any] = Field(default_factory=dict)
    trial_cpus: PositiveFloat = 1.0
    stages: list[StageConfig]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @model_validator(mode="after")
    def _check(self):
        if not self.stages:
            raise ValueError("stages: give at least one stage")
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            if st.name in seen:
                raise ValueError(f"stages[{i}].name: {st.name!r} is used twice")
            if st.init_from is not None and st.init_from not in seen:
                where = "a later stage" if st.init_from in [s.name for s in self.stages] else "no stage"
                raise ValueError(f"stages[{i}] ({st.name}).init_from: {st.init_from!r} is {where}; expected one of "
                                 f"the stages before it: {', '.join(seen) or 'none'}")
            for name in st.methods():
                method = get_method(name)
                if method.starts_from_generator != (st.init_from is not None):
                    raise ValueError(f"stages[{i}] ({st.name}): method {method.name!r} and init_from go together "
                                     f"({method.display} starts from an earlier stage's best generator)"
                                     if method.starts_from_generator else
                                     f"stages[{i}] ({st.name}).init_from: method {method.name!r} starts from the "
                                     f"teacher; init_from is for a method that starts from a SiD generator")
            seen.append(st.name)
        return self


@dataclass
class TrialPlan:
    """One trial: its run folder name, the axis values that define it, and its validated run config."""

    name: str
    axes: dict[str, Any]
    cfg: RunConfig
    extra: dict[str, Any] = field(default_factory=dict)


def trial_name(index: int, point: dict[str, Any]) -> str:
    parts = [f"{k}={_fmt(v)}" for k, v in point.items()]
    return "_".join([f"t{index:02d}", *parts]).replace("/", "-").replace(" ", "")


def _set_path(data: dict, dotted: str, value: Any) -> None:
    from schemas.loader import set_path

    try:
        set_path(data, dotted, value)
    except ValueError as exc:
        raise ValueError(f"{dotted}: {exc}") from None


def plan_trials(search: SearchConfig, base: dict, *, source: str, storage_uri: str,
                layers: Sequence[dict[str, Any]] = (), method: Optional[str] = None,
                init_generator: Optional[str] = None) -> list[TrialPlan]:
    """Every trial of ``search`` over the run config ``base`` (a dict), validated as a RunConfig.

    Precedence, lowest first: ``base``, the dotted overrides in ``layers`` in order (a sweep: its ``set``, then the
    command line's ``--set``; a pipeline stage: the pipeline's ``set``, ``--set``, the stage's ``set``), ``method``
    (a pipeline stage's), the axis values. Trials live at ``storage_uri/<trial name>``. A point that does not
    validate raises ConfigError naming the trial's axis values and the problem, before anything starts.
    """
    import copy

    from pydantic import ValidationError

    from schemas.loader import ConfigError, format_validation_error

    plans = []
    for i, point in enumerate(search.expand()):
        data = copy.deepcopy(base)
        desc = ", ".join(f"{k}={_fmt(v)}" for k, v in point.items())
        try:
            for key, value in [kv for layer in layers for kv in layer.items()]:
                _set_path(data, key, value)
            if method is not None:
                data["method"] = method
            for axis, value in point.items():
                for path in axis_paths(axis):
                    _set_path(data, path, value)
        except ValueError as exc:
            raise ConfigError(f"invalid sweep {source}: trial {desc}: {exc}") from None
        name = trial_name(i, point)
        data["name"] = name
        data.setdefault("storage", {})
        data["storage"]["uri"] = storage_uri
        if data.get("method") in method_names() and get_method(data["method"]).starts_from_generator:
            data["init_generator"] = init_generator or "pending: the best checkpoint of an earlier stage"
        try:
            cfg = RunConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, f"{source} (trial {desc})", RunConfig)
                              .replace("invalid config", "invalid sweep", 1)) from None
        plans.append(TrialPlan(name, dict(point), cfg))
    return plans


def storage_config(base: dict, layers: Sequence[dict[str, Any]] = ()):
    """The base run config's ``storage`` section after the dotted overrides in ``layers``, validated."""
    import copy

    from schemas.loader import validate
    from schemas.run import StorageConfig

    data = {"storage": copy.deepcopy(base.get("storage") or {})}
    for layer in layers:
        for key, value in layer.items():
            if key == "storage" or key.startswith("storage."):
                _set_path(data, key, value)
    return validate(StorageConfig, data["storage"], source="storage")


def parse_overrides(items) -> dict[str, Any]:
    """``--set KEY=VALUE`` strings as {dotted key: parsed value} (values parsed the way YAML would)."""
    from schemas.loader import ConfigError, parse_value

    out = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set total_kimg=10")
        out[key.strip()] = parse_value(raw)
    return out


def _load(model, path, what: str):
    from pathlib import Path

    from schemas.loader import ConfigError, read_yaml, validate

    try:
        cfg = validate(model, read_yaml(path), source=str(path))
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("invalid config", f"invalid {what}", 1)) from None
    base = Path(cfg.base)
    if not base.is_absolute():
        base = Path(path).resolve().parent / base
    if not base.is_file():
        raise ConfigError(f"invalid {what} {path}: base: run config {cfg.base!r} does not exist "
                          f"(looked for {base}; a relative path is relative to the {what} file)")
    return cfg, read_yaml(base), str(base)


def load_sweep(path) -> tuple[SweepConfig, dict, str]:
    """(sweep config, base run config as a dict, base path); ConfigError (one line) if anything is wrong."""
    return _load(SweepConfig, path, "sweep")


def load_pipeline(path) -> tuple[PipelineConfig, dict, str]:
    return _load(PipelineConfig, path, "pipeline")
