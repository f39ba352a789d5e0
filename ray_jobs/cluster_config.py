"""Cluster-launcher YAMLs checked the way ``ray up`` checks them, without a cloud account.

Two steps, both Ray's own: the YAML as written against the JSON schema Ray ships
(``ray/autoscaler/ray-schema.json``), then Ray's preparation (provider defaults filled in, setup commands
merged, an on-premise cluster turned into its node type) and ``validate_config`` on the result, as
``ray up`` does before it talks to a cloud. Step one is a little stricter than ``ray up``: every node type
must state its ``resources`` (AWS would fill them in from the instance type), which the job-submission
resource check and the README table rely on. Errors come back as one line naming the file and the key.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

from schemas.loader import ConfigError, read_yaml


def ray_schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def _subschema(schema: dict, path: list) -> dict:
    """The schema node that describes the object at ``path`` (following properties / patternProperties)."""
    node = schema
    for part in path:
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif node.get("patternProperties"):
            node = next(iter(node["patternProperties"].values()))
        else:
            return {}
        if "$ref" in node:
            ref = node["$ref"].removeprefix("#/").split("/")
            node = schema
            for r in ref:
                node = node[r]
    return node


def _describe(err, schema: dict) -> str:
    path = list(err.absolute_path)
    where = ".".join(str(p) for p in path)
    if err.validator == "additionalProperties":
        allowed = sorted(_subschema(schema, path).get("properties", {}))
        extra = [k for k in err.instance if k not in allowed] if isinstance(err.instance, dict) else []
        parts = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
            parts.append(f"{'.'.join([*map(str, path), key])}: unknown key; {hint}")
        if parts:
            return "; ".join(parts)
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return f"{'.'.join([*map(str, path), missing])}: required key is missing"
    return f"{where or '(top level)'}: {err.message}"


def validate_cluster_file(path: str | os.PathLike) -> dict[str, Any]:
    """Check one cluster YAML; returns a summary (name, provider, node types with resources and worker counts)."""
    import jsonschema

    path = Path(path)
    data = read_yaml(path)
    schema = ray_schema()
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(f"invalid cluster config {path}: " + "; ".join(_describe(e, schema) for e in errors[:3]))
    from ray.autoscaler._private.providers import _NODE_PROVIDERS

    kind = data["provider"]["type"]
    if kind not in _NODE_PROVIDERS:
        raise ConfigError(f"invalid cluster config {path}: provider.type: unknown provider {kind!r}; Ray knows: "
                          f"{', '.join(sorted(_NODE_PROVIDERS))}")
    prepared = _as_ray_up_would(data, path)
    types = prepared.get("available_node_types", {})
    return {"file": str(path), "cluster_name": prepared["cluster_name"], "provider": prepared["provider"]["type"],
            "max_workers": prepared.get("max_workers"), "head_node_type": prepared.get("head_node_type"),
            "node_types": {name: {"resources": t.get("resources", {}), "min_workers": t.get("min_workers", 0),
                                  "max_workers": t.get("max_workers", 0)} for name, t in types.items()}}


def _as_ray_up_would(data: dict, path: Path) -> dict:
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    quiet, log = io.StringIO(), logging.getLogger("ray.autoscaler")
    level = log.level
    log.setLevel(logging.WARNING)  # ray up's progress notes ("setting max workers ...") are not for us
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            prepared = prepare_config(copy.deepcopy(data))
            validate_config(prepared)
    except jsonschema.ValidationError as exc:
        raise ConfigError(f"invalid cluster config {path}: {_describe(exc, ray_schema())}") from None
    except click.ClickException as exc:
        raise ConfigError(f"invalid cluster config {path}: {' '.join(exc.format_message().split())}") from None
    except (ValueError, KeyError, NotImplementedError, RuntimeError, AssertionError, TypeError) as exc:
        raise ConfigError(f"invalid cluster config {path}: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    finally:
        log.setLevel(level)
    return prepared
