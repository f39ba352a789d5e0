"""``sida report URI --out DIR``: a markdown summary and PNG plots of a sweep, a staged pipeline or any folder of runs.

- ``fd_vs_kimg.png``: score vs kimg, one curve per trial labelled by its axis values (for an alpha sweep: the
  paper's Figure 2);
- ``best_per_trial.png``: each trial's best score (hatched: trials stopped or diverged);
- ``samples-K.png``: the gallery (fixed-seed one-step samples) of the K-th best trial's best checkpoint;
- pipelines: ``methods.png``: SiD vs SiDA vs SiD²A (each stage's trials; SiD²A drawn after the SiD images its
  generator had already seen), like the paper's Figures 4-5;
- ``report.md``: the trials (stage, method, axis values, best score and where, scored checkpoints, state and the
  reason a trial was stopped), the chosen checkpoints and lineage of a pipeline, and the plots.

Everything is read from storage (``leaderboard/``, ``status.json``, ``sweep.json`` / ``pipeline.json``), so a report
can be made while trials still run. Written into ``--out`` and uploaded under ``URI/report/``.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from store.run_store import RunState
from schemas.loader import ConfigError


def method_display(name: Optional[str]) -> str:
    """A method as papers write it (SiD²A), from the registry; unknown names as they are."""
    from sida_core.methods import get_method

    try:
        return get_method(name).display
    except ValueError:
        return name or ""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _trials(storage, runs) -> tuple[str, list[dict], dict]:
    """(kind, one dict per run: stage, name, axes, state, reason, store; pipeline state or {})."""
    from store.run_store import RunStore  # noqa: F401

    kind, axes, stages, pipeline = "runs", {}, {}, {}
    if storage.exists("pipeline.json"):
        kind, pipeline = "pipeline", storage.read_json("pipeline.json")
        for stage, st in pipeline["stages"].items():
            for o in st.get("outcomes", []):
                axes[o["run_uri"]] = o["axes"]
                stages[o["run_uri"]] = stage
    elif storage.exists("sweep.json"):
        kind = "sweep"
        for t in storage.read_json("sweep.json")["trials"]:
            axes[storage.child(t["name"]).uri] = t["axes"]
    out = []
    for store in runs:
        status = store.read_status() or {}
        rel = store.uri[len(storage.uri):].strip("/")
        stage = stages.get(store.uri) or (rel.split("/")[0] if "/" in rel else None)
        out.append({"uri": store.uri, "name": rel or store.uri.rsplit("/", 1)[-1], "stage": stage,
                    "axes": axes.get(store.uri, {}), "state": status.get("state", "running or unknown"),
                    "reason": status.get("reason"), "store": store})
    return kind, out, pipeline


def _fmt_final(values: list[float]) -> str:
    """A best checkpoint's re-scores as the leaderboard prints them (``mean ± std (n=N)``)."""
    from pipelines.leaderboard import format_final, mean_std

    if not values:
        return ""
    return format_final(*mean_std(values), len(values))


def plot_best(trials: list[dict], path: Path, metric_label: str) -> Path:
    """A horizontal bar per trial: its best score (lower is better); stopped/diverged trials hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in trials if t.get("best") is not None]
    if not shown:
        raise ConfigError("nothing to plot yet: no scored checkpoint")
    fig, ax = plt.subplots(figsize=(6, 0.35 * len(shown) + 1.2), dpi=120)
    for i, t in enumerate(shown):
        bad = t["state"] in (RunState.STOPPED, RunState.DIVERGED, RunState.FAILED)
        ax.barh(i, t["best"]["value"], color="tab:red" if bad else "tab:blue", hatch="//" if bad else None, alpha=0.8)
        ax.text(t["best"]["value"], i, f" {t['best']['value']:.3g}", va="center", fontsize=7)
    ax.set_yticks(range(len(shown)), [t["label"] for t in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"best {metric_label} (lower is better; hatched: stopped / diverged)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


MAX_GALLERIES = 12  # sample grids in a report: the best trials'


def _samples(ranked: list[dict], out_dir: Path) -> list[tuple[dict, str]]:
    """Copy each trial's best-checkpoint gallery (``gallery/CKPT.png``, written by its live scorer) into
    ``out_dir`` as ``samples-K.png`` (K: its rank); trials scored before galleries existed are left out."""
    out = []
    for k, t in enumerate(ranked, 1):
        store, ckpt_name = t["store"], t["best"]["checkpoint"]
        if store.has_gallery(ckpt_name):
            name = f"samples-{k}.png"
            (out_dir / name).write_bytes(store.storage.read_bytes(store.gallery_ref(ckpt_name)))
            out.append((t, name))
    return out


def run_report(uri: str, out: str, *, endpoint_url: Optional[str] = None, upload: bool = True,
               log: Callable[[str], None] = _log) -> dict:
    """Write ``report.md`` and the plots for the runs at or below ``uri`` into ``out`` (and ``uri/report/``)."""
    from pipelines.leaderboard import METRIC_LABELS, alpha_label, final_values, find_runs, plot_curves
    from store.storage import Storage

    storage = Storage(uri, endpoint_url=endpoint_url)
    runs = [s for s in find_runs(uri, endpoint_url) if "/tune/" not in s.uri]
    kind, trials, pipeline = _trials(storage, runs)
    rows_by_run = {t["uri"]: t["store"].read_rows() for t in trials}
    rows = [r for rs in rows_by_run.values() for r in rs if math.isfinite(r["value"])]
    finals = final_values(rows)  # the sida evaluate re-scores (finite), by (run, checkpoint, metric)
    if not rows:
        raise ConfigError(f"{storage.uri}: no scored checkpoint yet; nothing to report")
    metrics = sorted({r["metric"] for r in rows})
    metric_label = " / ".join(METRIC_LABELS.get(m, m) for m in metrics)
    for t in trials:
        live = [r for r in rows_by_run[t["uri"]] if r["kind"] == "live" and math.isfinite(r["value"])]
        t["scored"] = len(live)
        t["best"] = t["store"].best_live_row(rows=live)
        t["method"] = t["best"]["method"] if t["best"] else t["store"].read_config().get("method")
        t["final"] = finals.get((t["uri"], t["best"]["checkpoint"], t["best"]["metric"]), []) if t["best"] else []
        axes = ", ".join(f"{k}={_fmt(v)}" for k, v in t["axes"].items()) or t["name"]
        t["label"] = (f"{t['stage']}: " if t["stage"] else "") + axes
    by_uri = {t["uri"]: t for t in trials}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {}
    plots["fd_vs_kimg.png"] = plot_curves(
        rows, out_dir / "fd_vs_kimg.png", label=lambda r: by_uri[r["run_uri"]]["label"],
        title=f"{metric_label} vs kimg per trial ({storage.uri.rsplit('/', 1)[-1]})")
    plots["best_per_trial.png"] = plot_best(trials, out_dir / "best_per_trial.png", metric_label)
    if kind == "pipeline":
        offsets = {}
        for t in trials:
            lineage = t["store"].lineage()  # only runs that start from a generator have one
            if lineage and lineage.get("kimg") is not None:
                offsets[t["uri"]] = float(lineage["kimg"])
        plots["methods.png"] = plot_curves(
            rows, out_dir / "methods.png", kimg_offset=offsets,
            label=lambda r: " ".join(filter(None, (method_display(r["method"]), alpha_label(r),
                                                   f"({by_uri[r['run_uri']]['stage']})"))),
            title=" vs ".join(dict.fromkeys(method_display(r["method"]) for r in rows)))

    md = [f"# {kind.capitalize()} report: `{storage.uri}`", "",
          f"{len(trials)} run(s); metric {metric_label} (lower is better); made {time.strftime('%Y-%m-%d %H:%M:%S')} "
          f"by `sida report`.", ""]
    ranked = sorted([t for t in trials if t["best"]], key=lambda t: t["best"]["value"])
    if ranked:
        b = ranked[0]
        md += [f"**Best**: {b['label']} — {b['best']['metric']} {b['best']['value']:.4f} at {b['best']['kimg']:g} kimg "
               f"(`{b['best']['checkpoint']}`, run `{b['uri']}`).", ""]
    if kind == "pipeline":
        md += ["## Stages", "", "| stage | method | from | chosen checkpoint | score | content hash |",
               "|---|---|---|---|---|---|"]
        for name, st in pipeline["stages"].items():
            best = st.get("best") or {}
            shown = ", ".join(method_display(m) for m in st.get("methods") or [st.get("method")])
            md.append(f"| {name} | {shown} | "
                      f"{st.get('init_from') or 'teacher'} | `{best.get('uri', '—')}` | "
                      f"{best.get('value', float('nan')):.4f} | `{str(best.get('checkpoint_hash', ''))[:16]}` |")
        md += ["", "SiD²A lineage (each run's `lineage.json`: the checkpoint theta started from):", ""]
        for t in trials:
            lineage = t["store"].lineage()  # only runs that start from a generator have one
            if lineage:
                md.append(f"- `{t['label']}` ← `{lineage['uri']}` (hash `{lineage['content_hash'][:16]}`, "
                          f"{lineage.get('kimg')} kimg)")
        md.append("")
    best_of_method: dict[str, dict] = {}  # each method's trial with the lowest live score
    for t in sorted((t for t in trials if t["best"]), key=lambda t: t["best"]["value"]):
        best_of_method.setdefault(t["method"], t)
    if len(best_of_method) > 1:
        md += ["## Best per method", "", "Each method's lowest live score, and its checkpoint re-scored with fresh "
               "generation seeds (`sida evaluate --best`: mean ± sample std over n seeds) where that was run.", "",
               "| method | trial | best live | at kimg | re-scored (mean ± std, n) |", "|---|---|---|---|---|"]
        for m, t in best_of_method.items():
            md.append(f"| {method_display(m)} | {t['label']} | {t['best']['value']:.4f} | {t['best']['kimg']:g} | "
                      f"{_fmt_final(t['final'])} |")
        md.append("")
    md += ["## Trials", "", "| trial | method | axes | best | at kimg | checkpoint | re-scored | scored | state |",
           "|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(trials, key=lambda t: (t["stage"] or "", t["best"]["value"] if t["best"] else math.inf)):
        b = t["best"]
        state = t["state"] + (f": {t['reason']}" if t["reason"] else "")
        name = (t["stage"] + "/" if t["stage"] else "") + t["name"].rsplit("/", 1)[-1]
        axes = ", ".join(f"{k}={_fmt(v)}" for k, v in t["axes"].items())
        best = ("", "", "") if b is None else (f"{b['value']:.4f}", f"{b['kimg']:g}", f"`{b['checkpoint']}`")
        md.append(f"| {name} | {method_display(t['method'])} | {axes} | {best[0]} | {best[1]} | "
                  f"{best[2]} | {_fmt_final(t['final'])} | {t['scored']} | {state.replace('|', chr(92) + '|')} |")
    md += ["", "## Plots", ""]
    alpha_grid = any("alpha" in t["axes"] or "loss.alpha" in t["axes"] for t in trials)
    captions = {"fd_vs_kimg.png": f"{metric_label} vs kimg, one curve per trial"
                                  + (" (the paper's Figure 2 for an alpha grid)" if alpha_grid else ""),
                "best_per_trial.png": "best score per trial",
                "methods.png": "the methods side by side (Figures 4-5); a run that started from an earlier run's "
                               "generator (SiD²A) is drawn after the kimg it started from"}
    for name in plots:
        md += [f"![{captions[name]}]({name})", "", f"*{captions[name]}*", ""]
    samples = _samples(ranked[:MAX_GALLERIES], out_dir)
    if samples:
        md += ["## Samples", "", f"Each trial's best checkpoint: one-step samples of the same seeds (0 .. n-1, "
               f"`metric.gallery`) for every checkpoint of every run, so they compare by eye "
               f"(best {len(samples)} trial(s)).", "", "| trial | best | at kimg | samples |", "|---|---|---|---|"]
        for t, name in samples:
            md.append(f"| {t['label']} | {t['best']['value']:.4f} | {t['best']['kimg']:g} | ![{t['label']}]({name}) |")
        md.append("")
    (out_dir / "report.md").write_text("\n".join(md))
    files = ["report.md", *plots, *(name for _, name in samples)]
    if upload:
        for name in files:
            storage.upload_file(out_dir / name, f"report/{name}")
    log(f"report: {out_dir / 'report.md'}" + (f" (and {storage.uri_of('report/')})" if upload else ""))
    return {"uri": storage.uri, "kind": kind, "out": str(out_dir), "files": files, "runs": len(trials),
            "uploaded": storage.uri_of("report") if upload else None,
            "best": None if not ranked else {"trial": ranked[0]["label"], **{k: ranked[0]["best"][k] for k in
                                                                              ("checkpoint", "kimg", "metric", "value")}}}
