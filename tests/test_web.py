"""``sida leaderboard --serve`` on real run folders, over HTTP and in headless Chromium (Debian's package,
driven by Playwright): the table shows what storage holds, a score written while the page is open appears
after the next refresh, a diverged run shows its reason, galleries load, the curves are drawn by Plotly.

The runs: one tiny `sida distill --score` run (3 checkpoints, each scored and given a gallery, the best pinned)
and a copy of it that is then recorded as diverged. Without /usr/bin/chromium the browser test SKIPs (.ci/run
installs it); the HTTP tests run anyway.
"""
from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipelines.web import LeaderboardServer
from store.run_store import RunState, RunStore
from store.storage import Storage
from tests.recipes import CONFIG, TINY_DISTILL

CHROMIUM = Path("/usr/bin/chromium")
REASON = "loss_psi blew up: 3.1e+12 > loss_factor 1e4 x its first value"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from pipelines.distill import run_distill, run_store_of
    from schemas.loader import load_run_config

    root = tmp_path_factory.mktemp("web") / "runs"
    cfg = load_run_config(CONFIG, TINY_DISTILL + ["total_kimg=0.192", "metric.num_images=400",
                                                  "metric.batch_size=200", "metric.gallery=16"])
    run_distill(cfg, run_store_of(cfg, str(root / "good")), progress=False, log=lambda m: None, score=True)
    shutil.copytree(root / "good", root / "bad")
    RunStore(Storage(str(root / "bad"))).record_end(RunState.DIVERGED.value, cur_nimg=192, reason=REASON)
    return root


@pytest.fixture()
def server(root):
    srv = LeaderboardServer(str(root), refresh_s=0.3)
    ready, stop = threading.Event(), threading.Event()
    urls: list[str] = []
    thread = threading.Thread(target=srv.run, kwargs=dict(host="127.0.0.1", port=0, stop=stop,
                                                          on_ready=lambda u: (urls.append(u), ready.set())))
    thread.start()
    assert ready.wait(30), "the server did not start"
    yield srv, urls[0]
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def test_json_endpoint_holds_what_storage_holds_and_galleries_are_served(server, root):
    srv, url = server
    status, ctype, body = get(url + "api/leaderboard")
    assert status == 200 and ctype.startswith("application/json")
    data = json.loads(body)
    runs = {r["run"]: r for r in data["runs"]}
    assert sorted(runs) == ["bad", "good"] and data["ended"] == 2
    good = RunStore(Storage(str(root / "good")))
    rows = sorted((r for r in good.read_rows() if r["kind"] == "live"), key=lambda r: r["cur_nimg"])
    assert [(p["checkpoint"], p["value"]) for p in runs["good"]["rows"]] == [(r["checkpoint"], r["value"]) for r in rows]
    best = min(rows, key=lambda r: r["value"])
    assert runs["good"]["best"]["checkpoint"] == best["checkpoint"] and runs["good"]["state"] == "finished"
    assert [p["checkpoint"] for p in runs["good"]["rows"] if p["pinned"]] == good.pinned() == [best["checkpoint"]]
    assert runs["bad"]["state"] == "diverged" and runs["bad"]["reason"] == REASON
    events = good.storage.listdir("events")  # named by the state's value (not "RunState.FINISHED")
    assert [n.split("-", 1)[1] for n in events] == ["start.json", "finished.json"], events
    assert runs["good"]["gallery_best"] == best["checkpoint"] and runs["good"]["gallery_newest"] == rows[-1]["checkpoint"]

    status, ctype, png = get(f"{url}gallery/{runs['good']['id']}/{best['checkpoint']}.png")
    assert status == 200 and ctype == "image/png" and png == good.storage.read_bytes(good.gallery_ref(best["checkpoint"]))
    assert get(f"{url}gallery/{runs['good']['id']}/ckpt-000000999999.png")[0] == 404  # no such gallery
    assert get(f"{url}gallery/99/{best['checkpoint']}.png")[0] == 404  # no such run
    assert get(url + "gallery/0/..%2Fconfig.json")[0] == 404  # nothing but listed galleries reaches storage
    status, ctype, js = get(url + "static/plotly.min.js")
    assert status == 200 and "javascript" in ctype and len(js) > 1_000_000
    status, ctype, html = get(url)
    assert status == 200 and ctype.startswith("text/html") and b"/api/leaderboard" in html


def test_empty_folder_serves_a_page_that_says_so(tmp_path):
    srv = LeaderboardServer(str(tmp_path), refresh_s=1)
    assert srv.data["runs"] == [] and "no sida run found" in srv.data["message"]


def test_page_in_headless_chromium_shows_runs_reasons_galleries_and_a_new_score(server, root, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    from ray_jobs.scoring import CheckpointScorer

    srv, url = server
    good = RunStore(Storage(str(root / "good")))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(url)
            page.wait_for_function("Number(document.body.dataset.loaded || 0) >= 1", timeout=20_000)
            text = page.inner_text("#runs tbody")
            assert "good" in text and "finished" in text and "diverged: " + REASON in text
            page.click("#runs tbody tr:has-text('finished')")  # select the good run (the two tie on score)
            page.wait_for_function("document.getElementById('selected-title').textContent === 'run good'")
            n_rows = page.locator("#ckpts tbody tr").count()
            assert n_rows == len([r for r in good.read_rows() if r["kind"] == "live"]) and "★ pinned" in page.inner_text("#ckpts")
            page.wait_for_function("document.getElementById('g-best').complete && "
                                   "document.getElementById('g-best').naturalWidth > 0", timeout=10_000)
            assert page.locator("#curves .main-svg").count() >= 1  # Plotly drew the curves
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 20_000

            # a new live score (another seed) while the page is open: it appears after the next refresh
            last = good.checkpoint_names()[-1]
            row = CheckpointScorer().score(good.storage, last, seed=7)
            page.wait_for_function(f"document.querySelector('#ckpts tbody').innerText.includes('{row['value']:.4f}')",
                                   timeout=20_000)
            assert page.locator("#ckpts tbody tr").count() == n_rows + 1
        finally:
            browser.close()


def test_page_benchmark_runs_small():
    import subprocess
    import sys

    root_dir = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "benchmarks/leaderboard_page.py", "--runs", "3", "--checkpoints", "4"],
                       cwd=root_dir, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["rows"] == 12 and out["runs_shown"] == 3 and out["snapshot_s"] > 0 and out["api_s"] > 0
    assert (out["first_paint_s"] is not None) == CHROMIUM.is_file()


def test_a_storage_read_that_fails_keeps_the_last_snapshot_with_a_message(tmp_path):
    from store.run_store import RunStore as Store

    good = Store(Storage(str(tmp_path / "runs" / "r1")))
    good.write_config({"name": "r1", "method": "sida", "loss": {"alpha": 1.0}})
    srv = LeaderboardServer(str(tmp_path / "runs"), refresh_s=1)
    assert [r["run"] for r in srv.data["runs"]] == ["r1"] and srv.data["message"] is None
    good.storage.write_bytes("leaderboard/ckpt-000000000064-fd_digits-live-s0.parquet", b"not parquet")
    srv.refresh()
    assert [r["run"] for r in srv.data["runs"]] == ["r1"] and "could not re-read storage" in srv.data["message"]
    good.storage.delete("leaderboard/ckpt-000000000064-fd_digits-live-s0.parquet")
    srv.refresh()
    assert srv.data["message"] is None


@pytest.mark.parametrize("argv,expected", [(["--port", "99999"], "--port: expected 0..65535"),
                                           (["--refresh", "0"], "--refresh: expected a positive number")])
def test_bad_serve_options_get_one_line_errors(tmp_path, capsys, argv, expected):
    from pipelines.cli import main

    assert main(["leaderboard", str(tmp_path), "--serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
