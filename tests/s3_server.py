"""A real S3-API server for tests: ``moto_server`` in its own process on 127.0.0.1 (objects live in memory).

An outage is simulated by freezing the process (``pause()`` = SIGSTOP, ``resume()`` = SIGCONT): the port
stays open, requests queue in the kernel and time out on the client, and nothing stored is lost.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class MotoServer:
    endpoint_url: str
    port: int
    pid: int
    proc: subprocess.Popen
    log_path: Path

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()  # a stopped process cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.log_path.parent, ignore_errors=True)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def objects(self, bucket: str) -> Iterator[tuple[str, bytes]]:
        """Every object of ``bucket``, as (key, bytes)."""
        c = self.client()
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                yield o["Key"], c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def log_tail(self, n: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(timeout_s: float = 30.0) -> MotoServer:
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    port = _free_port()
    log_path = Path(tempfile.mkdtemp(prefix="moto-")) / "moto_server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
    server = MotoServer(f"http://127.0.0.1:{port}", port, proc.pid, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(server.endpoint_url + "/", timeout=1).close()
            return server
        except urllib.error.HTTPError:
            return server  # it answers HTTP, whatever the status
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                message = (f"moto_server on port {port} did not come up within {timeout_s:.0f} s "
                           f"(exit code {proc.poll()}); log tail:\n{server.log_tail()}")
                server.stop()
                raise RuntimeError(message) from None
            time.sleep(0.1)


@dataclass
class S3Bucket:
    uri: str  # s3://<name>
    name: str
    endpoint_url: str
    server: MotoServer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = start_moto_server()
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> Iterator[S3Bucket]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    try:
        yield S3Bucket(f"s3://{name}", name, s3_server.endpoint_url, s3_server)
    finally:
        s3_server.resume()  # never leave the shared server frozen for the next test
