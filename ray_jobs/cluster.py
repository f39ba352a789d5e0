"""Connecting the driver to Ray: a local Ray started for the job (the embedded default) or ``--address``."""
from __future__ import annotations

import os
from typing import Optional

from sida_core.determinism import PINNED_VARS

# Passed on to every worker (job-level runtime_env): where the object store is, the cache of built-in artefacts,
# threads, the CPU kernel caps (sida_core/determinism.py: on a cluster, nodes started by `ray start` lack the
# driver's env). Never a secret: Ray writes a runtime_env in plain text to every node's runtime_env_agent.log
# and shows it in the dashboard, so credentials reach Ray's processes only through their own environment
# (inherited from this driver when it starts a local Ray; the nodes' own on a cluster: see export_credentials).
# The secret variables: schemas.job.SECRET_ENV (refused in job specs too).
FORWARDED_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "SIDA_CACHE", "SIDA_NUM_THREADS",
                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "SIDA_CPU_KERNELS", *PINNED_VARS)
# Ray Train V2 gives each worker a one-slot result queue that the controller drains every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2 s), so every ray.train.report after the first blocked
# ~1.96 s here (a bare 2-worker TorchTrainer, Ray 2.60). 0.25 s keeps a report to a fraction of a second at
# the price of more frequent controller polls; a value already in the environment wins.
REPORT_POLL_S = "0.25"


def worker_env() -> dict[str, str]:
    """Environment for the workers and the Train controller (job-level runtime_env): the forwarded variables
    and Ray Train's result-poll interval; never a secret (SECRET_ENV)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    return env


def _config_keys(storage_cfg) -> dict[str, str]:
    """``storage.access_key_id`` / ``secret_access_key`` of a run config as AWS variables ({} if not given)."""
    out = {}
    for field, var in (("access_key_id", "AWS_ACCESS_KEY_ID"), ("secret_access_key", "AWS_SECRET_ACCESS_KEY")):
        secret = getattr(storage_cfg, field, None) if storage_cfg is not None else None
        if secret is not None:
            out[var] = secret.get_secret_value()
    return out


def joins_running_cluster(address: Optional[str]) -> bool:
    """Whether :func:`connect` would join a cluster it did not start (``--address``, ``RAY_ADDRESS``, a job)."""
    return bool(address or os.environ.get("RAY_ADDRESS") or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ)


def check_credentials(storage_cfg, address: Optional[str]) -> None:
    """Keys written in the run config reach only a Ray this command starts (its processes inherit this one's
    environment): refused, in one line and before anything is written, when joining a running cluster."""
    from schemas.loader import ConfigError

    if _config_keys(storage_cfg) and joins_running_cluster(address) and not _ray_initialized():
        raise ConfigError("storage.access_key_id / storage.secret_access_key: keys in the run config reach only a "
                          "Ray this command starts; a running cluster's nodes need their own credentials (an "
                          "instance profile, or AWS_* exported before `ray start`, e.g. ~/.sida/storage.env): "
                          "remove them from the config")


def export_credentials(storage_cfg) -> None:
    """Put the run config's keys into this process's environment before Ray starts, so that every Ray process
    (Train controller, workers, scorers, Tune trials) inherits them instead of reading them from a runtime_env."""
    os.environ.update(_config_keys(storage_cfg))


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def connect(address: Optional[str] = None, *, num_cpus: Optional[float] = None,
            env: Optional[dict[str, str]] = None, storage_cfg=None) -> bool:
    """Start a local Ray (``address`` None) or join a running cluster (``address``, or the cluster of the Ray
    job this driver runs in); returns True if this call started or joined it (the caller shuts it down).

    A local Ray gets ``max(cores, num_cpus)`` logical CPUs so that the requested workers fit even on a
    2-core machine (the workers are single-threaded by default). Token authentication (Ray's default since
    2.5x) is handled by Ray itself for a local cluster; for a remote one set RAY_AUTH_MODE=token and the
    cluster's token as Ray documents (see README, "Running on a cluster"). ``storage_cfg``: keys in it are
    exported to this process's environment first (:func:`export_credentials`).
    """
    import ray

    check_credentials(storage_cfg, address)
    export_credentials(storage_cfg)
    if ray.is_initialized():
        return False
    if not address and "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # the driver of a submitted Ray job
        address = os.environ.get("RAY_ADDRESS") or "auto"
    address = address or os.environ.get("RAY_ADDRESS") or None  # an explicit RAY_ADDRESS is the user's choice
    env = _without_job_env(env)
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        cpus = max(os.cpu_count() or 1, int(-(-(num_cpus or 0) // 1)))
        # The dashboard (loopback only) serves the state API that Ray Train's placement-group cleaner polls.
        # address="local": a new Ray of its own, never whichever cluster /tmp/ray/ray_current_cluster names (another
        # user's `ray start` on this machine would be joined, and refuses num_cpus)
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=True)
    return True


def _without_job_env(env: Optional[dict[str, str]]) -> Optional[dict[str, str]]:
    """Inside a submitted Ray job, drop the variables the job's runtime_env already sets: Ray refuses a driver
    runtime_env that repeats a job's env var (the workers inherit the job's anyway)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not env or not raw:
        return env
    try:
        job_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_vars}
