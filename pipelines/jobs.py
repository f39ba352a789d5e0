"""``sida submit``: a job file in, a Ray job out. Validate everything first (spec, the config it names, what
the cluster advertises), stage the config into a small ``working_dir``, submit through the Jobs API.

The uploaded ``working_dir`` holds the config file only (a sweep or pipeline file: with its base run config),
not the repository or the venv: the cluster runs the project installed by its setup commands, and the job's
command reads the config from its working directory, with the job's overrides passed as ``--set``.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

from schemas.loader import ConfigError, is_remote


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def runtime_env_for(job, staged: Optional[Path]) -> dict:
    """Ray runtime_env: the staged config folder, the spec's env vars, and the forwarded variables."""
    spec = job.spec
    env = dict(spec.runtime_env.env_vars)
    missing = [k for k in spec.forward_env if k not in os.environ]
    if missing:
        raise ConfigError(f"forward_env: {', '.join(missing)} not set in this shell (the job would run without "
                          f"{'them' if len(missing) > 1 else 'it'})")
    env.update({k: os.environ[k] for k in spec.forward_env})
    out: dict = {"env_vars": env} if env else {}
    if staged is not None:
        out["working_dir"] = str(staged)
    for key in ("pip", "py_modules"):
        if getattr(spec.runtime_env, key):
            out[key] = getattr(spec.runtime_env, key)
    return out


def submit_job(job_file: str, address: Optional[str] = None, *, allow_autoscale: bool = False,
               log: Callable[[str], None] = _log) -> dict:
    """Validate ``job_file`` and what it references, check the cluster's resources, submit; returns a summary."""
    from ray_jobs import jobs
    from schemas.job import check_job, load_job_spec

    spec = load_job_spec(job_file)
    job = check_job(spec)
    addr = jobs.resolve_address(address)
    if job.storage_uri and not is_remote(job.storage_uri) and not jobs.is_loopback(addr):
        job.warnings.append(f"the cluster at {addr} is remote: the run will land on its nodes' disks under "
                            f"{job.storage_uri}, not on this machine")
    for w in job.warnings:
        log(f"warning: {w}")

    c = jobs.client(addr)
    if allow_autoscale:
        log(f"note: resources not checked against the running nodes (--allow-autoscale): {job.request.cpus:g} CPUs, "
            f"{job.request.gpus:g} GPUs must come from the autoscaler (the cluster YAML's max_workers)")
    else:
        jobs.check_resources(job.request, jobs.cluster_nodes(c), addr)

    metadata = {"sida_kind": spec.kind, **({"sida_name": job.name} if job.name else {}),
                **({"sida_run_uri": job.run_uri} if job.run_uri else {}), **spec.tags}
    staged = Path(tempfile.mkdtemp(prefix="sida-job-")) if job.config_path else None
    try:
        if staged is not None and job.staged:  # e.g. a sweep file and its base run config
            for name, text in job.staged.items():
                (staged / name).write_text(text)
        elif staged is not None:
            shutil.copy2(job.config_path, staged / job.config_path.name)
        entrypoint = job.entrypoint()
        job_id = jobs.submit(c, entrypoint=entrypoint, runtime_env=runtime_env_for(job, staged), metadata=metadata,
                             driver_cpus=spec.resources.driver_cpus)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    log(f"submitted {job_id} to {addr}: {entrypoint}")
    return {"job_id": job_id, "address": addr, "kind": spec.kind, "name": job.name, "run_uri": job.run_uri,
            "entrypoint": entrypoint}
