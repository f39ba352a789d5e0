"""YAML in, validated model out: the one edge where user configs are read.

Errors come back as :class:`ConfigError` with one line per problem that names the field and what was
expected, never a pydantic or YAML traceback.
"""
from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Type, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A user config is invalid; ``str(err)`` is meant to be shown as is."""


def _section_fields(model: Any, loc: tuple) -> list[str]:
    """The documented keys of the section at ``loc`` (walking nested pydantic models), or [] if unknown."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in getattr(model, "model_fields", {}):
            return []
        ann = model.model_fields[part].annotation
        model = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return sorted(getattr(model, "model_fields", {})) if model is not None else []


def _describe(err: Mapping[str, Any], model: Any = None) -> str:
    loc_parts = tuple(p for p in err.get("loc", ()) if p != "__root__")
    loc = ".".join(str(p) for p in loc_parts)
    kind = err.get("type", "")
    msg = str(err.get("msg", "")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    got = err.get("input")
    if kind == "extra_forbidden":
        allowed = _section_fields(model, loc_parts[:-1])
        close = difflib.get_close_matches(str(loc_parts[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{loc}: unknown key; {hint}expected one of: {', '.join(allowed)}" if allowed \
            else f"{loc}: unknown key (check the spelling)"
    if kind == "missing":
        return f"{loc}: required field is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{loc}: expected a mapping of keys to values (a section), got {type(got).__name__}"
    if kind in ("value_error", "assertion_error"):
        # Cross-field checks already name their fields; don't repeat the section in front.
        if not loc or msg.startswith(f"{loc}.") or msg.startswith(f"{loc} "):
            return msg
        last = str(loc_parts[-1])
        if msg.startswith((f"{last}.", f"{last} ")):  # e.g. stages.0 + "axes.alpha: ..." -> stages.0.axes.alpha: ...
            return ".".join([*map(str, loc_parts[:-1]), msg])
        return f"{loc}: {msg}"
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else f" (got a {type(got).__name__})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}"


def format_validation_error(exc: ValidationError, source: str, model: type | None = None) -> str:
    """One line: ``invalid config SOURCE: field: problem; field: problem``."""
    lines = [_describe(e, model) for e in exc.errors()]
    return _one_line(f"invalid config {source}: " + "; ".join(lines))


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-5`` (no dot) as a float, as YAML 1.2 and users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _mapping_without_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML would silently keep the last of two ``loss:`` sections."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` then overriding keys is fine
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers incl. ``1e-5``, bools, lists, null)."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError:
        return text


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections as needed; ValueError if a part is not a section."""
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ValueError("empty key")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"{p} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` overrides (``--set``) to a nested dict, creating sections as needed."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set loss.alpha=1.2")
        key, _, raw = item.partition("=")
        try:
            set_path(data, key, parse_value(raw))
        except ValueError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from None
    return data


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r} is a directory; expected a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = _load_yaml(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(_one_line(f"config file {str(p)!r} cannot be read as UTF-8 text: {exc}")) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(_one_line(f"config file {str(p)!r} is not valid YAML{where}: "
                                     f"{getattr(exc, 'problem', None) or exc}")) from None
    if data is None:
        raise ConfigError(f"config file {str(p)!r} is empty; expected a mapping of keys to values "
                          f"(start from configs/digits.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def validate(model: Type[M], data: dict, source: str = "<dict>") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, model)) from None


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
                       path_fields=("teacher.path", "init_generator", "data.path", "metric.reference", "metric.vae"))
