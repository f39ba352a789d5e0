"""One writer per run: ``RUN/lease.json`` names the process that writes the run (issue 18 item 2).

``sida train`` (new or ``--resume``), ``sida distill`` and every sweep trial take the lease before they write
anything, renew it (a heartbeat every ``ttl_s / 3``) while they run and release it at the end. A second process
is refused while the holder lives; a lease whose heartbeat is older than ``ttl_s`` (or whose holder was a
process of this host that no longer exists) is stale and taken over with a warning, and the new holder then
removes what a crashed writer left behind (:func:`clean_leftovers`).

Taking it: read the lease and refuse a live holder; then, in a local folder without a lease, create it
exclusively (a hard link, which fails if the name exists); otherwise (S3, whose client in pyarrow has no
conditional PUT, or a stale lease taken over) compare-and-check: write ours with a random token, wait
``settle_s``, read it back. Only the process whose token is there goes on. Both stores are read-after-write
consistent, so two processes that both found no lease both read back the last of the two writes, as long as
each one's read-then-write takes less than ``settle_s`` (milliseconds, against a default of one second).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from store.storage import Storage

LEASE_FILE = "lease.json"
TTL_S = 60.0       # a holder silent this long is dead
SETTLE_S = 1.0     # compare-and-check: wait this long before reading our write back


class LeaseError(RuntimeError):
    """The run is being written by another live process (or it took the lease at the same moment); one line."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class RunLease:
    """The lease of the run folder ``storage``; use as a context manager or call :meth:`acquire` / :meth:`release`."""

    def __init__(self, storage: Storage, *, ttl_s: float = TTL_S, settle_s: float = SETTLE_S,
                 log: Callable[[str], None] = lambda s: None, token: Optional[str] = None):
        """``token``: this holder's identity in the lease (default: a fresh random one); a caller that can tell
        when this holder has ended (a sweep driver, of its trials) gives one so that it can clear the lease
        afterwards (:func:`remove_dead_lease`)."""
        self.storage, self.ttl_s, self.settle_s, self.log = storage, ttl_s, settle_s, log
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), token or uuid.uuid4().hex
        self.lost: Optional[str] = None  # why the lease was lost while held (another process took it)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0

    @property
    def owner(self) -> str:
        return f"{self.host}:{self.pid}"

    def holder(self) -> Optional[dict]:
        """The lease in storage (None if there is none; an unreadable one counts as stale)."""
        try:
            lease = self.storage.read_json(LEASE_FILE)
        except FileNotFoundError:
            return None
        except ValueError:
            return {"owner": "an unreadable lease.json", "heartbeat": 0.0}
        return lease if isinstance(lease, dict) else {"owner": "an unreadable lease.json", "heartbeat": 0.0}

    def is_live(self, lease: dict, now: Optional[float] = None) -> bool:
        age = (now or time.time()) - float(lease.get("heartbeat") or 0.0)
        if age > float(lease.get("ttl_s") or self.ttl_s):
            return False
        if lease.get("host") == self.host and isinstance(lease.get("pid"), int):
            return _pid_alive(lease["pid"])  # a crashed holder on this host is stale at once
        return True

    def _record(self) -> dict:
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "token": self.token,
                "started": self._started, "heartbeat": time.time(), "ttl_s": self.ttl_s}

    def _write(self) -> None:
        self.storage.write_json(LEASE_FILE, self._record())

    def _create_local(self) -> bool:
        """A local folder's first lease, created whole and exclusively (a hard link fails if the name exists):
        no settle time needed. False if another process created it first."""
        import json

        os.makedirs(self.storage.root, exist_ok=True)
        path = os.path.join(self.storage.root, LEASE_FILE)
        tmp = os.path.join(self.storage.root, f".{LEASE_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(self._record(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def acquire(self, *, steal: bool = False, wait_s: float = 0.0) -> RunLease:
        """Take the lease, or raise :class:`LeaseError` naming the live holder. ``steal``: take it even from a live
        holder (after making sure it is dead); ``wait_s``: wait up to this long for a live holder to go stale
        (a sweep trial resumed right after its sweep's driver was killed on another node)."""
        deadline = time.monotonic() + wait_s
        while True:
            cur = self.holder()
            live = cur is not None and self.is_live(cur)
            if not live or steal or time.monotonic() >= deadline:
                break
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        if cur is not None and live and not steal:
            age = time.time() - float(cur.get("heartbeat") or 0.0)
            since = _iso(float(cur["started"])) if cur.get("started") else "?"
            raise LeaseError(f"run {self.storage.uri} is being written by {cur.get('owner')} since {since} (last "
                             f"heartbeat {age:.0f} s ago); wait for it to end, or pass --steal-lease once it is dead")
        if cur is not None:
            how = "live" if live else "stale"
            self.log(f"warning: run {self.storage.uri}: taking over the {how} lease of {cur.get('owner')} (last "
                     f"heartbeat {time.time() - float(cur.get('heartbeat') or 0.0):.0f} s ago)")
        self._started = time.time()
        if cur is None and not self.storage.is_s3:
            self._create_local()  # exclusive; if another process won, the check below names it
        else:
            self._write()
            time.sleep(self.settle_s)
        back = self.holder()
        if not back or back.get("token") != self.token:
            raise LeaseError(f"run {self.storage.uri}: {(back or {}).get('owner', 'another process')} took the lease "
                             "at the same moment and writes it; wait for it to end")
        removed = clean_leftovers(self.storage)
        if removed:
            self.log(f"run {self.storage.uri}: removed what a crashed writer left: {', '.join(removed)}")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sida-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                cur = self.holder()
                if cur is not None and cur.get("token") != self.token:
                    self.lost = f"lease of {self.storage.uri} taken by {cur.get('owner')}"
                    self.log(f"error: {self.lost}; this process no longer owns the run")
                    return
                self._write()
            except Exception as exc:  # a store outage: retried at the next beat; the lease stays ours until ttl
                self.log(f"warning: lease heartbeat of {self.storage.uri} failed: {' '.join(str(exc).split())[:200]}")

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
            try:
                cur = self.holder()
                if cur is not None and cur.get("token") == self.token:
                    self.storage.delete(LEASE_FILE)
                    if not self.storage.is_s3 and os.path.isdir(self.storage.root) and not os.listdir(self.storage.root):
                        os.rmdir(self.storage.root)  # a run that failed before its first write leaves no folder
            except Exception as exc:  # the lease then goes stale by itself
                self.log(f"warning: could not release the lease of {self.storage.uri}: {exc}")

    def __enter__(self) -> RunLease:
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_dead_lease(storage: Storage, *, token: Optional[str] = None) -> Optional[dict]:
    """Delete the lease of the run folder ``storage`` if its holder is known to have ended: it holds ``token``
    (the caller knows that holder is gone, e.g. a sweep's trial after Tune ended it: a trial Tune stops runs no
    ``finally`` to release it) or it is not live (:meth:`RunLease.is_live`). Returns the removed lease, or None."""
    probe = RunLease(storage)
    cur = probe.holder()
    ours = token is not None and cur is not None and cur.get("token") == token
    if cur is None or (not ours and probe.is_live(cur)):
        return None
    again = probe.holder()  # once more, just before deleting: a new writer may have taken it over meanwhile
    if again is None or again.get("token") != cur.get("token"):
        return None
    storage.delete(LEASE_FILE)
    return cur


# hidden siblings of an interrupted write: Storage's ".NAME.<hex8>.tmp" files, save_checkpoint's ".NAME.tmp-<hex8>"
# folders, and ".NAME.old-<hex8>": the previous version of a checkpoint renamed aside just before the swap
_TMP = re.compile(r"^\.(?P<name>.+)\.(?:[0-9a-f]{8}\.tmp|tmp-[0-9a-f]{8})$")
_OLD = re.compile(r"^\.(?P<name>.+)\.old-[0-9a-f]{8}$")


def clean_leftovers(storage: Storage) -> list[str]:
    """Remove the temporary files and folders a hard crash left in a local run folder (S3 writes are single
    PUTs: nothing is left there); a checkpoint renamed aside whose replacement never arrived is put back.
    Only the lease holder calls this, so no live writer owns them. Returns the paths (relative) it changed."""
    if storage.is_s3 or not os.path.isdir(storage.root):
        return []
    root, changed = Path(storage.root), []
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        for name in list(dirnames) + filenames:
            path = Path(dirpath) / name
            if m := _OLD.match(name):
                target = path.with_name(m["name"])
                if target.exists():
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                else:
                    os.rename(path, target)
            elif _TMP.match(name) and not name.startswith(f".{LEASE_FILE}."):  # (a racing taker's lease)
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            else:
                continue
            changed.append(str(path.relative_to(root)))
            if name in dirnames:
                dirnames.remove(name)
    return sorted(changed)
