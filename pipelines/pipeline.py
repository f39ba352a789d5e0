"""``sida pipeline staged.yaml``: stages run in order (e.g. SiD, then SiD²A from SiD's best generator), each a
Ray Tune experiment in the same storage, resumable at the stage it was in.

Layout (``PIPELINE_URI = storage.uri / pipeline name``)::

    PIPELINE_URI/pipeline.json     the pipeline's state, rewritten atomically after each step: every stage's
                                   definition, whether it is done, its trials' outcomes and the checkpoint it
                                   chose (lowest live score over all its trials: run, checkpoint, pinned-copy URI,
                                   content hash, score)
    PIPELINE_URI/<stage>/          the stage's experiment: sweep layout (one run folder per trial, tune/)
    PIPELINE_URI/<stage>/<trial>/lineage.json   SiD²A trials: which checkpoint seeded theta (and its hash)

Run again on the same folder, a pipeline skips the stages that are done (their definitions must be unchanged)
and continues the one it was in (finished trials are not re-run, the others resume from their checkpoints).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Sequence

from schemas.loader import ConfigError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PipelineError(RuntimeError):
    """A stage cannot go on (e.g. the stage it starts from scored no checkpoint); the message says which."""


STATE_FILE = "pipeline.json"


def run_pipeline(path: str, overrides: Sequence[str] = (), *, stop_after: Optional[str] = None,
                 address: Optional[str] = None, log: Callable[[str], None] = _log) -> dict:
    """Run (or continue) the pipeline in ``path``; ``stop_after``: end after this stage (it is recorded done)."""
    from pipelines.sweep import best_of, connect_for, run_experiment, storage_root
    from store.run_store import RunStore
    from store.storage import Storage
    from pipelines.checks import check_before_writes, check_references
    from schemas.sweep import load_pipeline, parse_overrides, plan_trials

    t0 = time.time()
    pipe, base, _ = load_pipeline(path)
    names = [st.name for st in pipe.stages]
    if stop_after is not None and stop_after not in names:
        raise ConfigError(f"--stop-after {stop_after!r}: no such stage in {path} (stages: {', '.join(names)})")
    ov = parse_overrides(overrides)
    root = storage_root(base, [pipe.set, ov])
    proot = root.child(pipe.name)
    plans = {st.name: plan_trials(st, base, source=str(path), storage_uri=proot.child(st.name).uri,
                                  layers=[pipe.set, ov, st.set], method=st.method) for st in pipe.stages}
    for p in (p for stage in plans.values() for p in stage):  # before the pipeline's state or any trial is written
        check_before_writes(p.cfg, address)
    check_references([p.cfg for stage in plans.values() for p in stage])
    root.check()
    try:
        state = proot.read_json(STATE_FILE)
    except FileNotFoundError:
        state = {"name": pipe.name, "file": str(path), "stages": {}, "current": None, "created": time.time()}
    for st in pipe.stages:
        done = state["stages"].get(st.name)
        if done and done.get("state") == "done" and done.get("stage") != st.model_dump(mode="json"):
            raise ConfigError(f"{proot.uri}: stage {st.name!r} is done with a different definition than in {path}; "
                              f"use another pipeline name (or storage) for a changed pipeline")
    todo = [st for st in pipe.stages if state["stages"].get(st.name, {}).get("state") != "done"]
    log(f"pipeline {proot.uri}: stages {', '.join(names)}; "
        + (f"continuing at {todo[0].name}" if todo and len(todo) < len(names) else "nothing left to do" if not todo
           else f"starting at {todo[0].name}"))
    started = connect_for([p for st in todo for p in plans[st.name]] or plans[names[0]], pipe.trial_cpus,
                          max((st.max_concurrent_trials or 1) for st in pipe.stages), address) if todo else False
    try:
        for st in todo:
            state["current"] = st.name
            proot.write_json(STATE_FILE, state)
            lineage = None
            if st.init_from is not None:
                src = state["stages"][st.init_from].get("best")
                if src is None:
                    raise PipelineError(f"pipeline {proot.uri}: stage {st.name!r} starts from stage {st.init_from!r}'s "
                                        f"best checkpoint, but no checkpoint of {st.init_from!r} was scored")
                for plan in plans[st.name]:
                    plan.cfg.init_generator = src["uri"]
                lineage = {"stage": st.init_from, "source_run": src["run_uri"], "checkpoint": src["checkpoint"],
                           "metric": src["metric"], "value": src["value"]}
                log(f"pipeline: stage {st.name} starts from {src['uri']} ({src['metric']} {src['value']:.4f})")
            log(f"pipeline: stage {st.name}: {len(plans[st.name])} trial(s)")
            outcomes = run_experiment(plans[st.name], st, proot.child(st.name), trial_cpus=pipe.trial_cpus,
                                      lineage=lineage, log=log)
            best = best_of(outcomes)
            if best is not None:
                store = RunStore(Storage(best["run_uri"], endpoint_url=root.endpoint_url))
                best["uri"] = store.storage.uri_of(store.checkpoint_ref(best["checkpoint"]))
            state["stages"][st.name] = {"state": "done", "stage": st.model_dump(mode="json"), "method": st.method,
                                        "methods": st.methods(),
                                        "init_from": st.init_from, "best": best, "outcomes": outcomes,
                                        "finished": time.time()}
            state["current"] = None
            proot.write_json(STATE_FILE, state)  # atomic: a stage is done once this lands
            log(f"pipeline: stage {st.name} done; best: " + (f"{best['trial']} {best['checkpoint']} "
                                                             f"{best['metric']} {best['value']:.4f}" if best else "none"))
            if st.name == stop_after:
                break
    finally:
        if started:
            import ray

            ray.shutdown()
    return {"pipeline_uri": proot.uri, "current": state["current"],
            "done": [n for n in names if state["stages"].get(n, {}).get("state") == "done"],
            "best": {n: s.get("best") for n, s in state["stages"].items()}, "seconds": round(time.time() - t0, 1)}
