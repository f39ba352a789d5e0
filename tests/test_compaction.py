"""Leaderboard compaction (RunStore.compact_rows, `sida leaderboard --compact`): every row exactly once, before,
after, and at every point where a compaction can be cut short; on a local folder and on a real S3-API server."""
from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from schemas.leaderboard import LeaderboardRow
from store.run_store import COMPACTED_PREFIX, RunState, RunStore
from store.storage import Storage


def make_row(store: RunStore, k: int, seed: int, value: float, kind: str = "live") -> LeaderboardRow:
    ck = f"ckpt-{k * 1000:012d}"
    return LeaderboardRow(
        run=store.name, run_uri=store.uri, config_summary="t", method="sida", alpha=1.2, lambda_sid=100.0,
        lambda_adv_theta=0.01, lambda_adv_psi=1.0, lr_theta=1e-4, lr_psi=1e-4, checkpoint=ck,
        checkpoint_uri=store.storage.uri_of(ck), checkpoint_hash="h", kimg=float(k), cur_nimg=k * 1000,
        metric="fd_digits", value=value, num_images=100, seed=seed, kind=kind, reference="r", extractor_id="x",
        time=1.0)


def fill(store: RunStore, checkpoints: int = 4, seeds: int = 3) -> dict[str, float]:
    store.write_config({"name": store.name})
    want = {}
    for k in range(1, checkpoints + 1):
        for s in range(seeds):
            row = make_row(store, k, s, value=10.0 / k + s)
            store.write_row(row)
            want[row.key()] = row.value
    return want


def seen(store: RunStore) -> dict[str, float]:
    rows = store.read_rows()
    keys = [f"{r['checkpoint']}-{r['metric']}-{r['kind']}-s{r['seed']}" for r in rows]
    assert len(keys) == len(set(keys)), "a row appears twice"
    return dict(zip(keys, (r["value"] for r in rows)))


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(Storage(str(tmp_path / "root")).child("run"))
    bucket = request.getfixturevalue("s3_bucket")
    return RunStore(Storage(bucket.uri, endpoint_url=bucket.endpoint_url).child("run"))


def test_compaction_keeps_every_row_once_in_one_part_and_is_idempotent(store):
    want = fill(store)
    assert seen(store) == want
    out = store.compact_rows()
    assert out["rows"] == len(want) and out["files_removed"] == len(want) and out["part"].startswith(COMPACTED_PREFIX)
    assert store.storage.listdir("leaderboard") == [out["part"]]  # one object per run now
    assert seen(store) == want and store.row_keys() == set(want)
    assert store.read_row(next(iter(want)))["value"] == want[next(iter(want))]  # by key, from the part
    assert store.compact_rows()["part"] is None  # nothing to do the second time
    assert store.storage.listdir("leaderboard") == [out["part"]]

    # a row scored after the compaction (a new seed) and one re-scored (same key): both read, the new value wins
    late, again = make_row(store, 9, 0, 0.5), make_row(store, 1, 0, 42.0)
    store.write_row(late)
    store.write_row(again)
    want |= {late.key(): 0.5, again.key(): 42.0}
    assert seen(store) == want
    out2 = store.compact_rows()
    assert out2["parts_removed"] == 1 and store.storage.listdir("leaderboard") == [out2["part"]]
    assert seen(store) == want


@pytest.mark.parametrize("cut", ["after the part", "after the old parts", "halfway through the row files"])
def test_a_compaction_cut_short_anywhere_leaves_every_row_once(cut, tmp_path, monkeypatch):
    store = RunStore(Storage(str(tmp_path / "root")).child("run"))
    want = fill(store)
    store.compact_rows()  # an earlier part, so the second compaction has a part to supersede as well
    for seed in range(4):  # rows scored after the first compaction
        extra = make_row(store, 7, seed, 3.0 + seed)
        store.write_row(extra)
        want[extra.key()] = extra.value
    real = Storage.delete_files
    calls = []

    def crash(self, rels):  # the process dies at the chosen point of the second compaction
        calls.append(list(rels))
        stage = len(calls)
        if cut == "after the part" and stage == 1:
            raise KeyboardInterrupt
        if cut == "after the old parts" and stage == 2:
            raise KeyboardInterrupt
        if cut == "halfway through the row files" and stage == 2:
            real(self, list(rels)[: len(rels) // 2 or 1])
            raise KeyboardInterrupt
        return real(self, rels)

    monkeypatch.setattr(Storage, "delete_files", crash)
    with pytest.raises(KeyboardInterrupt):
        store.compact_rows()
    monkeypatch.setattr(Storage, "delete_files", real)
    assert seen(store) == want  # readable, every row once, whatever was left behind
    assert store.compact_rows()["part"] is not None  # the next compaction finishes the job
    assert seen(store) == want and len(store.storage.listdir("leaderboard")) == 1


def test_a_row_rewritten_while_compacting_is_kept_and_wins(tmp_path, monkeypatch):
    """A scorer (or `sida evaluate`) replacing a row between the compaction's read and its deletes: the newer file
    is not deleted, and it is what readers see."""
    store = RunStore(Storage(str(tmp_path / "root")).child("run"))
    want = fill(store, checkpoints=2, seeds=1)
    real = Storage.write_parquet
    newer = make_row(store, 1, 0, 99.0)

    def write_then_race(self, rel, table):
        real(self, rel, table)
        if rel.startswith(f"leaderboard/{COMPACTED_PREFIX}"):
            store.write_row(newer)

    monkeypatch.setattr(Storage, "write_parquet", write_then_race)
    out = store.compact_rows()
    monkeypatch.setattr(Storage, "write_parquet", real)
    assert out["files_removed"] == len(want) - 1 and f"{newer.key()}.parquet" in store.storage.listdir("leaderboard")
    assert seen(store) == want | {newer.key(): 99.0}


def test_cli_compact_touches_ended_runs_only_and_shows_the_same_table(s3_bucket, capsys):
    ep = ["--endpoint-url", s3_bucket.endpoint_url]
    root = Storage(s3_bucket.uri, endpoint_url=s3_bucket.endpoint_url)
    ended, training = RunStore(root.child("sweep", "a")), RunStore(root.child("sweep", "b"))
    fill(ended)
    fill(training, checkpoints=2)
    ended.record_end(RunState.FINISHED, cur_nimg=4000)
    assert main(["leaderboard", s3_bucket.uri, "--json", *ep]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["leaderboard", s3_bucket.uri, "--compact", "--json", *ep]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == before and len(before) == 4 * 3 + 2 * 3
    assert "compacted 1 of 2 run(s)" in cap.err and "1 still training" in cap.err
    rows_there = [n for n in ended.storage.listdir("leaderboard") if not n.startswith(".")]
    assert len(rows_there) == 1 and rows_there[0].startswith(COMPACTED_PREFIX)
    assert len(training.storage.listdir("leaderboard")) == 2 * 3  # its scorers may still be writing: untouched


# ----------------------------------------------------------------- the root index (store/leaderboard_index.py)
def _root(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(bucket.uri, endpoint_url=bucket.endpoint_url)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return _root(request, tmp_path)


def _ended(root: Storage, *path: str, checkpoints: int = 3) -> RunStore:
    store = RunStore(root.child(*path))
    fill(store, checkpoints=checkpoints, seeds=2)
    store.record_end(RunState.FINISHED, cur_nimg=checkpoints * 1000)
    return store


def _table(root: Storage) -> dict[tuple, float]:
    from pipelines.leaderboard import collect_rows

    rows = collect_rows(root.uri, root.endpoint_url)
    keys = [(r["run_uri"], r["checkpoint"], r["kind"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), "a row appears twice"
    return dict(zip(keys, (r["value"] for r in rows)))


class _Reads:
    """Which runs a read of the root probed (config.json) and read (leaderboard/) itself."""

    def __init__(self, monkeypatch):
        self.probed: list[str] = []
        self.read: list[str] = []
        exists, read_rows = RunStore.exists, RunStore.read_rows

        def spy_exists(store):
            self.probed.append(store.name)
            return exists(store)

        def spy_read(store, *a, **k):
            self.read.append(store.name)
            return read_rows(store, *a, **k)
        monkeypatch.setattr(RunStore, "exists", spy_exists)
        monkeypatch.setattr(RunStore, "read_rows", spy_read)


def test_after_compact_a_read_uses_the_root_index_and_shows_the_same_rows(root, monkeypatch):
    """Ended runs (two levels deep too) are neither probed nor read after --compact; a run still training is."""
    from pipelines.leaderboard import compact

    for name in ("a", "b"):
        _ended(root, name)
    _ended(root, "sweep", "t0")
    training = RunStore(root.child("sweep", "t1"))
    fill(training, checkpoints=2, seeds=1)
    before = _table(root)
    out = compact(root.uri, root.endpoint_url, log=lambda _m: None)
    assert out["indexed"] == 3 and root.exists(".leaderboard/index.parquet")
    reads = _Reads(monkeypatch)
    assert _table(root) == before
    assert sorted(reads.read) == ["t1"] and "a" not in reads.probed and "t0" not in reads.probed

    # a row written since (a re-score of an indexed run, a `sida evaluate` final row) marks the run dirty: shown
    t0 = RunStore(root.child("sweep", "t0"))
    t0.write_row(make_row(t0, 1, 0, value=-5.0))
    t0.write_row(make_row(t0, 3, 7, value=0.5, kind="final"))
    assert root.files(".leaderboard/dirty") != {}
    reads.read.clear()
    now = _table(root)
    assert sorted(reads.read) == ["t0", "t1"]
    assert now[(t0.uri, "ckpt-000000001000", "live", 0)] == -5.0
    assert now[(t0.uri, "ckpt-000000003000", "final", 7)] == 0.5 and len(now) == len(before) + 1
    # the next --compact indexes it again and clears the mark
    compact(root.uri, root.endpoint_url, log=lambda _m: None)
    assert root.files(".leaderboard/dirty") == {}
    reads.read.clear()
    assert _table(root) == now and sorted(reads.read) == ["t1"]


def test_runs_deleted_or_started_afresh_after_indexing_never_show_their_old_rows(root):
    from pipelines.leaderboard import compact

    a, b = _ended(root, "a"), _ended(root, "b")
    compact(root.uri, root.endpoint_url, log=lambda _m: None)
    # b deleted, a deleted and trained afresh under the same name (its markers went with its files)
    root.delete("b")
    root.delete("a")
    fresh = RunStore(root.child("a"))
    fresh.prepare({"name": "a"}, teacher=None)
    assert _table(root) == {}
    fresh.write_row(make_row(fresh, 1, 0, value=42.0))
    assert _table(root) == {(a.uri, "ckpt-000000001000", "live", 0): 42.0}
    assert b.uri not in {k[0] for k in _table(root)}


def test_a_row_written_while_the_index_is_built_is_never_lost(tmp_path, monkeypatch):
    """The race the marker order closes: a scorer writes a row after --compact listed the run's rows (so the index
    misses it): the writer finds the run's .indexed marker, written before that listing, and marks it dirty."""
    from pipelines.leaderboard import compact

    root = Storage(str(tmp_path / "root"))
    run = _ended(root, "a")
    read_rows = RunStore.read_rows
    late = make_row(run, 9, 0, value=1.5)

    def read_then_score(store, files=None):
        rows = read_rows(store, files)
        if files is not None:  # the index build's read: the scorer lands right after it
            store.write_row(late)
        return rows
    monkeypatch.setattr(RunStore, "read_rows", read_then_score)
    compact(root.uri, log=lambda _m: None)
    monkeypatch.setattr(RunStore, "read_rows", read_rows)
    assert _table(root)[(run.uri, late.checkpoint, "live", 0)] == 1.5


def test_the_cli_reads_a_large_compacted_root_in_a_few_requests(s3_bucket, capsys, monkeypatch):
    """Requests counted at the storage layer: after --compact, `sida leaderboard ROOT` costs O(1) requests however
    many runs there are (the listings of .leaderboard/, its dirty/ and ROOT, the index, the probe of ROOT itself),
    not ~3 per run."""
    ep = ["--endpoint-url", s3_bucket.endpoint_url]
    root = Storage(s3_bucket.uri, endpoint_url=s3_bucket.endpoint_url)
    for i in range(12):
        _ended(root, f"run-{i:02d}", checkpoints=1)
    assert main(["leaderboard", s3_bucket.uri, "--by", "run", "--json", *ep]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["leaderboard", s3_bucket.uri, "--compact", "--top", "1", *ep]) == 0
    capsys.readouterr()
    calls: list[str] = []
    for name in ("_info", "_walk", "read_bytes"):
        real = getattr(Storage, name)

        def counted(self, *a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(Storage, name, counted)
    assert main(["leaderboard", s3_bucket.uri, "--by", "run", "--json", *ep]) == 0
    assert json.loads(capsys.readouterr().out) == before and len(before) == 12
    assert len(calls) <= 5, calls  # .leaderboard/, dirty/, the index, ROOT/config.json, ROOT/


def test_a_run_under_folders_it_may_not_read_still_starts(tmp_path, monkeypatch):
    """`prepare` looks for root indexes up to MAX_DEPTH folders above the run; where the identity may not read there
    (a prefix-scoped S3 policy answers AccessDenied) that is no index, not a failed start."""
    from store.storage import StorageError

    run = RunStore(Storage(str(tmp_path / "team" / "runs")).child("r"))
    exists = Storage.exists

    def scoped(self, rel=""):
        if not self.root.startswith(str(tmp_path / "team" / "runs")):
            raise StorageError(f"{self.root}: AccessDenied")
        return exists(self, rel)
    monkeypatch.setattr(Storage, "exists", scoped)
    run.prepare({"name": "r"}, teacher=None)
    assert run.read_config() == {"name": "r"}
