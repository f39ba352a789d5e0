"""YAML in, validated model out: the one edge where user configs are read.

Errors come back as :class:`ConfigError` with one line per problem that names the field and what was
expected, never a pydantic or YAML traceback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Type, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A user config is invalid; ``str(err)`` is meant to be shown as is."""


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    kind = err.get("type", "")
    msg = err.get("msg", "")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; see the documented fields of this section)"
    if kind == "literal_error":
        return f"{loc}: {msg}, got {err.get('input')!r}"
    if kind == "missing":
        return f"{loc}: required field is missing"
    got = err.get("input")
    shown = f", got {got!r}" if not isinstance(got, (dict, list)) and kind not in ("value_error", "assertion_error") else ""
    return f"{loc}: {msg}{shown}" if loc else f"{msg}"


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [_describe(e) for e in exc.errors()]
    return f"invalid config {source}: " + "; ".join(lines)


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides (``--set``) to a nested dict, creating sections as needed."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set loss.alpha=1.2")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = parse_value(raw)
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def validate(model: Type[M], data: dict, source: str = "<dict>") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def check_paths_exist(cfg, fields: Iterable[str], base: Path) -> None:
    """Fail with the field name when a local file a config points to is missing (remote URIs are not checked)."""
    for dotted in fields:
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        if node is None or is_remote(str(node)):
            continue
        path = Path(str(node).removeprefix("file://"))
        if not path.is_absolute():
            path = base / path
        if not path.exists():
            raise ConfigError(f"{dotted}: file {str(node)!r} does not exist")


def load_config(model: Type[M], path: str | os.PathLike, overrides: Iterable[str] = (),
                path_fields: Iterable[str] = ()) -> M:
    """Read YAML, apply ``--set`` overrides, validate, and check that referenced local files exist."""
    data = apply_overrides(read_yaml(path), overrides)
    cfg = validate(model, data, source=str(path))
    check_paths_exist(cfg, path_fields, Path.cwd())
    return cfg


def load_run_config(path: str | os.PathLike, overrides: Iterable[str] = ()):
    from schemas.run import RunConfig

    return load_config(RunConfig, path, overrides,
                       path_fields=("teacher.path", "init_generator", "data.path", "metric.reference"))
