"""Ray Jobs API wiring: an authenticated ``JobSubmissionClient``, what the cluster advertises, submit, status,
logs, stop. Every failure the user can act on becomes a one-line :class:`JobError`.

Token authentication (Ray >= 2.52; on by default for clusters Ray 2.60 starts): the dashboard wants
``Authorization: Bearer TOKEN``. The token is looked up where Ray itself looks (RAY_AUTH_TOKEN, then the file
named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) and always sent when found, whatever RAY_AUTH_MODE
says in this shell; a cluster without auth ignores it. 401/403 answers name what to fix.
"""
from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from schemas.job import Request

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_TOKEN_HELP = ("copy the head node's token (`ray get-auth-token` on the head, or its ~/.ray/auth_token) to "
               "~/.ray/auth_token here, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH")


class JobError(RuntimeError):
    """A Jobs API call failed (unreachable, unauthorised, unknown job, refused); the message is one line."""


def auth_token() -> tuple[Optional[str], str]:
    """(token, where it came from), in Ray's order of precedence; (None, "") when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file ({exc.strerror})") from None
        if not token:
            raise JobError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token, f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, ""


def auth_headers() -> dict[str, str]:
    """The header this client sends. Always set (empty without a token) so that the SDK does not add a token
    of its own from a cache in this process: what is sent is what :func:`auth_token` found."""
    token, _ = auth_token()
    return {"Authorization": f"Bearer {token}" if token else ""}


def resolve_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if not address:
        raise JobError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard; through "
                       "`ray dashboard CLUSTER.yaml` it is http://127.0.0.1:8265) or set RAY_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address {address!r}: the Jobs API is the dashboard's HTTP address, e.g. http://HEAD:8265")
    return address.rstrip("/")


def is_loopback(address: str) -> bool:
    from urllib.parse import urlparse

    return (urlparse(address).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _explain(exc: BaseException, address: str) -> JobError:
    """Turn what the Jobs SDK raises into one actionable line."""
    from ray.exceptions import AuthenticationError

    text = _one_line(exc)
    if isinstance(exc, AuthenticationError) or "status code 401" in text or "status code 403" in text:
        _, source = auth_token()
        if "401" in text or "Authentication required" in text:
            what = "requires a token and none was found here" if not source else f"did not accept the token ({source})"
        else:
            what = f"rejected the token from {source or 'this machine'}"
        return JobError(f"Ray cluster at {address} {what}: {_TOKEN_HELP}")
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return JobError(f"cannot reach the Ray Jobs API at {address}: is the cluster up and the dashboard port "
                        f"reachable (ray dashboard CLUSTER.yaml forwards it to http://127.0.0.1:8265)?")
    if "does not exist" in text or "status code 404" in text:
        return JobError(f"Ray cluster at {address}: {text.removeprefix('Request failed with status code 404: ').rstrip('.')}")
    return JobError(f"Ray Jobs API at {address}: {text}")


def client(address: Optional[str]):
    """A ``JobSubmissionClient`` for ``address`` that sends the token (checks the connection once)."""
    address = resolve_address(address)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # ray without [default]
        raise JobError(f"the Ray Jobs client needs ray[default] ({exc})") from None
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except Exception as exc:  # noqa: BLE001 - the SDK raises plain RuntimeError/ConnectionError
        raise _explain(exc, address) from None


def _call(c, fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except JobError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, c.get_address()) from None


# ---------------------------------------------------------------------------------------- cluster resources
def cluster_nodes(c) -> list[dict[str, float]]:
    """``resources_total`` of every live node, from the dashboard's state API (same address, same token)."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    def query():
        state = StateApiClient(c.get_address(), headers={"Content-Type": "application/json", **auth_headers()})
        nodes = state.list(StateResource.NODES, options=ListApiOptions(detail=True, timeout=30),
                           raise_on_missing_output=False)
        return [dict(n.resources_total or {}) for n in nodes if n.state == "ALIVE"]

    return _call(c, query)


def _fits(node: dict[str, float], r: Request) -> float:
    """How many of the request's workers fit on one node (inf when a worker needs neither CPU nor GPU)."""
    n = math.inf
    for need, have in ((r.cpus_per_worker, node.get("CPU", 0.0)), (r.gpus_per_worker, node.get("GPU", 0.0))):
        if need > 0:
            n = min(n, math.floor(have / need + 1e-9))
    return n


def check_resources(r: Request, nodes: Iterable[dict[str, float]], address: str) -> None:
    """Refuse a request the live cluster cannot hold: totals, and workers that fit whole on some node."""
    nodes = list(nodes)
    cpus, gpus = sum(n.get("CPU", 0.0) for n in nodes), sum(n.get("GPU", 0.0) for n in nodes)
    fit = sum(_fits(n, r) for n in nodes)
    if r.cpus <= cpus + 1e-9 and r.gpus <= gpus + 1e-9 and (r.workers == 0 or fit >= r.workers):
        return
    scorers = (f" + scorers ({r.scorer_cpus:g} CPU, {r.scorer_gpus:g} GPU)"
               if r.scorer_cpus or r.scorer_gpus else "")
    ask = (f"{r.workers} worker(s) x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU) + {r.driver_cpus:g} "
           f"driver CPU{scorers} = {r.cpus:g} CPUs, {r.gpus:g} GPUs")
    fits = "" if fit == math.inf else f"; {fit:g} such worker(s) fit on its nodes"
    raise JobError(f"resources: the job asks for {ask}, but the cluster at {address} advertises {cpus:g} CPUs, "
                   f"{gpus:g} GPUs on {len(nodes)} node(s){fits}; lower resources.num_workers, wait for "
                   f"worker nodes to join (ray status), or pass --allow-autoscale if the autoscaler will add them")


# ------------------------------------------------------------------------------------------------- jobs
def submit(c, *, entrypoint: str, runtime_env: dict, metadata: dict[str, str], driver_cpus: float = 0.0) -> str:
    return _call(c, c.submit_job, entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                 entrypoint_num_cpus=driver_cpus or None)


def info(c, job_id: str) -> dict:
    i = _call(c, c.get_job_info, job_id)
    return {"job_id": job_id, "status": str(i.status.value if hasattr(i.status, "value") else i.status),
            "message": i.message, "entrypoint": i.entrypoint, "metadata": i.metadata or {},
            "start_time": i.start_time, "end_time": i.end_time}


def status(c, job_id: str) -> str:
    s = _call(c, c.get_job_status, job_id)
    return str(s.value if hasattr(s, "value") else s)


def wait(c, job_id: str, states: Iterable[str] = TERMINAL, timeout_s: float = 60.0, poll_s: float = 1.0) -> str:
    """Poll until the job's status is one of ``states`` (or the timeout passes); returns the last status."""
    deadline, states = time.monotonic() + timeout_s, tuple(states)
    while True:
        s = status(c, job_id)
        if s in states or time.monotonic() > deadline:
            return s
        time.sleep(poll_s)


def logs(c, job_id: str) -> str:
    return _call(c, c.get_job_logs, job_id)


def follow(c, job_id: str, write: Callable[[str], None] = sys.stdout.write) -> str:
    """Stream the job's logs until it ends (Ray's websocket tail); returns the final status."""
    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)
            if hasattr(sys.stdout, "flush"):
                sys.stdout.flush()

    status(c, job_id)  # a clear error for an unknown id before opening the stream
    _call(c, lambda: asyncio.run(tail()))
    return wait(c, job_id, timeout_s=30)


def stop(c, job_id: str) -> bool:
    return bool(_call(c, c.stop_job, job_id))
