"""A root-level index of compacted leaderboards: ``sida leaderboard ROOT`` in a handful of requests, not ~3 per run.

Even compacted, reading a root of N runs costs a probe of each run's ``config.json``, a listing of its
``leaderboard/`` and a read of its part: 3N requests (500 runs: ~11 s against one moto_server on 2 cores, where a
request costs ~9 ms of the server's CPU). ``sida leaderboard ROOT --compact`` therefore also writes::

    ROOT/.leaderboard/index.parquet        the rows of every ended, compacted run below ROOT; its schema metadata
                                           names those runs (paths relative to ROOT)
    ROOT/.leaderboard/dirty/<quoted path>  an indexed run that changed since (new or re-scored rows, a fresh start):
                                           readers read that run itself until the next --compact
    RUN/leaderboard/.indexed/<quoted path> in each indexed run, written BEFORE its rows are read for the index:
                                           the run's path below the root whose index holds it

A reader lists ``ROOT/.leaderboard/`` (one request), reads the index (one), lists the folders that hold runs (one
per folder, not per run; an indexed run needs no ``config.json`` probe) and reads only the runs not indexed or
dirty. Why a row is never missed: :meth:`RunStore.write_row` writes the row, THEN lists its run's
``leaderboard/.indexed/`` and marks itself dirty in each root found; the compaction writes the ``.indexed`` marker,
THEN lists the run's rows. With read-after-write consistency (local folders; S3 since 2020) either the writer sees
the marker or the compaction sees the row. A run created afresh in a folder an index covers (its old files deleted,
markers included) marks itself dirty in every index up to :data:`MAX_DEPTH` folders above it
(:func:`note_new_run`). Runs deleted since the index was written are not shown: runs are found by listing.
Limits: two ``--compact`` of one root at the same time may leave the later-written index missing rows the other
saw; run one at a time (a second one repairs it).
"""
from __future__ import annotations

import json
import time
from typing import Optional
from urllib.parse import quote, unquote

import pyarrow as pa

from store.storage import Storage

MAX_DEPTH = 3  # runs are found up to this many folders below a root (and indexes up to this many above a run)
INDEX_DIR = ".leaderboard"
INDEX_FILE = f"{INDEX_DIR}/index.parquet"
DIRTY_DIR = f"{INDEX_DIR}/dirty"
MARKER_DIR = "leaderboard/.indexed"
_META_KEY = b"sida.leaderboard_index"
VERSION = 1


def table_rows(table: pa.Table) -> list[dict]:
    """The rows of a table as dicts (column by column: ~30% faster than ``Table.to_pylist`` on 100k rows)."""
    names = table.column_names
    return [dict(zip(names, values)) for values in zip(*(column.to_pylist() for column in table.columns))]


def _name(rel: str) -> str:
    """A run's path below a root as one file name (``sweep/trial-0`` -> ``sweep%2Ftrial-0``; ``""``: the root itself)."""
    return quote(rel, safe="") or "%2E"


def _rel(name: str) -> str:
    return "" if name == "%2E" else unquote(name)


def mark_indexed(run: Storage, rel: str) -> None:
    """Tell the run's row writers that the index at ``rel``'s root holds it (before its rows are read for it)."""
    run.write_json(f"{MARKER_DIR}/{_name(rel)}", {"root_levels": len(rel.split("/")) if rel else 0})


def _mark_dirty(run: Storage, rel: str) -> None:
    root = run.ancestor(len(rel.split("/")) if rel else 0)
    if root is not None:
        root.write_json(f"{DIRTY_DIR}/{_name(rel)}", {"run": rel, "time": time.time()})


def note_rows_written(run: Storage) -> None:
    """After a row was written to ``run``: mark the run dirty in every index that holds it (one listing when none)."""
    for name in run.files(MARKER_DIR):
        _mark_dirty(run, _rel(name))


def note_new_run(run: Storage) -> None:
    """A run (re)created in ``run``: mark it dirty in any index up to MAX_DEPTH folders above (a folder deleted and
    trained afresh under its old name lost its ``.indexed`` markers with its files)."""
    parts = run.root.split("/")
    for levels in range(MAX_DEPTH + 1):
        root = run.ancestor(levels)
        try:
            indexed = root is not None and root.exists(INDEX_FILE)
        except (OSError, RuntimeError):  # a folder above the run this identity may not read (a prefix-scoped S3
            continue                     # policy): no index of ours can be there either
        if indexed:
            _mark_dirty(run, "/".join(parts[len(parts) - levels:]))


class RootIndex:
    """What ``ROOT/.leaderboard/`` says: the rows of the runs indexed (by path below ROOT) and which are dirty."""

    def __init__(self, rows: dict[str, list[dict]], dirty: set[str], dirty_files: list[str]):
        self.rows = rows
        self.dirty = dirty
        self.dirty_files = dirty_files

    def fresh(self, rel: str) -> Optional[list[dict]]:
        """The indexed rows of run ``rel``, or None when the index does not hold it or it changed since."""
        return None if rel in self.dirty else self.rows.get(rel)

    @property
    def runs(self) -> set[str]:
        return set(self.rows)


def read_index(root: Storage) -> Optional[RootIndex]:
    """The index at ``root`` (one listing of ``.leaderboard/`` plus one read), or None without one."""
    if "index.parquet" not in root.files(INDEX_DIR):  # the common case: one listing, nothing there
        return None
    dirty_files = sorted(root.files(DIRTY_DIR))
    try:
        table = root.read_parquet(INDEX_FILE)
    except FileNotFoundError:  # removed since the listing
        return None
    meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    if meta.get("version") != VERSION:
        return None  # written by another version: read the runs themselves
    rows: dict[str, list[dict]] = {rel: [] for rel in meta.get("runs", [])}
    if "_run_rel" in table.column_names:
        rels = table.column("_run_rel").to_pylist()
        for rel, r in zip(rels, table_rows(table.drop_columns(["_run_rel"]))):
            rows.setdefault(rel, []).append(r)
    return RootIndex(rows, {_rel(n) for n in dirty_files}, dirty_files)


def write_index(root: Storage, runs: dict[str, list[dict]], *, dirty_before: list[str]) -> None:
    """Write the index of ``runs`` ({path below root: rows}) at ``root`` in one PUT, then remove the dirty marks
    ``dirty_before`` (listed before any run was read for this index: each run they mark was read again since)."""
    from schemas.leaderboard import parquet_schema

    schema = parquet_schema().append(pa.field("_run_rel", pa.string(), nullable=False))
    flat = [(rel, r) for rel, rows in sorted(runs.items()) for r in rows]
    table = pa.table({k: [(rel if k == "_run_rel" else r.get(k)) for rel, r in flat] for k in schema.names},
                     schema=schema)
    meta = {"version": VERSION, "runs": sorted(runs), "written": time.time()}
    root.write_parquet(INDEX_FILE, table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()}))
    root.delete_files([f"{DIRTY_DIR}/{n}" for n in dirty_before])
