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
    assert [n for n in ended.storage.listdir("leaderboard")] == [n for n in ended.storage.listdir("leaderboard")
                                                                 if n.startswith(COMPACTED_PREFIX)]
    assert len(training.storage.listdir("leaderboard")) == 2 * 3  # its scorers may still be writing: untouched
