"""A real Ray head for tests: ``ray start --head --block`` in its own session, temp dir and ports, with the
dashboard (Jobs API) on 127.0.0.1 and token authentication on (a token of its own, not ~/.ray/auth_token).

Other people's Ray processes on the same machine are never touched: teardown signals the ``ray start
--block`` process (which shuts its node down), then kills what is left of *this* head only: the members of
its process group and any process whose command line names its private temp dir. Never ``ray stop``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def train_worker_pids(root: int) -> list[int]:
    """Live PIDs of the Ray Train worker processes below process ``root`` (Linux /proc; Ray titles them
    ray::RayTrainWorker): e.g. below a ``sida train`` that started its own Ray, or below a head's ``ray start``."""
    parent, title = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] in ("Z", "X"):
                    continue
                parent[int(d.name)] = int(stat[1])
                title[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                pass
    below, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - below
        below |= frontier
    return sorted(p for p in below if "RayTrainWorker" in title.get(p, ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    dashboard_url: str      # http://127.0.0.1:PORT: the Jobs API address
    gcs_address: str        # 127.0.0.1:PORT
    temp_dir: Path
    token_file: Path
    proc: subprocess.Popen
    log_path: Path
    client_env: dict = field(default_factory=dict)  # what a client needs: the token file, nothing else

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def own_pids(self) -> list[int]:
        """Live (not zombie) processes of this head: its process group, or a command line naming its temp dir."""
        pids, needle = [], str(self.temp_dir).rstrip("/").encode() + b"/"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    continue
                if os.getpgid(pid) == self.proc.pid or needle in (entry / "cmdline").read_bytes():
                    pids.append(pid)
            except (OSError, IndexError):
                continue
        return pids

    def stop(self, grace_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while self.own_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.own_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.own_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(5)


def start_ray_head(base: Path, *, num_cpus: int = 4, env: dict | None = None, timeout_s: float = 120.0) -> RayHead:
    """Start a head whose temp dir is ``base`` (keep it short: Ray's socket paths must stay under 108 bytes)."""
    base.mkdir(parents=True, exist_ok=True)
    temp_dir, token_file, log_path = base, base / "auth_token", base / "ray_start.log"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    gcs, dash = free_port(), free_port()
    ports = {"--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port()}
    # Token auth, deliberately: the mode Ray 2.60 picks by default for clusters it starts, with a token of our own.
    head_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                "RAY_TMPDIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    head_env.pop("RAY_ADDRESS", None)
    head_env.pop("RAY_AUTH_TOKEN", None)
    ray_exe = Path(sys.executable).with_name("ray")
    cmd = [str(ray_exe), "start", "--head", "--block", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"{k}={v}" for k, v in ports.items())]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=head_env, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp_dir, token_file, proc, log_path,
                   client_env={"RAY_AUTH_TOKEN_PATH": str(token_file)})
    deadline = time.monotonic() + timeout_s
    # ready: the Jobs API answers and the state API lists the head node with its CPUs
    request = urllib.request.Request(head.dashboard_url + "/api/v0/nodes?detail=1",
                                     headers={"Authorization": f"Bearer {token_file.read_text()}"})
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
            if any(n.get("state") == "ALIVE" and n.get("resources_total", {}).get("CPU") for n in nodes):
                return head
            raise OSError("head node not registered yet")
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = head.log_tail()
                head.stop()
                raise RuntimeError(f"ray head did not come up within {timeout_s:.0f} s "
                                   f"(exit code {proc.poll()}); log tail:\n{tail}") from None
            time.sleep(0.5)


def remove(head: RayHead) -> None:
    head.stop()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def short_base(preferred: Path) -> tuple[Path, bool]:
    """``preferred`` if short enough for Ray's socket paths, else a fresh short folder in /tmp (second: made here)."""
    if len(str(preferred)) <= 48:
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp")), True
