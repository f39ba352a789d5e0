"""store.storage against a local folder and a real S3-API server (moto_server in its own process, reached
through real pyarrow and boto3 clients). Outages are real too: the server process is frozen with SIGSTOP."""
from __future__ import annotations

import logging
import pickle
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from store.storage import RetryPolicy, Storage, StorageError
from schemas.run import StorageConfig
from tests.s3_server import S3Bucket

FAST = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=0.5, connect_timeout_s=1, request_timeout_s=1)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"{bucket.uri}/pre/fix/", endpoint_url=bucket.endpoint_url, retry=FAST)


def _get(bucket: S3Bucket, key: str) -> bytes:
    return bucket.server.client().get_object(Bucket=bucket.name, Key=key)["Body"].read()


def _keys(bucket: S3Bucket) -> list[str]:
    return [o["Key"] for o in bucket.server.client().list_objects_v2(Bucket=bucket.name).get("Contents", [])]


def test_bytes_json_listdir_delete(store: Storage):
    assert store.listdir() == [] and not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"\x00payload")
    store.write_json("a/sub/c.json", {"x": [1, 2], "y": None})
    store.write_bytes("top.txt", b"t")
    assert store.read_bytes("a/b.bin") == b"\x00payload"
    assert store.read_json("a/sub/c.json") == {"x": [1, 2], "y": None}
    assert store.exists("a/b.bin") and store.exists("a/sub") and not store.exists("a/nope")
    assert store.listdir() == ["a", "top.txt"] and store.listdir("a") == ["b.bin", "sub"]
    assert store.listdir("missing") == [] and store.listdir("top.txt") == []
    store.write_bytes("a/b.bin", b"v2")  # overwrite
    assert store.read_bytes("a/b.bin") == b"v2"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/nope")
    store.delete("a/b.bin")
    store.delete("a/b.bin")  # idempotent
    assert store.listdir("a") == ["sub"]
    store.delete("a")  # a tree
    store.delete("a")
    assert not store.exists("a/sub/c.json") and "a" not in store.listdir() and store.exists("top.txt")


def test_delete_files_in_batches_over_the_1000_key_limit(store: Storage):
    """S3's DeleteObjects takes at most 1,000 keys per request: 1,003 files (and a missing one) all go."""
    names = [f"many/f{i:04d}" for i in range(1003)]
    if store.is_s3:
        import boto3

        bucket, _, prefix = store.root.partition("/")
        client = boto3.client("s3", endpoint_url=store.endpoint_url, region_name="us-east-1")
        for n in names:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{n}".lstrip("/"), Body=b"x")
    else:
        for n in names:
            store.write_bytes(n, b"x")
    assert len(store.files("many")) == 1003
    store.delete_files([*names[:-1], "many/never-written", names[-1]])
    assert store.files("many") == {} and store.listdir("many") == []


def test_upload_download_dir_marker_last(store: Storage, tmp_path: Path):
    src = tmp_path / "ckpt"
    for name, data in {"manifest.json": b"{}", "a.pt": b"A" * 1000, "z.bin": b"Z", "sub/b.pt": b"B"}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    uploaded: list[str] = []
    real_upload = store.upload_file
    store.upload_file = lambda p, rel: (uploaded.append(rel), real_upload(p, rel))[1]  # record the order
    store.upload_dir(src, "ckpts/0001", last=["manifest.json", "not-there.json"])
    assert uploaded[-1] == "ckpts/0001/manifest.json" and len(uploaded) == 4
    assert store.listdir("ckpts/0001") == ["a.pt", "manifest.json", "sub", "z.bin"]
    dest = tmp_path / "back"
    store.download_dir("ckpts/0001", dest)
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["a.pt", "manifest.json", "sub/b.pt", "z.bin"]
    assert (dest / "a.pt").read_bytes() == b"A" * 1000 and (dest / "sub/b.pt").read_bytes() == b"B"


def test_parquet_dir_unifies_schemas(store: Storage):
    assert store.read_parquet_dir("metrics") is None
    store.write_parquet("metrics/part-0002.parquet", pa.table({"step": [3], "loss": [0.5], "fid": [12.5]}))
    store.write_parquet("metrics/part-0001.parquet", pa.table({"step": [1, 2], "loss": [1.0, 0.7]}))
    store.write_bytes("metrics/notes.txt", b"ignored")
    store.write_parquet("metrics/nested/part-9.parquet", pa.table({"step": [99]}))  # not directly under
    t = store.read_parquet_dir("metrics")
    assert t is not None
    assert t.to_pydict() == {"step": [1, 2, 3], "loss": [1.0, 0.7, 0.5], "fid": [None, None, 12.5]}


def test_s3_objects_visible_to_boto3_and_ray(s3_bucket: S3Bucket):
    store = Storage(f"{s3_bucket.uri}/runs", endpoint_url=s3_bucket.endpoint_url, retry=FAST)
    run = store.child("exp1")
    assert run.uri == f"s3://{s3_bucket.name}/runs/exp1" and run.is_s3
    assert run.uri_of("m/x.bin") == f"s3://{s3_bucket.name}/runs/exp1/m/x.bin"
    assert run.path_of("m/x.bin") == f"{s3_bucket.name}/runs/exp1/m/x.bin"
    run.write_bytes("m/x.bin", b"hello")
    assert _get(s3_bucket, "runs/exp1/m/x.bin") == b"hello"
    assert _keys(s3_bucket) == ["runs/exp1/m/x.bin"]  # no directory-marker objects
    path, fs = run.ray_storage()
    assert path == f"{s3_bucket.name}/runs/exp1" and fs is not None
    with fs.open_input_stream(f"{path}/m/x.bin") as f:
        assert f.read() == b"hello"
    shipped = pickle.loads(pickle.dumps(run))  # Ray ships it to workers
    assert shipped.read_bytes("m/x.bin") == b"hello" and shipped.retry == FAST


def test_local_uri_forms(tmp_path: Path):
    store = Storage(f"file://{tmp_path}/r")
    assert store.uri == store.root == str(tmp_path / "r") and not store.is_s3
    assert store.ray_storage() == (str(tmp_path / "r"), None)
    assert store.child("a", "b").uri_of("c.json") == str(tmp_path / "r/a/b/c.json")
    store.check()
    assert (tmp_path / "r").is_dir()
    with pytest.raises(ValueError, match="under the root"):
        store.path_of("../escape")


def test_local_write_is_atomic(tmp_path: Path):
    store = Storage(str(tmp_path))
    versions = [bytes([i]) * (200_000 + 997 * i) for i in range(50)]
    store.write_bytes("f.bin", versions[0])
    seen: list[bytes] = []
    done = threading.Event()

    def writer() -> None:
        for v in versions[1:]:
            store.write_bytes("f.bin", v)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    while not done.is_set():
        seen.append(store.read_bytes("f.bin"))
    t.join()
    assert all(s in versions for s in seen) and len(seen) > 1
    assert store.read_bytes("f.bin") == versions[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no temp files left


def test_bad_input_is_named(s3_bucket: S3Bucket):
    with pytest.raises(ValueError, match="needs a bucket"):
        Storage("s3://")
    with pytest.raises(ValueError, match="unsupported scheme 'gs://'.*local path.*file://.*s3://"):
        Storage("gs://x/y")
    with pytest.raises(ValueError, match="storage.endpoint_url must start with http:// or https://"):
        Storage("s3://b", endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValueError, match="both access_key_id and secret_access_key"):
        Storage("s3://b", endpoint_url="http://127.0.0.1:9", access_key_id="k")
    missing = Storage("s3://no-such-bucket/p", endpoint_url=s3_bucket.endpoint_url, retry=FAST)
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket' does not exist.*s3 mb s3://no-such-bucket"):
        missing.check()
    start = time.monotonic()
    with pytest.raises(StorageError, match="NoSuchBucket|NO_SUCH_BUCKET"):  # permanent: no retries
        missing.write_bytes("x", b"1")
    assert time.monotonic() - start < 2
    refused = Storage("s3://b-b-b", endpoint_url="http://127.0.0.1:9",
                      retry=RetryPolicy(attempts=2, initial_backoff_s=0.1, connect_timeout_s=1))
    with pytest.raises(StorageError, match=r"object store http://127.0.0.1:9 \(bucket 'b-b-b'\): stat 'b-b-b' "
                                           r"failed 2 times over \d+ s: .*connect"):
        refused.check()


def test_from_config_with_secrets(s3_bucket: S3Bucket):
    cfg = StorageConfig(uri=f"{s3_bucket.uri}/cfg", endpoint_url=s3_bucket.endpoint_url, region="us-east-1",
                        access_key_id="testing", secret_access_key="testing", retry_attempts=2,
                        retry_max_backoff_s=1.5)
    store = Storage.from_config(cfg)
    assert store.retry == RetryPolicy(attempts=2, max_backoff_s=1.5)
    store.check()
    store.write_json("config.json", {"a": 1})
    assert _get(s3_bucket, "cfg/config.json") == b'{\n  "a": 1\n}'
    assert Storage.from_config(cfg, retry=FAST).retry == FAST


def test_outage_is_ridden_out(s3_bucket: S3Bucket, caplog):
    policy = RetryPolicy(attempts=8, initial_backoff_s=0.2, max_backoff_s=1, connect_timeout_s=1,
                         request_timeout_s=1)
    store = Storage(s3_bucket.uri, endpoint_url=s3_bucket.endpoint_url, retry=policy)
    store.write_bytes("before.bin", b"old")
    payload = bytes(range(256)) * 4000  # ~1 MB
    result: dict = {}

    def work() -> None:
        try:
            result["read"] = store.read_bytes("before.bin")  # HEAD/GET: times out after 1 s, retried
            store.write_bytes("runs/x/part-1.bin", payload)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    caplog.set_level(logging.WARNING, logger="sida.storage")
    s3_bucket.server.pause()
    try:
        t = threading.Thread(target=work)
        t.start()
        time.sleep(2.5)
    finally:
        s3_bucket.server.resume()
    t.join(30)
    assert not t.is_alive() and "error" not in result, result
    assert result["read"] == b"old"
    assert _get(s3_bucket, "runs/x/part-1.bin") == payload
    retries = [r.getMessage() for r in caplog.records if r.name == "sida.storage"]
    assert retries and "read 'before.bin' failed (attempt 1/8)" in retries[0]


def test_outage_read_gives_up_in_bounded_time(s3_bucket: S3Bucket):
    store = Storage(s3_bucket.uri, endpoint_url=s3_bucket.endpoint_url, retry=FAST)
    store.write_bytes("a/b.bin", b"x")
    store = pickle.loads(pickle.dumps(store))  # as on a Ray worker: still no hidden SDK-level retries
    s3_bucket.server.pause()
    start = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            store.read_bytes("a/b.bin")
    finally:
        s3_bucket.server.resume()
    assert time.monotonic() - start < 8  # 3 tries x 1 s timeout + backoff (~3.3 s); SDK retries would triple it
    msg = str(err.value)
    assert f"object store {s3_bucket.endpoint_url} (bucket '{s3_bucket.name}'): read 'a/b.bin' failed 3 times" in msg
    assert "\n" not in msg and "Timeout" in msg


def test_outage_write_gives_up_and_never_leaves_a_partial_object(s3_bucket: S3Bucket):
    # A stalled PUT with a body fails only ~6 s after request_timeout (curl measures its low-speed limit over
    # a ~5 s window that still holds the bytes it handed to the kernel), so 2 attempts keep this under 20 s.
    store = Storage(s3_bucket.uri, endpoint_url=s3_bucket.endpoint_url,
                    retry=RetryPolicy(attempts=2, initial_backoff_s=0.1, max_backoff_s=0.2,
                                      connect_timeout_s=1, request_timeout_s=1))
    payload = b"p" * 50_000
    s3_bucket.server.pause()
    start = time.monotonic()
    try:
        with pytest.raises(StorageError) as err:
            store.write_bytes("runs/x/metrics/part-1.parquet", payload)
    finally:
        s3_bucket.server.resume()
    assert time.monotonic() - start < 20
    assert (f"object store {s3_bucket.endpoint_url} (bucket '{s3_bucket.name}'): "
            "write 'runs/x/metrics/part-1.parquet' failed 2 times") in str(err.value)
    time.sleep(0.5)  # let the resumed server drain what was queued
    if "runs/x/metrics/part-1.parquet" in _keys(s3_bucket):
        assert _get(s3_bucket, "runs/x/metrics/part-1.parquet") == payload


def test_the_run_store_owns_best_and_end_states(tmp_path):
    """One definition of a run's best checkpoint (lowest finite live value, of one metric if asked) and its end."""
    from store.run_store import TERMINAL_STATES, RunState, RunStore

    store = RunStore(Storage(str(tmp_path)).child("r"))
    row = lambda name, value, kind="live", metric="fd_digits": {"checkpoint": name, "value": value, "kind": kind,  # noqa: E731
                                                                 "metric": metric}
    rows = [row("a", 3.0), row("b", float("nan")), row("c", 1.0, kind="eval"), row("d", 0.5, metric="fid_inception"),
            row("e", 2.0)]
    assert store.best_live_row(rows=rows)["checkpoint"] == "d"
    assert store.best_live_row("fd_digits", rows)["checkpoint"] == "e"
    assert store.best_live_row("fd_digits", [row("b", float("nan"))]) is None and store.best_live_row(rows=[]) is None
    assert store.best_live_row() is None  # nothing scored in storage yet
    assert TERMINAL_STATES == ("finished", "diverged", "stopped") and not RunState.FAILED.terminal
    assert store.state() is None
    store.record_end(RunState.DIVERGED, cur_nimg=2048, reason="non-finite loss")
    assert store.state() == "diverged" and store.read_status()["kimg"] == 2.048
    assert [(e["kind"], e["reason"]) for e in store.events()] == [("diverged", "non-finite loss")]


def test_a_restart_on_another_worker_count_is_a_resize_event(tmp_path):
    """RunStore.record_start: the first start is no resize; a restart on the same count neither; a restart on another
    count (elastic training, or --resume with other --workers) is, with the old and new counts and where it resumed."""
    from store.run_store import RunStore

    run = RunStore(Storage(str(tmp_path)).child("r"))
    run.record_start(cur_nimg=0, workers=2)
    run.record_start(cur_nimg=256, workers=2, checkpoint="ckpt-000000000256")
    run.record_start(cur_nimg=512, workers=1, checkpoint="ckpt-000000000512")
    run.record_start(cur_nimg=768, workers=2, checkpoint="ckpt-000000000768")
    events = run.events()
    assert [e["kind"] for e in events] == ["start", "resume", "resume", "resize", "resume", "resize"]
    assert [(e["old_workers"], e["new_workers"], e["kimg"]) for e in events if e["kind"] == "resize"] == [
        (2, 1, 0.512), (1, 2, 0.768)]
    assert run.last_workers() == 2
