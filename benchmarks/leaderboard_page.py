"""How fast `sida leaderboard --serve` shows a large storage root: RUNS x CHECKPOINTS synthetic live scores
(real ``RunStore`` rows and galleries in a local folder; a third of the runs finished, one in ten diverged, the
rest training), then

- ``snapshot_s``: the server's first read of storage (done before it listens, so no page waits for it);
- ``api_s``: one ``GET /api/leaderboard`` (the page's data);
- ``first_paint_s``: headless Chromium (Debian's, via Playwright) from ``page.goto`` to the page's first drawn
  table and curves (``null`` without /usr/bin/chromium).

Prints one JSON line. The issue's target: first paint under 2 s for 50 runs x 20 checkpoints on the 2-core CPU:
``.venv/bin/python benchmarks/leaderboard_page.py`` (defaults). CI runs it small (tests/test_web.py).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = Path("/usr/bin/chromium")


def write_synthetic_runs(root: Path, runs: int, checkpoints: int, *, gallery: int = 16, seed: int = 0) -> int:
    """``runs`` run folders under ``root``, each with ``checkpoints`` live scores (a noisy falling curve) and a
    gallery per checkpoint; returns the number of rows written."""
    import torch

    from schemas.leaderboard import LeaderboardRow
    from schemas.run import RunConfig
    from sida_core.sampling import grid_png
    from store.run_store import RunState, RunStore
    from store.storage import Storage

    rng = random.Random(seed)
    png = grid_png(torch.rand(gallery, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    n = 0
    for i in range(runs):
        name = f"run-{i:03d}"
        store = RunStore(Storage(str(root)).child(name))
        cfg = RunConfig.model_validate({"name": name, "loss": {"alpha": rng.choice([0.5, 1.0, 1.2])}})
        store.write_config(cfg.model_dump(mode="json"))
        level = rng.uniform(2.0, 8.0)
        for k in range(1, checkpoints + 1):
            nimg = k * 10_000
            ck = f"ckpt-{nimg:012d}"
            store.write_gallery(ck, png)
            store.write_row(LeaderboardRow(
                run=name, run_uri=store.uri, config_summary="synthetic", method=cfg.method, alpha=cfg.loss.alpha,
                lambda_sid=100.0, lambda_adv_theta=0.01, lambda_adv_psi=1.0, lr_theta=1e-4, lr_psi=1e-4,
                checkpoint=ck, checkpoint_uri=store.storage.uri_of(ck), checkpoint_hash=f"{i:04d}{k:04d}",
                kimg=nimg / 1000, cur_nimg=nimg, metric="fd_digits", value=level * (1 + 20 / k) * rng.uniform(0.9, 1.1),
                num_images=5000, seed=0, reference="synthetic", extractor_id="synthetic", time=time.time()))
            n += 1
        if i % 10 == 9:
            store.record_end(RunState.DIVERGED.value, cur_nimg=checkpoints * 10_000, reason="synthetic: loss blew up")
        elif i % 3 == 0:
            store.record_end(RunState.FINISHED.value, cur_nimg=checkpoints * 10_000)
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium first-paint measurement")
    a = ap.parse_args(argv)

    from pipelines.web import LeaderboardServer

    with tempfile.TemporaryDirectory(prefix="sida-lb-bench-") as tmp:
        root = Path(tmp) / "runs"
        t0 = time.perf_counter()
        rows = write_synthetic_runs(root, a.runs, a.checkpoints)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        srv = LeaderboardServer(str(root), refresh_s=3600)
        snapshot_s = time.perf_counter() - t0
        ready, stop, urls = threading.Event(), threading.Event(), []
        thread = threading.Thread(target=srv.run, kwargs=dict(port=0, stop=stop,
                                                              on_ready=lambda u: (urls.append(u), ready.set())))
        thread.start()
        try:
            if not ready.wait(30):
                raise SystemExit("the server did not start")
            t0 = time.perf_counter()
            with urllib.request.urlopen(urls[0] + "api/leaderboard", timeout=30) as r:
                shown = len(json.loads(r.read())["runs"])
            api_s = time.perf_counter() - t0
            first_paint_s = None
            if CHROMIUM.is_file() and not a.no_browser:
                from playwright.sync_api import sync_playwright

                with sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=[
                        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
                    try:
                        page = browser.new_page()
                        page.goto(urls[0] + "static/plotly.min.js")  # warm: the browser's start is not the page's
                        t0 = time.perf_counter()
                        page.goto(urls[0])
                        page.wait_for_function("Number(document.body.dataset.loaded || 0) >= 1", timeout=60_000)
                        first_paint_s = time.perf_counter() - t0
                    finally:
                        browser.close()
        finally:
            stop.set()
            thread.join(10)
    out = {"runs": a.runs, "checkpoints": a.checkpoints, "rows": rows, "runs_shown": shown,
           "write_s": round(write_s, 3), "snapshot_s": round(snapshot_s, 3), "api_s": round(api_s, 4),
           "first_paint_s": None if first_paint_s is None else round(first_paint_s, 3),
           "target_first_paint_s": 2.0}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
