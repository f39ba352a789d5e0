"""The layout of one run in storage (local folder or S3), shared by the driver, the workers and the scorers.

::

    RUN_URI/                      = storage.uri / run name (also Ray Train's experiment folder)
      config.json                 the resolved RunConfig (secrets masked), written once by the driver
      teacher/                    the frozen teacher f_phi as a sida checkpoint (so every node and every
                                  resume uses the same weights)
      ckpt-000000020480/          sida checkpoints (state.pt + manifest.json), registered with Ray Train
      metrics/part-<nimg>.parquet one file per reported row, keyed by images seen
      pinned/<ckpt name>/         copies of checkpoints kept for good (e.g. the best FID): Ray Train's
                                  keep-last-K rotation (CheckpointConfig.num_to_keep) never touches them
      pins/<ckpt name>.json       why each one was pinned
      leaderboard/<key>.parquet   one scored checkpoint per file (schemas.leaderboard.LeaderboardRow), key =
                                  checkpoint-metric-kind-seed: a retried or repeated score replaces its file
      leaderboard/compacted-*.parquet  the rows of an ended run folded into one part (compact_rows), so a
                                  reader fetches one object per run, not one per row; newer one-row files win
      leaderboard/.indexed/<path> the root indexes holding this run's rows (store/leaderboard_index.py): a row
                                  written here marks the run dirty in each
      scoring/skipped/<ckpt>.json checkpoints the scorers skipped (behind, deleted by rotation, failing), and why
      gallery/<ckpt>.png          each live-scored checkpoint's samples of seeds 0..metric.gallery-1 (same seeds
                                  for every checkpoint: compare them by eye), kept after rotation
      evaluate/teacher-<protocol>-<nfe>-<images>.json  ``sida evaluate --protocol-check``: the teacher's own Heun
                                  samples scored like the generator (one seed set), reused while its inputs hold
      status.json                 how the run ended: finished / diverged / stopped (with the reason)
      init_generator/             SiD²A: a verified copy of the generator checkpoint theta starts from
      lineage.json                SiD²A: where that copy came from (source run, checkpoint, URI, content hash)
      events/<time>-<kind>.json   the run's history: each start and resume of the workers, each resize (a restart
                                  on another number of workers: elastic scaling), and the end

Atomicity: every file is written whole (:class:`Storage` renames locally, single PUT on S3); a checkpoint
folder is committed by its ``manifest.json``, uploaded last, and verified by hash on every load, so a
half-uploaded checkpoint is never read back. Metric rows are keyed by ``cur_nimg``: a step re-run after a
restart from a checkpoint rewrites the same key, so rows are neither duplicated nor lost.
"""
from __future__ import annotations

import enum
import math
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Optional

import pyarrow as pa

from store.leaderboard_index import note_new_run, note_rows_written, table_rows
from store.storage import Storage
from sida_core import checkpoint as ckpt

METRIC_COLUMNS: dict[str, pa.DataType] = {
    "step": pa.int64(), "cur_nimg": pa.int64(), "kimg": pa.float64(), "stage": pa.string(),
    "loss_psi": pa.float64(), "loss_G": pa.float64(), "loss_sid": pa.float64(), "loss_adv_theta": pa.float64(),
    "loss_adv_psi": pa.float64(), "d_real": pa.float64(), "d_fake": pa.float64(), "psi_updated": pa.float64(),
    "G_updated": pa.float64(), "loss_distill": pa.float64(), "loss_r1": pa.float64(),  # the last two: ADD
    "images_per_s": pa.float64(), "num_workers": pa.int64(), "time": pa.float64(),
}
METRIC_SCHEMA = pa.schema(list(METRIC_COLUMNS.items()))
COMPACTED_PREFIX = "compacted-"  # leaderboard/compacted-<time ns>-<id>.parquet: a compaction's part (RunStore.compact_rows)


class RunState(str, enum.Enum):
    """How a run ended (``status.json``'s ``state``); a run without a status is still training (or was killed)."""

    FINISHED = "finished"  # reached total_kimg
    DIVERGED = "diverged"  # a non-finite loss or gradient (deterministic: resuming would diverge again)
    STOPPED = "stopped"    # ended early by a sweep's divergence stopper
    FAILED = "failed"      # its Tune trial failed after Ray's retries

    @property
    def terminal(self) -> bool:
        """A sweep does not run it again (a failed trial may be retried)."""
        return self is not RunState.FAILED


# Who trained in a run folder (its start events' ``host``): Ray Train workers, or ``sida distill`` in one process.
RAY_HOST, DISTILL_HOST = "ray", "distill"
RAY_TRAIN_MARKER = ".validate_storage_marker"  # written by Ray Train into its experiment folder (= the run folder)
TERMINAL_STATES = tuple(s.value for s in RunState if s.terminal)
TRAINING = "training"  # what views show for a run without status.json (still training, or killed without a word)


def shown_state(status: Optional[dict]) -> str:
    """A run's state for display from its ``status.json`` (None: none yet): the one rule every view uses."""
    return (status or {}).get("state") or TRAINING


def split_leaderboard(files) -> tuple[list[str], list[str]]:
    """(compacted parts, one-row files) among the names in ``leaderboard/``, each sorted (temporaries skipped)."""
    parts = sorted(n for n in files if n.startswith(COMPACTED_PREFIX) and n.endswith(".parquet"))
    loose = sorted(n for n in files if n.endswith(".parquet") and not n.startswith((COMPACTED_PREFIX, ".")))
    return parts, loose


class RunStore:
    """One run's folder in storage; see the module docstring for the layout."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @property
    def uri(self) -> str:
        return self.storage.uri

    @property
    def name(self) -> str:
        """The run's name: its folder's last path component."""
        return self.storage.uri.rstrip("/").rsplit("/", 1)[-1]

    # ----------------------------------------------------------------- config / status
    def write_config(self, config: dict) -> None:
        self.storage.write_json("config.json", config)

    def read_config(self) -> dict:
        try:
            return self.storage.read_json("config.json")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no config.json (not a sida run folder)") from None

    def exists(self) -> bool:
        return self.storage.exists("config.json")

    def write_status(self, state: str, **info) -> None:
        self.storage.write_json("status.json", {"state": state, "time": time.time(), **info})

    def record_start(self, *, cur_nimg: int, workers: int, checkpoint: Optional[str] = None,
                     host: str = RAY_HOST) -> None:
        """The event of a (re)start of training: from scratch, or resumed from ``checkpoint`` (SiD²A runs name the
        content hash of the generator theta started from); ``host``: ``ray`` (Ray Train workers) or ``distill``. A
        restart on another number of workers than the previous start (elastic training after a node was lost or came
        back, or a resume with other ``--workers``) is also a ``resize`` event: old and new worker counts, and where
        training picks up."""
        before = self.last_workers()
        lineage = self.lineage()
        self.log_event("resume" if checkpoint else "start", cur_nimg=cur_nimg, workers=workers, checkpoint=checkpoint,
                       init_generator_hash=lineage["content_hash"] if lineage else None, host=host)
        if before is not None and before != workers:
            self.log_event("resize", old_workers=before, new_workers=workers, cur_nimg=cur_nimg, kimg=cur_nimg / 1000,
                           checkpoint=checkpoint)

    def last_workers(self) -> Optional[int]:
        """The worker count of the newest start / resume event (None before the first)."""
        names = sorted(n for n in self.storage.listdir("events") if n.endswith(("-start.json", "-resume.json")))
        return self.storage.read_json(f"events/{names[-1]}").get("workers") if names else None

    def trained_by_distill(self) -> bool:
        """Whether ``sida distill`` (one process, no Ray) trained in this folder: a start event says so (events
        written before the host was recorded: a start event, but not the marker Ray Train leaves in its experiment
        folder)."""
        starts = [e for e in self.events() if e.get("kind") in ("start", "resume")]
        if any(e.get("host") == DISTILL_HOST for e in starts):
            return True
        return (bool(starts) and all("host" not in e for e in starts)
                and not self.storage.exists(RAY_TRAIN_MARKER))

    def prepare(self, config: dict, teacher: Optional[Path], *, init_generator: Optional[str] = None,
                lineage: Optional[dict] = None) -> None:
        """Make the folder a run: its teacher copy (``teacher``: a local checkpoint folder; None keeps the run's
        own), SiD²A's verified starting generator (``init_generator``: a local or ``s3://`` checkpoint,
        ``lineage``: extra provenance), then ``config.json`` (the secrets already masked). All hosts call this."""
        if teacher is not None:
            self.ensure_teacher(Path(teacher))
        if init_generator:
            self.ensure_init_generator(init_generator, lineage=lineage)
        self.write_config(config)
        note_new_run(self.storage)  # a root index holding an earlier run of this folder must not show its rows

    def state(self) -> Optional[str]:
        """``status.json``'s state (a :class:`RunState` value), or None while there is none."""
        status = self.read_status()
        return status.get("state") if status else None

    def record_end(self, state: RunState | str, *, cur_nimg: Optional[int], **info) -> None:
        """How the run ended (a :class:`RunState`: finished, diverged / stopped / failed with its ``reason``), by any
        host (the training loop, a sweep's stopper, a failed Tune trial): ``status.json`` and the event, written
        with the state's plain value (an f-string of the enum would say ``RunState.FINISHED``). ``cur_nimg``: where
        it ended, if known."""
        state = RunState(state).value
        self.write_status(state, kimg=None if cur_nimg is None else cur_nimg / 1000, **info)
        self.log_event(state, cur_nimg=cur_nimg, **info)

    def read_status(self) -> Optional[dict]:
        try:
            return self.storage.read_json("status.json")
        except FileNotFoundError:
            return None

    def log_event(self, kind: str, **info) -> None:
        """Append one event (start, resume, resize, diverged, finished) to the run's history: one object each, never
        rewritten."""
        self.storage.write_json(f"events/{time.time_ns():020d}-{kind}.json", {"kind": kind, "time": time.time(), **info})

    def events(self) -> list[dict]:
        return [self.storage.read_json(f"events/{n}") for n in self.storage.listdir("events") if n.endswith(".json")]

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, row: dict) -> None:
        """Write one metrics row as its own Parquet file, keyed (and so idempotent) by ``cur_nimg``."""
        values = {k: [row.get(k)] for k in METRIC_COLUMNS}
        self.storage.write_parquet(f"metrics/part-{int(row['cur_nimg']):012d}.parquet",
                                   pa.table(values, schema=METRIC_SCHEMA))

    def metric_parts(self) -> list[str]:
        """The names of the metric row files, one per reported ``cur_nimg`` (read one with :meth:`read_metric_part`)."""
        return sorted(n for n in self.storage.listdir("metrics") if n.endswith(".parquet"))

    def read_metric_part(self, name: str) -> dict:
        return self._read_one(f"metrics/{name}")

    def _read_one(self, rel: str) -> dict:
        return self.storage.read_parquet(rel).to_pylist()[0]

    def read_metrics(self) -> Optional[pa.Table]:
        """All metric rows so far, ordered by ``cur_nimg`` (None before the first report)."""
        table = self.storage.read_parquet_dir("metrics")
        return None if table is None else table.sort_by("cur_nimg")

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_names(self) -> list[str]:
        """Checkpoint folder names, oldest first (by images seen)."""
        matches = [m for m in map(ckpt.NAME_RE.match, self.storage.listdir()) if m]
        return [m.group(0) for m in sorted(matches, key=lambda m: int(m.group(1)))]

    def rotate_checkpoints(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` checkpoints (what Ray Train's ``num_to_keep`` does for ``sida train``;
        the single-process host calls this). Pinned copies live under ``pinned/`` and stay. Returns what went."""
        old = self.checkpoint_names()[:-keep] if keep > 0 else []
        for name in old:
            self.storage.delete(name)
        return old

    def upload_checkpoint(self, local_dir: Path, name: str) -> None:
        """Upload a local checkpoint folder, ``manifest.json`` last: until it lands the folder never verifies."""
        self.storage.upload_dir(local_dir, name, last=[ckpt.MANIFEST_FILE])

    def fetch_checkpoint(self, name: str, scratch: Path) -> Path:
        """A verified local copy of checkpoint ``name`` (the folder itself for local storage); raises CheckpointError."""
        if not self.storage.is_s3:
            path = Path(self.storage.path_of(name))
        else:
            path = Path(scratch) / name
            try:
                self.storage.download_dir(name, path)
            except FileNotFoundError:
                raise ckpt.CheckpointError(f"{self.storage.uri_of(name)}: checkpoint not found") from None
        ckpt.verify_checkpoint(path)
        return path

    def load_checkpoint(self, name: str, map_location="cpu") -> tuple[dict, dict]:
        with tempfile.TemporaryDirectory(prefix="sida-ckpt-") as scratch:
            path = self.fetch_checkpoint(name, Path(scratch))
            return ckpt.load_checkpoint(path, map_location=map_location)

    def load_latest_valid(self, map_location="cpu", prefer: Optional[str] = None) -> Optional[tuple[dict, dict, str]]:
        """(state, manifest, name) of the newest checkpoint that verifies; corrupt ones are skipped with a warning.
        None when no checkpoint was ever committed; :class:`CheckpointError` when some were and none verifies.

        ``prefer``: a name to try first (Ray Train's latest registered checkpoint).
        """
        names = self.checkpoint_names()[::-1]
        if prefer in names:
            names.remove(prefer)
            names.insert(0, prefer)
        first_error = None
        for name in names:
            try:
                state, manifest = self.load_checkpoint(name, map_location)
                return state, manifest, name
            except ckpt.CheckpointError as exc:
                first_error = first_error or f"{name}: {exc}"
                warnings.warn(f"skipping checkpoint {self.storage.uri_of(name)}: {exc}", RuntimeWarning, stacklevel=2)
        # Folders without a manifest were never committed (an upload cut short): starting at 0 is right. Committed
        # ones that all fail verification are damage: starting again from 0 kimg over them would hide it.
        committed = [n for n in names if self.storage.exists(f"{n}/manifest.json")]
        if committed:
            raise ckpt.CheckpointError(
                f"run {self.uri}: none of its {len(committed)} committed checkpoint(s) verifies ({first_error}); "
                f"not starting again from 0 kimg over them: restore or remove the damaged folders")
        return None

    def pin(self, name: str, reason: str, local_copy: Optional[Path] = None) -> None:
        """Keep checkpoint ``name`` for good: copy it to ``pinned/NAME`` (outside Ray Train's keep-last-K
        rotation), then record why in ``pins/NAME.json``. ``local_copy``: an already verified local copy."""
        with tempfile.TemporaryDirectory(prefix="sida-pin-") as scratch:
            src = Path(local_copy) if local_copy is not None else self.fetch_checkpoint(name, Path(scratch))
            ckpt.verify_checkpoint(src)
            self.upload_checkpoint(src, f"pinned/{name}")
        self.storage.write_json(f"pins/{name}.json", {"checkpoint": f"pinned/{name}", "reason": reason, "time": time.time()})

    def pin_best(self, row: dict, previous: Optional[dict] = None) -> None:
        """Pin the checkpoint of leaderboard ``row`` as the run's best so far; release ``previous``'s pin (the
        former best's row) if it names another checkpoint."""
        self.pin(row["checkpoint"], reason=f"best {row['metric']} {row['value']:.4f} at {row['kimg']:.1f} kimg")
        if previous is not None and previous["checkpoint"] != row["checkpoint"]:
            self.unpin(previous["checkpoint"])

    def pinned(self) -> list[str]:
        """Names of the pinned checkpoints (stored under ``pinned/``)."""
        return sorted(n.removesuffix(".json") for n in self.storage.listdir("pins") if n.endswith(".json"))

    def unpin(self, name: str) -> None:
        """Release a pin: the record first (so a crash leaves an orphan copy, never a dangling record)."""
        self.storage.delete(f"pins/{name}.json")
        self.storage.delete(f"pinned/{name}")

    def checkpoint_ref(self, name: str) -> str:
        """Where checkpoint ``name`` is read from: its pinned copy if there is one (rotation never deletes it)."""
        return f"pinned/{name}" if self.storage.exists(f"pins/{name}.json") else name

    # ----------------------------------------------------------------- leaderboard
    def write_row(self, row, *, notify_index: bool = True) -> None:
        """Write one :class:`LeaderboardRow` as its own Parquet file (atomic; same key -> same file), then mark the
        run dirty in any root index holding it (one listing; ``notify_index=False`` only where no index can exist
        yet, e.g. a benchmark filling a fresh bucket)."""
        from schemas.leaderboard import parquet_schema

        schema = parquet_schema()
        data = row.model_dump()
        self.storage.write_parquet(f"leaderboard/{row.key()}.parquet",
                                   pa.table({k: [data[k]] for k in schema.names}, schema=schema))
        if notify_index:
            note_rows_written(self.storage)  # after the row: see store/leaderboard_index.py for why this order

    def _leaderboard(self, files: Optional[dict[str, tuple[int, int]]] = None) -> dict[str, dict]:
        """{row key: row}: the one reader of ``leaderboard/``. Compacted parts are read oldest first, then the
        one-row files, each replacing what came before under its key: a part written by a compaction holds
        every row its writer saw, and a one-row file is either one of those (a compaction cut short before
        its deletes) or newer (re-scored since). So every row appears once, whatever point a compaction reached."""
        from schemas.leaderboard import row_key

        for _attempt in range(5):
            files = self.storage.files("leaderboard") if files is None else files
            parts, loose = split_leaderboard(files)
            try:
                tables = [self.storage.read_parquet(f"leaderboard/{name}") for name in parts + loose]
                break
            except FileNotFoundError:  # a compaction ran since the listing: its new part holds the row, list again
                files = None
        else:
            raise RuntimeError(f"{self.uri}: leaderboard/ kept changing while being read (5 listings)")
        if not tables:
            return {}
        rows: dict[str, dict] = {}
        for r in table_rows(pa.concat_tables(tables, promote_options="permissive")):
            rows[row_key(r["checkpoint"], r["metric"], r["kind"], r["seed"])] = r
        return rows

    def row_keys(self) -> set[str]:
        files = self.storage.files("leaderboard")
        parts, loose = split_leaderboard(files)
        if not parts:  # the common case during training: no reads
            return {n.removesuffix(".parquet") for n in loose}
        return set(self._leaderboard(files))

    def read_row(self, key: str) -> dict:
        """One leaderboard row by its key (:meth:`row_keys`)."""
        try:
            return self._read_one(f"leaderboard/{key}.parquet")
        except FileNotFoundError:
            row = self._leaderboard().get(key)
            if row is None:
                raise FileNotFoundError(f"{self.uri}: no leaderboard row {key}") from None
            return row

    def read_rows(self, files: Optional[dict[str, tuple[int, int]]] = None) -> list[dict]:
        """Every leaderboard row of this run (live and final), oldest checkpoint first; ``files``: a listing of
        ``leaderboard/`` to read from (default: list it now)."""
        return sorted(self._leaderboard(files).values(), key=lambda r: (r["cur_nimg"], r["kind"], r["seed"]))

    def compact_rows(self) -> dict:
        """Fold the one-row files and earlier parts of ``leaderboard/`` into one Parquet part, so readers fetch
        one object per run instead of one per row. Safe at any point of interruption and idempotent (see
        :meth:`_leaderboard`): the new part is written whole first, then the parts it supersedes are deleted,
        then the one-row files it holds, each only if unchanged since it was read (a row re-scored meanwhile
        stays, and wins). Returns {"rows", "files_removed", "parts_removed", "part"} ("part" None: nothing to do)."""
        from schemas.leaderboard import parquet_schema

        files = self.storage.files("leaderboard")
        parts, loose = split_leaderboard(files)
        if not loose and len(parts) <= 1:
            return {"rows": None, "files_removed": 0, "parts_removed": 0, "part": None}
        rows = sorted(self._leaderboard(files).values(), key=lambda r: (r["cur_nimg"], r["metric"], r["kind"], r["seed"]))
        schema = parquet_schema()
        part = f"{COMPACTED_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        self.storage.write_parquet(f"leaderboard/{part}", pa.table(
            {k: [r.get(k) for r in rows] for k in schema.names}, schema=schema))
        self.storage.delete_files([f"leaderboard/{n}" for n in parts])
        now = self.storage.files("leaderboard")
        unchanged = [n for n in loose if now.get(n) == files[n]]
        self.storage.delete_files([f"leaderboard/{n}" for n in unchanged])
        return {"rows": len(rows), "files_removed": len(unchanged), "parts_removed": len(parts), "part": part}

    def compact_at_end(self, log) -> None:
        """Compact the rows of a run that just ended (its scorers drained): a failure only costs read speed, so
        it is reported in one line and the run's result stands."""
        try:
            out = self.compact_rows()
        except (OSError, RuntimeError) as exc:  # StorageError is a RuntimeError
            log(f"warning: leaderboard rows of {self.uri} left uncompacted ({' '.join(str(exc).split())}); "
                "`sida leaderboard --compact` retries")
            return
        if out["part"] is not None:
            log(f"leaderboard: {out['rows']} row(s) compacted into leaderboard/{out['part']}")

    def best_live_row(self, metric: Optional[str] = None, rows: Optional[list[dict]] = None) -> Optional[dict]:
        """The run's best checkpoint so far: its live leaderboard row of best finite value in ``metric`` (default: the
        run's ranking metric, ``metric.name`` of its config; a run scoring several metrics writes a row for each), or
        None. ``rows``: the run's rows if already read. The one definition of "best" everything uses."""
        from schemas.leaderboard import rank_value

        rows = self.read_rows() if rows is None else rows
        if metric is None and len({r["metric"] for r in rows}) > 1:
            metric = self.ranking_metric()
        live = [r for r in rows
                if r["kind"] == "live" and (metric is None or r["metric"] == metric) and math.isfinite(r["value"])]
        return min(live, key=lambda r: rank_value(r["metric"], r["value"]), default=None)

    def ranking_metric(self) -> Optional[str]:
        """``metric.name`` of the run's config (the metric that ranks its checkpoints), or None without one."""
        try:
            return ((self.read_config().get("metric") or {}).get("name")) or None
        except FileNotFoundError:
            return None

    def write_gallery(self, name: str, png: bytes) -> None:
        """Checkpoint ``name``'s fixed-seed sample grid (``gallery/NAME.png``, written by its live scorer; kept when
        the checkpoint itself is rotated away)."""
        self.storage.write_bytes(self.gallery_ref(name), png)

    @staticmethod
    def gallery_ref(name: str) -> str:
        return f"gallery/{name}.png"

    def has_gallery(self, name: str) -> bool:
        return self.storage.exists(self.gallery_ref(name))

    def record_skip(self, name: str, reason: str) -> None:
        self.storage.write_json(f"scoring/skipped/{name}.json", {"checkpoint": name, "reason": reason, "time": time.time()})

    def skipped(self) -> dict[str, str]:
        """{checkpoint name: reason} of the checkpoints the scorers skipped."""
        names = [n for n in self.storage.listdir("scoring/skipped") if n.endswith(".json")]
        return {n.removesuffix(".json"): self.storage.read_json(f"scoring/skipped/{n}")["reason"] for n in names}

    def live_scores(self, metric: str, seed: int, seen: Optional[dict[str, tuple[float, float]]] = None
                    ) -> dict[str, tuple[float, float]]:
        """{row key: (kimg, value)} of the live scores of ``metric``/``seed``; ``seen`` (a previous answer) is
        reused, so a poll costs one listing plus the new rows."""
        out = dict(seen or {})
        suffix = f"-{metric}-live-s{seed}"
        for key in sorted(self.row_keys() - set(out)):
            if key.endswith(suffix):
                try:
                    row = self.read_row(key)
                except FileNotFoundError:
                    continue
                out[key] = (float(row["kimg"]), float(row["value"]))
        return out

    # ----------------------------------------------------------------- teacher
    def ensure_teacher(self, local_teacher: Path) -> None:
        """Copy the teacher into the run unless a verified copy is there already (a resumed run keeps its own)."""
        with tempfile.TemporaryDirectory(prefix="sida-teacher-") as scratch:
            try:
                self.fetch_checkpoint("teacher", Path(scratch))
                return
            except ckpt.CheckpointError:
                pass
        self.storage.delete("teacher")
        self.upload_checkpoint(Path(local_teacher), "teacher")

    @staticmethod
    def teacher_score_ref(protocol: str, nfe: int, num_images: int) -> str:
        """Where ``sida evaluate --protocol-check`` keeps the teacher's scores for one protocol, NFE and image count."""
        return f"evaluate/teacher-{protocol}-{int(nfe)}-{int(num_images)}.json"

    def read_teacher_score(self, ref: str) -> Optional[dict]:
        """The stored teacher scores at ``ref`` (:meth:`teacher_score_ref`), or None if absent or unreadable (then
        they are computed again and the file replaced)."""
        try:
            out = self.storage.read_json(ref)
        except (FileNotFoundError, ValueError):  # (StoredFileError: damaged JSON)
            return None
        return out if isinstance(out, dict) else None

    def write_teacher_score(self, ref: str, result: dict) -> None:
        self.storage.write_json(ref, result)

    # ----------------------------------------------------------------- SiD²A: the generator theta starts from
    def ensure_init_generator(self, source_uri: str, *, endpoint_url: Optional[str] = None,
                              lineage: Optional[dict] = None) -> dict:
        """Copy the checkpoint at ``source_uri`` (a local folder or ``s3://`` URI) into ``init_generator/``,
        verified, and record ``lineage.json`` (source URI, content hash, plus ``lineage``). A run that already
        holds a verified copy of the same content keeps it. Returns the lineage record."""
        src = Storage(source_uri, endpoint_url=endpoint_url or self.storage.endpoint_url)
        known = self.lineage()
        with tempfile.TemporaryDirectory(prefix="sida-init-") as scratch:
            if known is not None and known.get("uri") == src.uri:  # resumed: keep the copy if it still verifies
                try:
                    have = self.fetch_checkpoint("init_generator", Path(scratch) / "have")
                    if ckpt.verify_checkpoint(have)["content_hash"] == known["content_hash"]:
                        return known
                except ckpt.CheckpointError:
                    pass
            if src.is_s3:
                local = Path(scratch) / "src"
                src.download_dir("", local)
                if not (local / ckpt.MANIFEST_FILE).exists():
                    raise ckpt.CheckpointError(f"{src.uri}: no checkpoint there (no {ckpt.MANIFEST_FILE})")
            else:
                local = Path(src.root)
            manifest = ckpt.verify_checkpoint(local)
            record = {"uri": src.uri, "content_hash": manifest["content_hash"], "kimg": manifest.get("kimg"),
                      "cur_nimg": manifest.get("cur_nimg"), **(lineage or {})}
            try:
                have = self.fetch_checkpoint("init_generator", Path(scratch) / "have")
                same = ckpt.verify_checkpoint(have)["content_hash"] == manifest["content_hash"]
            except ckpt.CheckpointError:
                same = False
            if not same:
                self.storage.delete("init_generator")
                self.upload_checkpoint(local, "init_generator")
        self.storage.write_json("lineage.json", record)
        return record

    def lineage(self) -> Optional[dict]:
        try:
            return self.storage.read_json("lineage.json")
        except FileNotFoundError:
            return None
