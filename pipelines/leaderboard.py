"""``sida leaderboard`` and ``sida evaluate``: reading, showing and finalising the scores of runs.

A URI is one run folder (it holds ``config.json``) or any folder above runs (a sweep, a storage root): runs
are found up to ``MAX_DEPTH`` levels down. Rows are read as they are (``RUN_URI/leaderboard/*.parquet``),
so both commands work on finished runs and on runs still training.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Collection, Optional

from schemas.leaderboard import HIGHER_IS_BETTER, rank_value
from schemas.loader import ConfigError
from store.run_store import TRAINING, shown_state

from store.leaderboard_index import INDEX_FILE, MAX_DEPTH
FINAL_SEED0 = 1_000_000  # `sida evaluate` seeds: disjoint from the live scores' metric.seed
TEACHER_STEPS = 18  # `sida evaluate --protocol-check`: EDM's Heun sampler, 18 steps = 35 NFE


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


METRIC_LABELS = {"fid_inception": "FID", "fd_digits": "FD-digits", "fd_dinov2": "FD-DINOv2", "is_inception": "IS",
                 "kid_inception": "KID", "precision_inception": "precision", "recall_inception": "recall"}
READ_THREADS = 16  # object-store requests in flight at once when listing and reading many runs


def _pmap(fn: Callable, items: list) -> list:
    """``[fn(x) for x in items]``, up to READ_THREADS at a time (object stores answer in parallel; order kept)."""
    if len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(READ_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def find_runs(uri: str, endpoint_url: Optional[str] = None, known: Collection[str] = ()) -> list:
    """RunStores of every run at or below ``uri`` (depth <= MAX_DEPTH), sorted by URI; the folders of one level
    are probed in parallel. ``known``: paths below ``uri`` already known to be runs (a root index's): found by
    listing their parent, they are not probed."""
    from store.run_store import RunStore
    from store.storage import Storage

    root = Storage(uri, endpoint_url=endpoint_url)
    known = set(known)

    def probe(storage, depth):  # (the run here, or None; the folders to look in next)
        store = RunStore(storage)
        if relative_path(root, store) in known or store.exists():
            return store, []
        if depth == MAX_DEPTH:
            return None, []
        return None, [storage.child(name) for name in storage.listdir() if not name.startswith(".")]

    runs, level = [], [root]
    for depth in range(MAX_DEPTH + 1):  # one level at a time: at most READ_THREADS requests in flight
        found = _pmap(lambda s, depth=depth: probe(s, depth), level)
        runs += [store for store, _ in found if store is not None]
        level = [child for _, children in found for child in children]
    if not runs:
        raise ConfigError(f"{root.uri}: no sida run found (a run folder holds config.json; searched "
                          f"{MAX_DEPTH} levels down)")
    return sorted(runs, key=lambda s: s.uri)


def relative_path(root, store) -> str:
    """The path of run ``store`` below the ``root`` Storage (``""``: the root is the run)."""
    return store.uri[len(root.uri):].strip("/")


def read_all_rows(stores: list, metric: Optional[str] = None) -> list[dict]:
    """The leaderboard rows of many runs (optionally one metric), read in parallel."""
    return [r for rows in _pmap(lambda s: s.read_rows(), stores) for r in rows if metric is None or r["metric"] == metric]


def collect_rows(uri: str, endpoint_url: Optional[str] = None, metric: Optional[str] = None) -> list[dict]:
    """Every leaderboard row of every run under ``uri`` (optionally one metric). Where ``uri`` holds a root index
    (written by ``--compact``: store/leaderboard_index.py), indexed runs are neither probed nor read: only runs
    the index does not hold, or that changed since it was written, are."""
    from store.leaderboard_index import read_index
    from store.storage import Storage

    root = Storage(uri, endpoint_url=endpoint_url)
    index = read_index(root)
    stores = find_runs(uri, endpoint_url, known=index.runs if index else ())

    def rows_of(store) -> list[dict]:
        fresh = index.fresh(relative_path(root, store)) if index else None
        return store.read_rows() if fresh is None else fresh
    return [r for rows in _pmap(rows_of, stores) for r in rows if metric is None or r["metric"] == metric]


def compact(uri: str, endpoint_url: Optional[str] = None, *, log: Callable[[str], None] = _log) -> dict:
    """``sida leaderboard --compact``: fold the rows of every *ended* run under ``uri`` into one Parquet part per
    run (:meth:`RunStore.compact_rows`; runs still training are left alone: their scorers are writing), then write
    the root index of those runs at ``uri`` (store/leaderboard_index.py), so the next read is a few requests."""
    from store.leaderboard_index import DIRTY_DIR, mark_indexed, write_index
    from store.run_store import split_leaderboard
    from store.storage import Storage

    root = Storage(uri, endpoint_url=endpoint_url)
    dirty_before = sorted(root.files(DIRTY_DIR))  # before any run is read: see write_index
    stores = find_runs(uri, endpoint_url)

    def one(store):  # (compaction result, rows for the index or None), or None for a run still training
        if store.read_status() is None:
            return None
        rel = relative_path(root, store)
        mark_indexed(store.storage, rel)  # before the rows are listed: see store/leaderboard_index.py
        result = store.compact_rows()
        files = store.storage.files("leaderboard")
        parts, loose = split_leaderboard(files)
        return result, (store.read_rows(files) if len(parts) == 1 and not loose else None)  # else: read directly
    done = {relative_path(root, s): r for s, r in zip(stores, _pmap(one, stores)) if r is not None}
    results = [r for r, _ in done.values()]
    indexed = {rel: rows for rel, (_, rows) in done.items() if rows is not None}
    write_index(root, indexed, dirty_before=dirty_before)
    out = {"runs": len(stores), "compacted": sum(r["part"] is not None for r in results),
           "skipped_training": len(stores) - len(results), "rows": sum(r["rows"] or 0 for r in results),
           "files_removed": sum(r["files_removed"] + r["parts_removed"] for r in results), "indexed": len(indexed)}
    log(f"compacted {out['compacted']} of {out['runs']} run(s) under {uri}: {out['rows']} row(s) now in one part "
        f"per run, {out['files_removed']} file(s) removed; {out['indexed']} ended run(s) in {root.uri_of(INDEX_FILE)}"
        + (f"; {out['skipped_training']} still training, left as they are" if out["skipped_training"] else ""))
    return out


def final_values(rows: list[dict]) -> dict[tuple, list[float]]:
    """The ``sida evaluate`` re-scores (kind ``final``), grouped by (run_uri, checkpoint, metric)."""
    finals: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kind"] == "final":
            finals.setdefault((r["run_uri"], r["checkpoint"], r["metric"]), []).append(r["value"])
    return finals


def mean_std(values) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation of repeated scores (std None for fewer than two): the one place the
    leaderboard, ``sida evaluate``, reports, the web page and the demo take ``mean ± std`` from."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_final(mean: Optional[float], std: Optional[float], n: int) -> str:
    """``mean ± std (n=N)`` of a re-evaluation (no std for one seed); empty without one."""
    if mean is None:
        return ""
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + f" (n={n})"


def rank(rows: list[dict], by: str = "checkpoint", top: Optional[int] = None) -> list[dict]:
    """Live rows, best first (lowest for distances, highest for IS / precision / recall): every checkpoint
    (``by="checkpoint"``) or each run's best (``"run"``).

    A run's final re-evaluation (``sida evaluate``), if any, is attached as ``final_mean``/``final_std``.
    """
    if by not in ("checkpoint", "run"):
        raise ConfigError(f"--by: expected 'checkpoint' or 'run', got {by!r}")
    live = [r for r in rows if r["kind"] == "live"]
    if by == "run":  # each run's best first, so only the rows shown are decorated below
        best: dict[tuple, dict] = {}
        for r in live:
            k = (r["run_uri"], r["metric"])
            if k not in best or rank_value(r["metric"], r["value"]) < rank_value(r["metric"], best[k]["value"]):
                best[k] = r
        live = list(best.values())
    finals = final_values(rows)
    out = []
    for r in live:
        vals = finals.get((r["run_uri"], r["checkpoint"], r["metric"]))
        mean, std = mean_std(vals) if vals else (None, None)
        out.append({**r, "final_mean": mean, "final_std": std,
                    "final_repeats": len(vals) if vals else 0})
    out.sort(key=lambda r: (r["metric"], rank_value(r["metric"], r["value"])))
    return out[:top] if top else out


def build_table(ranked: list[dict], title: str, states: Optional[dict[str, str]] = None):
    """The leaderboard as a rich Table; ``states``: {run_uri: state} adds each run's state column."""
    from rich.table import Table

    table = Table(title=title)
    cols = ["#", "run", "method", "alpha", "checkpoint", "kimg", "metric", "value", "final (mean ± std)", "images"]
    for col in cols + (["state"] if states is not None else []):
        table.add_column(col, justify="right" if col in ("#", "alpha", "kimg", "value", "images") else "left")
    for i, r in enumerate(ranked, 1):
        final = format_final(r["final_mean"], r["final_std"], r["final_repeats"])
        cells = [str(i), r["run"] + (f" [{r['trial']}]" if r.get("trial") else ""), r["method"],
                 f"{r['alpha']:g}", r["checkpoint"], f"{r['kimg']:.1f}", r["metric"], f"{r['value']:.4f}",
                 final, str(r["num_images"])]
        table.add_row(*cells, *([states.get(r["run_uri"], TRAINING)] if states is not None else []))
    return table


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 240)  # piped: never cut a checkpoint name


def print_table(ranked: list[dict], title: str) -> None:
    """A rich table on stdout."""
    _console().print(build_table(ranked, title))


def run_states(stores: list) -> dict[str, str]:
    """{run_uri: how the run ended (``status.json``), or "training" while it has no status}."""
    return {s.uri: shown_state(s.read_status()) for s in stores}


def watch(uri: str, *, endpoint_url: Optional[str] = None, metric: Optional[str] = None, by: str = "checkpoint",
          top: Optional[int] = None, interval: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> int:
    """``sida leaderboard --watch``: redraw the table (with each run's state) every ``interval`` seconds until
    every run below ``uri`` has ended (finished / diverged / stopped / failed) or the user presses Ctrl-C.
    Runs that appear later (a sweep's next trials) join the table; before the first run exists it waits.
    On a terminal the table is redrawn in place; piped, each refresh is printed after the last. Returns the
    number of refreshes drawn."""
    if not interval > 0:
        raise ConfigError(f"--watch: expected a positive number of seconds, got {interval:g}")
    console = _console()
    rounds = 0
    try:
        while True:
            try:
                stores = find_runs(uri, endpoint_url)
            except ConfigError:  # nothing there yet (a sweep starting): keep looking
                stores = []
            rows = read_all_rows(stores, metric)
            states = run_states(stores)
            ended = sum(st != TRAINING for st in states.values())
            stamp = time.strftime("%H:%M:%S")
            title = (f"{uri} — {ended} of {len(stores)} run(s) ended, {len(rows)} score(s); {stamp}, every "
                     f"{interval:g} s (Ctrl-C to stop)")
            if console.is_terminal:
                console.clear()
            console.print(build_table(rank(rows, by=by, top=top), title, states))
            rounds += 1
            if stores and ended == len(stores):
                return rounds
            sleep(interval)
    except KeyboardInterrupt:
        return rounds


def alpha_label(row: dict) -> str:
    """``alpha=A`` of a leaderboard row, or "" for a method whose generator loss has no alpha (ADD)."""
    from sida_core.methods import get_method

    try:
        uses_alpha = get_method(row["method"]).uses_alpha
    except ValueError:  # a row of a method this checkout does not know
        uses_alpha = True
    return f"alpha={row['alpha']:g}" if uses_alpha else ""


def plot_curves(rows: list[dict], path: Path, title: str = "", hlines: Optional[dict[str, float]] = None,
                label: Optional[Callable[[dict], str]] = None, kimg_offset: Optional[dict[str, float]] = None) -> Path:
    """Value vs kimg (log-scale x), one curve per run and metric, like the paper's Figures 2-5; the final
    re-evaluations (mean ± std) as error bars at their checkpoints; ``hlines``: labelled reference levels
    (e.g. the teacher's score, the real-vs-real floor). ``label(first row of a curve)``: the legend text (default
    "run (method, alpha)"); ``kimg_offset``: {run_uri: kimg} added to a run's x values (e.g. a SiD²A run drawn
    after the SiD images its generator already saw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import math

    offset = kimg_offset or {}
    rows = [{**r, "kimg": r["kimg"] + offset.get(r["run_uri"], 0.0)} for r in rows if math.isfinite(r["value"])]
    live = [r for r in rows if r["kind"] == "live"]
    if not live:
        raise ConfigError("nothing to plot yet: no scored checkpoint")
    metrics = sorted({r["metric"] for r in live}, key=lambda m: (m in HIGHER_IS_BETTER, m))  # distances first
    fig, axes = plt.subplots(len(metrics), 1, figsize=(6, 4 + 2.5 * (len(metrics) - 1)), dpi=120, squeeze=False)
    curves: dict[tuple, list[dict]] = {}
    for r in live:
        curves.setdefault((r["run_uri"], r["metric"]), []).append(r)
    from matplotlib.ticker import FormatStrFormatter

    for i, (metric, ax) in enumerate(zip(metrics, axes[:, 0])):  # one panel per metric: each its own scale
        for (run_uri, _), pts in sorted(item for item in curves.items() if item[0][1] == metric):
            pts.sort(key=lambda r: r["kimg"])
            what = ", ".join(filter(None, (pts[0]["method"], alpha_label(pts[0]))))
            line, = ax.plot([p["kimg"] for p in pts], [p["value"] for p in pts], "o-", ms=3,
                            label=label(pts[0]) if label else f"{pts[0]['run']} ({what})")
            finals = [r for r in rows if r["kind"] == "final" and r["run_uri"] == run_uri and r["metric"] == metric]
            for ck in sorted({r["checkpoint"] for r in finals}):
                vals = [r["value"] for r in finals if r["checkpoint"] == ck]
                kimg = next(r["kimg"] for r in finals if r["checkpoint"] == ck)
                mean, std = mean_std(vals)
                ax.errorbar([kimg], [mean], yerr=[std or 0.0], fmt="s", color=line.get_color(), capsize=3, ms=5)
        if i == 0:  # labelled levels (the teacher's score, the real floor) belong to the first, ranking, metric
            for (text, value), style in zip((hlines or {}).items(), ("--", ":", "-.")):
                ax.axhline(value, color="gray", ls=style, label=text)
        ax.set_xscale("log")
        if metric not in HIGHER_IS_BETTER and all(r["value"] > 0 for r in live if r["metric"] == metric):
            ax.set_yscale("log")  # distances span decades; IS and precision / recall stay linear
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers: these ranges span one or two decades
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.set_ylabel(METRIC_LABELS.get(metric, metric) + (" (higher is better)" if metric in HIGHER_IS_BETTER else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("kimg (training images seen / 1000)")
    axes[0, 0].set_title(title or "score vs training images (squares: final re-evaluation, mean ± std)", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def open_run(run_uri: str, endpoint_url: Optional[str] = None):
    """The RunStore of the run folder ``run_uri``; ConfigError (one line) if it is not one."""
    from store.run_store import RunStore
    from store.storage import Storage

    try:
        store = RunStore(Storage(run_uri, endpoint_url=endpoint_url))
    except ValueError as exc:  # a URI scheme or endpoint Storage cannot use
        raise ConfigError(f"RUN_URI {run_uri}: {exc}") from None
    if not store.exists():
        raise ConfigError(f"{store.uri}: not a run folder (no config.json); `sida leaderboard {run_uri} --by run` "
                          f"lists the runs below it")
    return store


def best_live_row(store, rows: Optional[list[dict]] = None, hint: str = "--checkpoint") -> dict:
    """The run's best checkpoint: its live leaderboard row of lowest value (the scorers pin that checkpoint).
    ``rows``: the run's rows if already read; ``hint``: the option to name when there are no scores yet."""
    best = store.best_live_row(rows=rows)
    if best is None:
        raise ConfigError(f"{store.uri}: no scored checkpoint yet; wait for the scorers or give {hint}")
    return best


def checkpoint_source(store, name: str) -> str:
    """Where checkpoint ``name`` of the run is read from (its pinned copy if any); ConfigError if it is not there."""
    source = store.checkpoint_ref(name)
    if not store.storage.exists(f"{source}/manifest.json"):
        raise ConfigError(f"{store.storage.uri_of(name)}: no such checkpoint (kept: "
                          f"{', '.join(store.checkpoint_names()) or 'none'}; pinned: {', '.join(store.pinned()) or 'none'})")
    return source


def run_evaluate(run_uri: str, *, checkpoint: Optional[str] = None, repeats: int = 10,
                 num_images: Optional[int] = None, endpoint_url: Optional[str] = None,
                 protocol_check: bool = False, teacher_steps: Optional[int] = None,
                 log: Callable[[str], None] = _log, scorers: int = 0, address: Optional[str] = None) -> dict:
    """Re-score the best live checkpoint (or ``checkpoint``) of one run with ``repeats`` fresh generation
    seeds; each score is a ``final`` leaderboard row. Seeds already scored are reused, so a re-run or an
    interrupted evaluation continues instead of repeating work. Returns mean and sample std (ddof 1).

    ``protocol_check``: also score the run's frozen teacher (its Heun sampler, ``teacher_steps`` steps, default
    TEACHER_STEPS) under exactly the generator's metrics, protocol, references and feature spaces, on the latents
    of the first evaluation seed (one seed set), as ``teacher`` in the result; stored in the run and reused.
    ``scorers`` > 1: each score's images are split over that many Ray scorer actors (a local Ray, or the cluster
    at ``address``), with the run's ``metric.cpus_per_scorer`` / ``gpus_per_scorer`` each."""
    from tqdm.auto import tqdm

    from ray_jobs.scoring import CheckpointScorer

    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if teacher_steps is not None and not protocol_check:
        raise ConfigError("--teacher-steps sets the teacher's sampler for --protocol-check; give both or neither")
    steps = TEACHER_STEPS if teacher_steps is None else teacher_steps
    if steps < 1:
        raise ConfigError(f"--teacher-steps must be >= 1 (Heun steps; 18 = 35 NFE), got {steps}")
    store = open_run(run_uri, endpoint_url)
    if protocol_check and not store.storage.exists("teacher/manifest.json"):
        raise ConfigError(f"{store.uri}: no teacher checkpoint (teacher/manifest.json): --protocol-check scores the "
                          f"run's frozen teacher, which `sida train` and `sida distill` copy into the run folder")
    rows = store.read_rows()
    live = [r for r in rows if r["kind"] == "live"]
    if checkpoint is None:
        best = best_live_row(store, rows, hint="--checkpoint")
        checkpoint, metric_name = best["checkpoint"], best["metric"]
    else:
        metric_name = None
    source = checkpoint_source(store, checkpoint)
    overrides = {k: v for k, v in (("name", metric_name), ("num_images", num_images)) if v is not None}
    scorer = CheckpointScorer(threads=1)
    split = _split_scoring(store, scorers, address) if scorers > 1 else None
    done = {(r["seed"], r["num_images"]): r["value"] for r in rows
            if r["kind"] == "final" and r["checkpoint"] == checkpoint and (metric_name is None or r["metric"] == metric_name)}
    values, out_row = [], None
    for i in tqdm(range(repeats), desc=f"evaluate {checkpoint}", unit="seed"):
        seed = FINAL_SEED0 + i
        n = num_images or _run_num_images(store)
        if (seed, n) in done:
            values.append(done[(seed, n)])
            continue
        if split is not None:
            out_row = split(checkpoint, metric=overrides, seed=seed, kind="final", source=source)
        else:
            out_row = scorer.score(store.storage, checkpoint, metric=overrides, seed=seed, kind="final", source=source)
        values.append(out_row["value"])
        log(f"evaluate: {checkpoint} seed {seed}: {out_row['metric']} = {out_row['value']:.4f}")
    final = [r for r in store.read_rows() if r["kind"] == "final" and r["checkpoint"] == checkpoint]
    ref_row = out_row or final[-1]
    mean, std = mean_std(values)
    seeds = {FINAL_SEED0 + i for i in range(repeats)}
    per_metric: dict[str, list[float]] = {}  # every metric the scorer computed (metric.names) over the same seeds
    for r in sorted(final, key=lambda r: r["seed"]):
        if r["seed"] in seeds and r["num_images"] == ref_row["num_images"]:
            per_metric.setdefault(r["metric"], []).append(r["value"])
    metrics = {}
    for name, vals in per_metric.items():
        m, sd = mean_std(vals)
        metrics[name] = {"mean": m, "std": sd or 0.0, "repeats": len(vals)}
    out = {"run_uri": store.uri, "checkpoint": checkpoint, "source": store.storage.uri_of(source),
           "kimg": ref_row["kimg"], "metric": ref_row["metric"], "num_images": ref_row["num_images"],
           "repeats": repeats, "values": [round(v, 6) for v in values], "mean": mean, "std": std or 0.0,
           "metrics": metrics, "live_value": next((r["value"] for r in live if r["checkpoint"] == checkpoint), None)}
    if protocol_check:
        overrides["num_images"] = ref_row["num_images"]  # (the same number of images as the generator's scores)
        t = scorer.score_teacher(store.storage, source, steps=steps, seed=FINAL_SEED0, metric=overrides)
        scores = ", ".join(f"{k} = {v:.4f}" for k, v in t["metrics"].items())
        log(f"evaluate: teacher ({t['nfe']} NFE, {t['num_images']} images, seed {t['seed']}): {scores}"
            + (f" (stored: {t['stored']})" if t["reused"] else ""))
        out["teacher"] = {k: t[k] for k in ("nfe", "steps", "num_images", "seed", "metrics", "stored", "reused")}
    return out


def _split_scoring(store, n: int, address: Optional[str]) -> Callable[..., dict]:
    """``score(checkpoint, **kw)`` over ``n`` scorer actors (ray_jobs.scoring.score_split); Ray is started (or
    joined) here and the actors end with this process."""
    from ray_jobs.cluster import connect
    from ray_jobs.scoring import make_scorers, score_split
    from schemas.run import MetricConfig

    metric = MetricConfig.model_validate(store.read_config().get("metric") or {})
    connect(address, num_cpus=n * metric.cpus_per_scorer)
    actors = make_scorers(metric, n)
    return lambda name, **kw: score_split(store.storage, name, actors, **kw)


def _run_num_images(store) -> int:
    return int(store.read_config()["metric"]["num_images"])
