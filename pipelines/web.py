"""``sida leaderboard URI --serve``: a read-only web page of the runs at or below URI (local or ``s3://``).

The server (aiohttp, from Ray's dashboard stack) keeps one *snapshot* of the runs — every run's state, best
checkpoint, re-scores and live rows — rebuilt from storage every ``refresh_s`` seconds in a worker thread, so
a page load never waits for storage. Routes:

- ``/``: the page (plain HTML + JavaScript; the curves drawn by Plotly, served from the ``plotly`` package's own
  ``plotly.min.js``, so nothing is fetched from the internet); it polls ``/api/leaderboard`` and redraws;
- ``/api/leaderboard``: the snapshot as JSON;
- ``/gallery/RUN_ID/CKPT.png``: a checkpoint's sample grid (``gallery/CKPT.png``, written by its live scorer), only
  for runs and galleries listed in the snapshot (no path from the request reaches storage);
- ``/static/plotly.min.js``.

Binds to 127.0.0.1 unless told otherwise: the page has no authentication, and links to the runs' folders.
"""
from __future__ import annotations

import asyncio
import math
import re
import sys
import threading
import time
from typing import Callable, Optional

from schemas.loader import ConfigError
from store.run_store import TRAINING, shown_state

_GALLERY_RE = re.compile(r"^(ckpt-\d{12})\.png$")


def run_entry(run_id: int, root_uri: str, store) -> dict:
    """One run's part of the snapshot: state (and why it ended), best live row, its re-scores, live rows with a
    pinned mark, which checkpoints have a gallery, lineage. Reads each of the run's files once."""
    from pipelines.leaderboard import alpha_label, final_values, mean_std

    rows = store.read_rows()
    status = store.read_status() or {}
    pinned = set(store.pinned())
    galleries = {m.group(1) for m in map(_GALLERY_RE.match, store.storage.listdir("gallery")) if m}
    live = sorted((r for r in rows if r["kind"] == "live" and math.isfinite(r["value"])), key=lambda r: r["cur_nimg"])
    best = store.best_live_row(rows=live)
    rescored = {k: [v for v in vs if math.isfinite(v)] for k, vs in final_values(rows).items()}
    finals = rescored.get((best["run_uri"], best["checkpoint"], best["metric"]), []) if best else []
    lineage = store.lineage()
    cfg = None if live else store.read_config()
    first = live[0] if live else {"method": cfg["method"], "alpha": cfg["loss"]["alpha"]} if cfg else {}
    newest = next((r["checkpoint"] for r in reversed(live) if r["checkpoint"] in galleries), None)
    rel = store.uri[len(root_uri):].strip("/") or store.name
    return {
        "id": run_id, "run": rel, "uri": store.uri, "method": first.get("method"),
        "alpha": alpha_label(first) if first else "",
        "state": shown_state(status), "reason": status.get("reason"),
        "best": None if best is None else {k: best[k] for k in ("checkpoint", "kimg", "metric", "value")},
        "final": None if not finals else dict(zip(("mean", "std"), mean_std(finals)), n=len(finals)),
        "scored": len(live),
        "gallery_best": best["checkpoint"] if best and best["checkpoint"] in galleries else None,
        "gallery_newest": newest,
        "lineage": None if not lineage else {"uri": lineage.get("uri"), "kimg": lineage.get("kimg")},
        "rows": [{"checkpoint": r["checkpoint"], "kimg": r["kimg"], "metric": r["metric"], "value": r["value"],
                  "seed": r["seed"], "pinned": r["checkpoint"] in pinned} for r in live],
        "finals": [{"checkpoint": r["checkpoint"], "kimg": r["kimg"], "metric": r["metric"], "value": v}
                   for r in live for v in rescored.get((r["run_uri"], r["checkpoint"], r["metric"]), [])],
        "_galleries": galleries,
    }


def snapshot(uri: str, endpoint_url: Optional[str] = None) -> tuple[dict, dict]:
    """(the JSON snapshot of every run below ``uri``, {run id: (RunStore, its galleries)} for the gallery route).
    Runs are ranked by best live score (per metric), runs without a score last."""
    from pipelines.leaderboard import find_runs
    from store.storage import Storage

    t0 = time.time()
    try:
        stores = [s for s in find_runs(uri, endpoint_url) if "/tune/" not in s.uri]
    except ConfigError as exc:  # nothing there yet: an empty page that says so, refreshed like any other
        return {"uri": uri, "time": t0, "seconds": 0.0, "runs": [], "message": str(exc)}, {}
    root = Storage(uri, endpoint_url=endpoint_url).uri
    runs = [run_entry(i, root, s) for i, s in enumerate(stores)]
    runs.sort(key=lambda r: (r["best"] is None, r["best"]["metric"] if r["best"] else "",
                             r["best"]["value"] if r["best"] else 0.0, r["run"]))
    files = {r["id"]: (stores[r["id"]], r.pop("_galleries")) for r in runs}
    ended = sum(r["state"] != TRAINING for r in runs)
    return {"uri": root, "time": t0, "seconds": round(time.time() - t0, 3), "runs": runs, "ended": ended,
            "message": None}, files


def plotly_js() -> bytes:
    """The ``plotly`` package's bundled ``plotly.min.js`` (a dependency of this project)."""
    from importlib.resources import files

    return (files("plotly") / "package_data" / "plotly.min.js").read_bytes()


class LeaderboardServer:
    """The aiohttp app and its snapshot; :meth:`run` serves until ``stop`` is set (or Ctrl-C)."""

    def __init__(self, uri: str, *, endpoint_url: Optional[str] = None, refresh_s: float = 5.0):
        if not refresh_s > 0:
            raise ConfigError(f"--refresh: expected a positive number of seconds, got {refresh_s:g}")
        self.uri, self.endpoint_url, self.refresh_s = uri, endpoint_url, refresh_s
        self.data, self.files = snapshot(uri, endpoint_url)  # before the first request: first paint never waits
        self._js: Optional[bytes] = None

    def refresh(self) -> None:
        """A new snapshot; if storage cannot be read now (an outage, a corrupt file), the last one stays on the page
        with a one-line message saying why, and the next refresh tries again."""
        try:
            self.data, self.files = snapshot(self.uri, self.endpoint_url)
        except Exception as exc:  # the page must outlive a storage hiccup
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.data = {**self.data, "message": f"could not re-read storage at {time.strftime('%H:%M:%S')} "
                                                 f"(showing the last good read): {reason}"}

    def app(self):
        from aiohttp import web

        async def page(request):
            html = PAGE.replace("__REFRESH_MS__", str(int(self.refresh_s * 1000)))
            return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

        async def api(request):
            return web.json_response(self.data, headers={"Cache-Control": "no-store"}, dumps=_dumps)

        async def gallery(request):
            try:
                store, names = self.files[int(request.match_info["run"])]
            except (KeyError, ValueError):
                raise web.HTTPNotFound(text="no such run") from None
            name = request.match_info["ckpt"]
            if name not in names:
                raise web.HTTPNotFound(text="no gallery for this checkpoint")
            png = await asyncio.get_running_loop().run_in_executor(
                None, store.storage.read_bytes, store.gallery_ref(name))
            return web.Response(body=png, content_type="image/png", headers={"Cache-Control": "max-age=3600"})

        async def plotly(request):
            if self._js is None:
                self._js = plotly_js()
            return web.Response(body=self._js, content_type="application/javascript",
                                headers={"Cache-Control": "max-age=86400"})

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/api/leaderboard", api)
        app.router.add_get(r"/gallery/{run:\d+}/{ckpt:ckpt-\d{12}}.png", gallery)
        app.router.add_get("/static/plotly.min.js", plotly)
        return app

    def run(self, host: str = "127.0.0.1", port: int = 8600, *, stop: Optional[threading.Event] = None,
            on_ready: Optional[Callable[[str], None]] = None) -> None:
        """Serve until ``stop`` is set or Ctrl-C; ``on_ready(url)`` once the socket listens (port 0: any free
        port). Raises ConfigError (one line) if the address cannot be bound."""
        try:
            asyncio.run(self._serve(host, port, stop or threading.Event(), on_ready))
        except KeyboardInterrupt:
            pass

    async def _serve(self, host, port, stop, on_ready) -> None:
        from aiohttp import web

        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
        bound_host, bound_port = runner.addresses[0][:2]
        if on_ready:
            on_ready(f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}/")
        loop = asyncio.get_running_loop()
        try:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.1)
                if time.monotonic() - last >= self.refresh_s:
                    await loop.run_in_executor(None, self.refresh)
                    last = time.monotonic()
        finally:
            await runner.cleanup()


def _dumps(data: dict) -> str:
    import json

    return json.dumps(data, default=str)


def serve(uri: str, *, endpoint_url: Optional[str] = None, host: str = "127.0.0.1", port: int = 8600,
          refresh_s: float = 5.0) -> None:
    """``sida leaderboard URI --serve``: serve the page until Ctrl-C."""
    if not 0 <= port <= 65535:  # before storage is read (aiohttp would raise OverflowError at bind time)
        raise ConfigError(f"--port: expected 0..65535 (0: any free port), got {port}")
    server = LeaderboardServer(uri, endpoint_url=endpoint_url, refresh_s=refresh_s)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who reaches it can read the leaderboard (no authentication)",
              file=sys.stderr, flush=True)

    def ready(url: str) -> None:
        n = len(server.data["runs"])
        print(f"serving {server.data['uri']} ({n} run(s)) at {url} — refreshed every {refresh_s:g} s; Ctrl-C to stop",
              file=sys.stderr, flush=True)

    server.run(host, port, on_ready=ready)


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sida leaderboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<script src="/static/plotly.min.js"></script>
<style>
 body { font: 14px system-ui, sans-serif; margin: 16px 24px; color: #222; }
 h1 { font-size: 18px; margin: 0 0 4px; } .sub { color: #666; margin-bottom: 12px; }
 table { border-collapse: collapse; margin: 8px 0 16px; } th, td { padding: 3px 8px; border-bottom: 1px solid #ddd; }
 th { text-align: left; background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 tr.run { cursor: pointer; } tr.run:hover { background: #f0f6ff; } tr.sel { background: #e0ecff; }
 .state-finished { color: #1a7f37; } .state-training { color: #0969da; }
 .state-diverged, .state-stopped, .state-failed { color: #cf222e; }
 #panel { display: flex; gap: 24px; flex-wrap: wrap; } figure { margin: 0; } figcaption { color: #666; font-size: 12px; }
 img.gallery { image-rendering: pixelated; border: 1px solid #ccc; max-width: 320px; }
 #message { color: #cf222e; }
</style></head>
<body>
<h1>sida leaderboard</h1>
<div class="sub"><span id="uri"></span> — <span id="summary"></span> · updated <span id="updated"></span></div>
<div id="message"></div>
<table id="runs"><thead><tr><th>#</th><th>run</th><th>method</th><th>state</th><th>best</th><th>metric</th>
<th>at kimg</th><th>checkpoint</th><th>re-scored (mean ± std, n)</th><th>scored</th><th>started from</th><th>folder</th>
</tr></thead><tbody></tbody></table>
<div id="curves" style="width: 100%; max-width: 1000px; height: 420px;"></div>
<h2 id="selected-title" style="font-size: 16px;"></h2>
<div id="panel">
 <figure><img id="g-best" class="gallery" alt=""><figcaption id="g-best-cap"></figcaption></figure>
 <figure><img id="g-newest" class="gallery" alt=""><figcaption id="g-newest-cap"></figcaption></figure>
 <table id="ckpts"><thead><tr><th>kimg</th><th>checkpoint</th><th>metric</th><th>value</th><th>seed</th><th>pinned</th>
 </tr></thead><tbody></tbody></table>
</div>
<script>
const REFRESH_MS = __REFRESH_MS__;
let selected = null;
const fmt = (v, d = 4) => (v === null || v === undefined) ? "" : Number(v).toFixed(d);
const ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"};
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ESC[c]);
function folderLink(uri) {
  const href = uri.startsWith("/") ? "file://" + uri : uri;
  return `<a href="${esc(href)}" title="${esc(uri)}">${esc(uri.split("/").slice(-2).join("/"))}</a>`;
}
function drawRuns(data) {
  const body = document.querySelector("#runs tbody");
  body.innerHTML = data.runs.map((r, i) => {
    const b = r.best || {}, f = r.final;
    const state = esc(r.state) + (r.reason ? ": " + esc(r.reason) : "");
    return `<tr class="run${r.id === selected ? " sel" : ""}" data-id="${r.id}">
      <td class="num">${i + 1}</td><td>${esc(r.run)}</td><td>${esc(r.method)}${r.alpha ? " " + esc(r.alpha) : ""}</td>
      <td class="state-${esc(r.state)}">${state}</td><td class="num">${fmt(b.value)}</td><td>${esc(b.metric)}</td>
      <td class="num">${b.kimg ?? ""}</td><td>${esc(b.checkpoint)}</td>
      <td class="num">${f ? fmt(f.mean) + (f.std !== null ? " ± " + fmt(f.std) : "") + " (n=" + f.n + ")" : ""}</td>
      <td class="num">${r.scored}</td><td>${r.lineage ? esc(r.lineage.uri) : ""}</td><td>${folderLink(r.uri)}</td></tr>`;
  }).join("");
  body.querySelectorAll("tr.run").forEach(tr => tr.onclick = () => { selected = Number(tr.dataset.id); draw(window.lastData); });
}
function drawCurves(data) {
  const traces = [];
  for (const r of data.runs) {
    for (const m of [...new Set(r.rows.map(x => x.metric))]) {
      const pts = r.rows.filter(x => x.metric === m);
      traces.push({x: pts.map(p => p.kimg), y: pts.map(p => p.value), mode: "lines+markers", type: "scatter",
                   name: r.run + (r.method ? ` (${r.method}${r.alpha ? ", " + r.alpha : ""})` : ""),
                   line: {width: r.id === selected ? 3 : 1.5}, marker: {size: 5}});
      const fin = r.finals.filter(x => x.metric === m), by = {};
      fin.forEach(x => (by[x.checkpoint] = by[x.checkpoint] || {kimg: x.kimg, v: []}).v.push(x.value));
      const groups = Object.values(by);
      if (groups.length) {
        const mean = g => g.v.reduce((a, b) => a + b, 0) / g.v.length;
        const sd = g => g.v.length > 1 ? Math.sqrt(g.v.reduce((a, b) => a + (b - mean(g)) ** 2, 0) / (g.v.length - 1)) : 0;
        traces.push({x: groups.map(g => g.kimg), y: groups.map(mean), mode: "markers", type: "scatter",
                     name: r.run + " re-scored", marker: {symbol: "square", size: 8},
                     error_y: {type: "data", array: groups.map(sd), visible: true}});
      }
    }
  }
  const layout = {margin: {t: 30, r: 10}, xaxis: {type: "log", title: {text: "kimg (training images / 1000)"}},
                  yaxis: {type: "log", title: {text: "score (lower is better)"}}, legend: {font: {size: 10}},
                  title: {text: "score vs kimg (squares: re-scores, mean ± std)", font: {size: 13}}};
  if (window.Plotly) Plotly.react("curves", traces, layout, {displayModeBar: false, responsive: true});
}
function drawSelected(data) {
  const r = data.runs.find(x => x.id === selected);
  document.getElementById("selected-title").textContent = r ? "run " + r.run : "";
  const show = (img, cap, ck, what) => {
    const el = document.getElementById(img);
    if (r && ck) {
      const src = `/gallery/${r.id}/${ck}.png`;
      if (el.getAttribute("src") !== src) el.src = src;
      el.style.display = ""; el.alt = what + " " + ck; document.getElementById(cap).textContent = what + ": " + ck;
    }
    else { el.removeAttribute("src"); el.style.display = "none"; document.getElementById(cap).textContent = ""; }
  };
  show("g-best", "g-best-cap", r && r.gallery_best, "best (pinned)");
  show("g-newest", "g-newest-cap", r && r.gallery_newest, "newest");
  document.querySelector("#ckpts tbody").innerHTML = !r ? "" : r.rows.map(p =>
    `<tr><td class="num">${p.kimg}</td><td>${esc(p.checkpoint)}</td><td>${esc(p.metric)}</td><td class="num">${fmt(p.value)}</td>
     <td class="num">${p.seed}</td><td>${p.pinned ? "★ pinned" : ""}</td></tr>`).join("");
}
function draw(data) {
  window.lastData = data;
  if (selected === null || !data.runs.some(r => r.id === selected)) selected = data.runs.length ? data.runs[0].id : null;
  document.getElementById("uri").textContent = data.uri;
  document.getElementById("summary").textContent = `${data.runs.length} run(s), ${data.ended ?? 0} ended`;
  document.getElementById("updated").textContent = new Date(data.time * 1000).toLocaleTimeString();
  document.getElementById("message").textContent = data.message || "";
  drawRuns(data); drawCurves(data); drawSelected(data);
  document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
}
async function poll() {
  try { const res = await fetch("/api/leaderboard", {cache: "no-store"}); draw(await res.json()); }
  catch (e) { document.getElementById("message").textContent = "cannot reach the server: " + e; }
  setTimeout(poll, REFRESH_MS);
}
poll();
</script>
</body></html>
"""
