"""Checks every entry point (validate, train, distill, sweep, pipeline) runs on a config before it touches data,
Ray or storage, so that ``sida validate`` saying "valid" means training will not fail on the config."""
from __future__ import annotations

from typing import Optional

from schemas.loader import ConfigError


def check_teacher_network(cfg) -> None:
    """A teacher trained here (no ``teacher.path``) from ``teacher.network``: build it on the meta device and run
    one meta batch (sida_core.training_loop.check_network_spec). A published teacher brings its own network."""
    if cfg.teacher.path is not None:
        return
    from sida_core.training_loop import check_network_spec, network_spec

    try:
        check_network_spec(network_spec(cfg))
    except ValueError as exc:
        raise ConfigError(f"teacher.network: {exc}") from None


def check_before_writes(cfg, address: Optional[str] = None) -> None:
    """The checks a run config gets from every entry point before data, Ray or storage are touched: its teacher
    network, its logging packages, and keys in the config only where this command starts Ray itself."""
    from ray_jobs.cluster import check_credentials
    from ray_jobs.tracking import check_logging

    check_teacher_network(cfg)
    check_logging(cfg.logging)
    check_credentials(cfg.storage, address)


def check_references(cfgs) -> None:
    """``metric.reference`` of every trial of a sweep or pipeline read and checked as ``sida train`` does
    (ray_jobs.scoring.check_reference), once per distinct metric and data: an unreadable file stops the sweep
    before sweep.json, not each trial after Ray started."""
    import json

    from ray_jobs.scoring import check_reference

    seen = set()
    for cfg in cfgs:
        key = json.dumps([cfg.metric.model_dump(mode="json"), cfg.data.model_dump(mode="json"),
                          cfg.storage.endpoint_url], sort_keys=True)
        if key not in seen:
            seen.add(key)
            check_reference(cfg)
