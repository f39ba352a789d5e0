"""One storage interface for checkpoints, Parquet metrics, configs and leaderboards: a local folder, or
``s3://bucket/prefix`` on any S3-API store (AWS, MinIO, Ceph RGW, R2) through ``pyarrow.fs``. No Ray here.

Atomicity: a local write goes to a temp file in the same folder, is fsynced, then ``os.replace``d over the
target; an S3 write is one PUT (pyarrow's ``allow_delayed_open``; above pyarrow's part size it becomes a
multipart upload, which S3 also publishes only on completion), so readers see the old object or the new one,
never a part. A directory is committed by uploading its marker file(s) (``upload_dir(last=...)``) after
everything else.

Retries: every S3 operation runs through ``Storage._retry``: transient errors (network ``OSError``s,
timeouts, 5xx) are retried with capped exponential backoff and jitter; missing paths, permission/credential
errors and a missing bucket fail at once. Local operations get one attempt (disk errors do not heal by
waiting). Exhausted or permanent failures raise ``StorageError``; a missing file raises ``FileNotFoundError``.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("sida.storage")
T = TypeVar("T")
_PERMANENT = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# pyarrow reports every S3 failure as a plain OSError; these AWS error codes will not heal by retrying.
_PERMANENT_AWS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "NO_SUCH_BUCKET")
_CHUNK = 8 << 20


def _tmp_name(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


class StorageURIError(ValueError):
    """A storage URI or endpoint that cannot be used (unknown scheme, no bucket); the message names it."""


class StorageError(RuntimeError):
    """A storage operation failed for good: names the store, the operation and path, attempts, last error."""


class StoredFileError(ValueError):
    """A stored file that is there but cannot be read as what it must be (e.g. a truncated JSON file); the message
    names the file and the fault."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # total tries per operation
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0  # exponential backoff with jitter, capped
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0  # curl's stall detector: a stalled upload fails ~6 s later than this


class Storage:
    """A root (local folder or S3 prefix) plus the filesystem that reaches it; all paths are relative."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 retry: RetryPolicy = RetryPolicy()):
        self.retry = retry
        self._fs_kw: dict[str, Any] = {}  # S3FileSystem arguments besides the retry policy's
        self._keys: dict[str, str] = {}  # explicit credentials: this process's fs only, never pickled
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme not in ("", "file", "s3"):
            raise StorageURIError(f"storage.uri: unsupported scheme {scheme + '://'!r} in {uri!r}; "
                             "use a local path, file:///PATH or s3://BUCKET/PREFIX")
        self.is_s3 = scheme == "s3"
        if not self.is_s3:
            path = urlparse(uri).path if scheme == "file" else uri
            self.root = self.uri = os.path.abspath(os.path.expanduser(path))
            self.endpoint_url: str | None = None
            self.fs = self._make_fs()
            return
        bucket, _, prefix = uri[len("s3://"):].strip("/").partition("/")
        if not bucket:
            raise StorageURIError(f"storage.uri: s3:// URI needs a bucket name (s3://BUCKET/PREFIX), got {uri!r}")
        self.root = "/".join(p for p in (bucket, prefix.strip("/")) if p)
        self.uri = "s3://" + self.root
        self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        kw = self._fs_kw
        if self.endpoint_url:
            if not self.endpoint_url.startswith(("http://", "https://")):
                raise StorageURIError("storage.endpoint_url must start with http:// or https://, "
                                 f"got {self.endpoint_url!r}")
            ep = urlparse(self.endpoint_url)
            kw.update(endpoint_override=ep.netloc, scheme=ep.scheme)
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region or self.endpoint_url:
            kw["region"] = region or "us-east-1"
        if bool(access_key_id) != bool(secret_access_key):
            raise ValueError("storage: give both access_key_id and secret_access_key, or neither (then the "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables are used)")
        if access_key_id:
            self._keys = {"access_key": access_key_id, "secret_key": str(secret_access_key)}
        self.fs = self._make_fs()

    def _make_fs(self, sdk_attempts: int = 1, with_keys: bool = True) -> pafs.FileSystem:
        """sdk_attempts=1: no retries inside the AWS SDK, ``_retry`` does them (and counts them right).
        ``with_keys=False``: the default credential chain (environment, profile, instance role) even when keys
        were given, for a filesystem that is pickled (an S3FileSystem pickles its explicit keys in clear)."""
        if not self.is_s3:
            return pafs.LocalFileSystem()
        return pafs.S3FileSystem(
            connect_timeout=self.retry.connect_timeout_s, request_timeout=self.retry.request_timeout_s,
            allow_delayed_open=True,  # small writes become one PutObject instead of a 3-call multipart upload
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts), **self._fs_kw,
            **(self._keys if with_keys else {}))

    # pickling (Ray ships Storage to workers and scorers; Tune pickles its RunConfig into tuner.pkl in storage):
    # S3FileSystem pickles drop the retry strategy, so rebuild the fs; explicit keys never travel (the receiving
    # process uses its own environment, which a local Ray inherits from the driver: ray_jobs.cluster)
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("fs", "_keys")}

    def __copy__(self) -> Storage:  # in this process: the same filesystem and keys (child())
        new = object.__new__(Storage)
        new.__dict__.update(self.__dict__)
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._keys = {}
        self.fs = self._make_fs()

    @classmethod
    def from_config(cls, storage_cfg: Any, retry: RetryPolicy | None = None) -> Storage:
        """Build from a ``StorageConfig``-like object (secrets may be pydantic ``SecretStr``)."""
        def secret(name: str) -> str | None:
            v: Any = getattr(storage_cfg, name, None)
            return v.get_secret_value() if hasattr(v, "get_secret_value") else v

        if retry is None:
            fields = {"attempts": "retry_attempts", "max_backoff_s": "retry_max_backoff_s",
                      "connect_timeout_s": "connect_timeout_s", "request_timeout_s": "request_timeout_s"}
            retry = RetryPolicy(**{k: getattr(storage_cfg, f) for k, f in fields.items()
                                   if getattr(storage_cfg, f, None) is not None})
        return cls(storage_cfg.uri, endpoint_url=getattr(storage_cfg, "endpoint_url", None),
                   region=getattr(storage_cfg, "region", None), access_key_id=secret("access_key_id"),
                   secret_access_key=secret("secret_access_key"), retry=retry)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path_of(self, rel: str = "") -> str:
        parts = [p for p in str(rel).replace(os.sep, "/").split("/") if p and p != "."]
        if ".." in parts:
            raise ValueError(f"storage path must stay under the root, got {rel!r}")
        return "/".join([self.root, *parts])

    def uri_of(self, rel: str = "") -> str:
        return ("s3://" if self.is_s3 else "") + self.path_of(rel)

    def child(self, *parts: str) -> Storage:
        new = copy.copy(self)  # shares the filesystem and settings
        new.root = self.path_of("/".join(parts))
        new.uri = self.uri_of("/".join(parts))
        return new

    def ancestor(self, levels: int) -> Storage | None:
        """The storage ``levels`` folders above this one (same filesystem and credentials, as :meth:`child`), or
        None above the bucket (S3) or the filesystem root."""
        parts = self.root.split("/")
        keep = len(parts) - levels
        if levels < 0 or keep < 1:
            return None
        new = copy.copy(self)
        new.root = "/".join(parts[:keep]) or "/"
        new.uri = ("s3://" if self.is_s3 else "") + new.root
        return new

    def ray_storage(self) -> tuple[str, pafs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig`` (no ``s3://`` with a filesystem).
        Ray's own I/O bypasses ``_retry``, so this filesystem lets the AWS SDK retry (in the driver; the
        pickled copies Ray sends to workers fall back to the SDK default of 3 attempts). Without explicit keys:
        Ray and Tune pickle it (Tune into ``tuner.pkl`` in storage)."""
        return self.root, (self._make_fs(sdk_attempts=self.retry.attempts, with_keys=False) if self.is_s3 else None)

    def _where(self) -> str:
        if not self.is_s3:
            return f"local folder {self.root}"
        return f"object store {self.endpoint_url or 'AWS S3'} (bucket {self.root.split('/')[0]!r})"

    def _key(self, path: str) -> str:
        return path.split("/", 1)[1] if self.is_s3 and "/" in path else path

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        attempts = max(1, self.retry.attempts) if self.is_s3 else 1
        start = time.monotonic()
        for i in range(1, attempts + 1):
            try:
                return fn()
            except _PERMANENT:
                raise
            except OSError as e:  # includes ConnectionError, TimeoutError and pyarrow's S3 errors
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                if i == attempts or any(code in first for code in _PERMANENT_AWS):
                    raise StorageError(f"{self._where()}: {what} failed {i} time{'s' * (i > 1)} over "
                                       f"{time.monotonic() - start:.0f} s: {first}") from e
                delay = min(self.retry.max_backoff_s, self.retry.initial_backoff_s * 2 ** (i - 1))
                delay *= random.uniform(0.5, 1.0)
                log.warning("%s: %s failed (attempt %d/%d), retrying in %.1f s: %s",
                            self._where(), what, i, attempts, delay, first)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _write_stream(self, rel: str, fill: Callable[[Any], None]) -> None:
        path = self.path_of(rel)

        def s3() -> None:
            with self.fs.open_output_stream(path) as out:
                fill(out)

        def local() -> None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = _tmp_name(path)  # same folder, so os.replace is a rename; "xb" keeps the umask's mode
            try:
                with open(tmp, "xb") as out:
                    fill(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        self._retry(f"write {self._key(path)!r}", s3 if self.is_s3 else local)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._write_stream(rel, lambda out: out.write(data))

    def upload_file(self, local_path: str | os.PathLike, rel: str) -> None:
        def fill(out: Any) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)
        self._write_stream(rel, fill)

    def read_bytes(self, rel: str) -> bytes:
        path = self.path_of(rel)

        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        return self._retry(f"read {self._key(path)!r}", read)

    def download_file(self, rel: str, local_path: str | os.PathLike) -> None:
        path, dest = self.path_of(rel), Path(local_path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(_tmp_name(str(dest)))

        def fetch() -> None:
            with self.fs.open_input_stream(path) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            os.replace(tmp, dest)
        try:
            self._retry(f"read {self._key(path)!r}", fetch)
        finally:
            tmp.unlink(missing_ok=True)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2).encode())

    def read_json(self, rel: str) -> Any:
        """The JSON file ``rel``; :class:`StoredFileError` (naming it) when it is not valid JSON (truncated, damaged)."""
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoredFileError(f"{self.uri_of(rel)}: not valid JSON ({exc}); the file is damaged or "
                                  "truncated") from None

    def _info(self, path: str) -> pafs.FileInfo:  # type NotFound when missing
        return self._retry(f"stat {self._key(path)!r}", lambda: self.fs.get_file_info(path))

    def _walk(self, path: str, recursive: bool) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        try:
            return self._retry(f"list {self._key(path)!r}", lambda: self.fs.get_file_info(sel))
        except NotADirectoryError:  # a file (S3 just lists nothing)
            return []

    def exists(self, rel: str) -> bool:
        return self._info(self.path_of(rel)).type != pafs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        return sorted(i.base_name for i in self._walk(self.path_of(rel), recursive=False))

    def delete(self, rel: str) -> None:
        path = self.path_of(rel)

        def rm() -> None:
            kind = self.fs.get_file_info(path).type
            try:
                if kind == pafs.FileType.Directory:
                    self.fs.delete_dir(path)
                elif kind != pafs.FileType.NotFound:
                    self.fs.delete_file(path)
            except FileNotFoundError:
                pass  # deleted meanwhile: fine
        self._retry(f"delete {self._key(path)!r}", rm)

    def files(self, rel: str = "") -> dict[str, tuple[int, int]]:
        """{name: (size, mtime in ns)} of the plain files directly under ``rel`` (one listing)."""
        return {i.base_name: (i.size or 0, i.mtime_ns or 0) for i in self._walk(self.path_of(rel), recursive=False)
                if i.type == pafs.FileType.File}

    def delete_files(self, rels: Sequence[str]) -> None:
        """Delete many files (missing ones are fine): on S3 in batches of 1,000 keys per request
        (DeleteObjects), not one request each; locally one unlink each."""
        if not self.is_s3:
            for rel in rels:
                Path(self.path_of(rel)).unlink(missing_ok=True)  # local: one attempt (see _retry)
            return
        import boto3

        bucket = self.root.split("/")[0]
        keys = {"aws_access_key_id": self._keys["access_key"], "aws_secret_access_key": self._keys["secret_key"]} \
            if self._keys else {}
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self._fs_kw.get("region"), **keys,
                              config=Config(connect_timeout=self.retry.connect_timeout_s,
                                            read_timeout=self.retry.request_timeout_s,
                                            retries={"max_attempts": 1}))  # _retry does the retries
        paths = [self._key(self.path_of(rel)) for rel in rels]
        for i in range(0, len(paths), 1000):
            batch = paths[i:i + 1000]

            def rm(batch: list[str] = batch) -> None:
                try:
                    out = client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch],
                                                                       "Quiet": True})
                except Exception as e:  # botocore's errors are not OSErrors: transient unless AWS says otherwise
                    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                    if code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                        raise StorageError(f"{self._where()}: delete objects failed: {code}") from e
                    raise OSError(f"{type(e).__name__}: {e}") from e
                if out.get("Errors"):
                    err = out["Errors"][0]
                    raise OSError(f"{err.get('Code')}: {err.get('Message')} ({err.get('Key')})")
            self._retry(f"delete {len(batch)} objects under {self._key(self.path_of(''))!r}", rm)

    def read_parquet(self, rel: str) -> pa.Table:
        # ParquetFile, not pq.read_table: the same table from one file, without importing pyarrow.dataset (~1 s)
        return pq.ParquetFile(pa.BufferReader(self.read_bytes(rel))).read()

    def upload_dir(self, local_dir: str | os.PathLike, rel: str, *, last: Sequence[str] = ()) -> None:
        """Upload every file under ``local_dir`` to ``rel/``; ``last`` (paths relative to ``local_dir``,
        e.g. ``["manifest.json"]``) go after all others, in the given order, as the commit marker."""
        base = Path(local_dir)
        if not base.is_dir():
            raise NotADirectoryError(f"upload_dir: {base} is not a folder")
        files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        tail = [f for f in last if f in files]
        for name in [f for f in files if f not in tail] + tail:
            self.upload_file(base / name, f"{rel}/{name}")

    def download_dir(self, rel: str, local_dir: str | os.PathLike) -> None:
        path = self.path_of(rel)
        for info in self._walk(path, recursive=True):
            if info.type == pafs.FileType.File:
                sub = info.path[len(path) + 1:]
                self.download_file(f"{rel}/{sub}", Path(local_dir) / sub)

    def write_parquet(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet_dir(self, rel: str) -> pa.Table | None:
        """All ``*.parquet`` files directly under ``rel``, by name, concatenated; missing columns are nulls."""
        names = sorted(i.base_name for i in self._walk(self.path_of(rel), recursive=False)
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet"))
        tables = [self.read_parquet(f"{rel}/{n}") for n in names]
        return pa.concat_tables(tables, promote_options="permissive") if tables else None

    def check(self) -> None:
        """Fail fast with a clear message when the store is unreachable or the bucket is missing."""
        if not self.is_s3:
            self._retry(f"create {self.root!r}", lambda: os.makedirs(self.root, exist_ok=True))
            return
        bucket = self.root.split("/")[0]
        if self._info(bucket).type == pafs.FileType.NotFound:
            ep = f" --endpoint-url {self.endpoint_url}" if self.endpoint_url else ""
            raise StorageError(f"{self._where()}: bucket {bucket!r} does not exist; create it first, "
                               f"e.g. `aws{ep} s3 mb s3://{bucket}`")
