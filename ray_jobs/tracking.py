"""Mirror a run's rows into TensorBoard, MLflow and Weights & Biases (``logging:`` in the run config).

Storage stays the record: the workers' metric rows (``metrics/part-NIMG.parquet``: losses, images/s, stage) and
the scorers' leaderboard rows (``leaderboard/KEY.parquet``) are copied by one driver-side :class:`Tracker` thread
every ``logging.every_s`` seconds, each point at its own ``cur_nimg``: a loss at the step that computed it and a
score at its *checkpoint's* images, however late it arrived (Ray's logger callbacks log a result when it is
reported, so an asynchronous score would land at the wrong step, and Train V2 runs have no logger callbacks at
all; the Tune trials of a sweep keep Tune's own TensorBoard files next to these). The same thread serves
``sida train``, ``sida distill`` and each sweep trial, so every entry point logs the same series.

Restarts never duplicate points: TensorBoard gets one event file per tracker session, replayed in full from storage
(older sessions' files are deleted once it is uploaded); MLflow and W&B skip (key, step) pairs the run already has.
Series: ``train/<column>`` (``train/stage``: the index of :class:`sida_core.methods.base.Stage`), ``score/<metric>``
for live scores, ``eval/<metric>/seed<N>`` for ``sida evaluate``'s re-scores.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ray_jobs.scoring import _one_line
from schemas.loader import ConfigError
from store.run_store import RunStore

Point = tuple[str, float, int]  # (series, value, cur_nimg)
NOT_SERIES = ("step", "cur_nimg", "kimg", "time")  # counters: the step axis itself


def metric_points(row: dict) -> list[Point]:
    """The series of one metric row: every finite number but the counters, and the stage as its index."""
    from sida_core.methods.base import Stage

    step, out = int(row["cur_nimg"]), []
    for key, value in row.items():
        if key in NOT_SERIES or value is None:
            continue
        if key == "stage":
            names = [s.value for s in Stage]
            if value in names:
                out.append(("train/stage", float(names.index(value)), step))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out.append((f"train/{key}", float(value), step))
    return out


def score_points(row: dict) -> list[Point]:
    """A leaderboard row as one point at its checkpoint's ``cur_nimg``."""
    if row["kind"] == "live":
        return [(f"score/{row['metric']}", float(row["value"]), int(row["cur_nimg"]))]
    return [(f"eval/{row['metric']}/seed{row['seed']}", float(row["value"]), int(row["cur_nimg"]))]


PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}  # logging.<field>: (module, what to pip install)


def check_logging(logging_cfg) -> None:
    """Refuse, in one line, a ``logging`` section whose package is not installed: called by every entry point before
    it writes a run folder or starts Ray (the sinks themselves are made later, once training starts)."""
    import importlib.util

    wanted = {"tensorboard": logging_cfg.tensorboard, "mlflow": logging_cfg.mlflow is not None,
              "wandb": logging_cfg.wandb is not None}
    for field, on in wanted.items():
        module, pip = PACKAGES[field]
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.{field} needs the {module} package: pip install {pip}")


def run_params(config: dict) -> dict[str, str]:
    """The run's hyper-parameters as flat strings (MLflow params / W&B config): the method, losses, optimizer,
    batch, EMA, stages and seed; storage (credentials) and paths of data stay out."""
    out = {"method": str(config.get("method")), "seed": str(config.get("seed")),
           "total_kimg": str(config.get("total_kimg")), "init_generator": str(config.get("init_generator"))}
    for section in ("loss", "stages", "optimizer", "batch", "ema", "scaling"):
        for key, value in (config.get(section) or {}).items():
            out[f"{section}.{key}"] = str(value)
    out["teacher.path"] = str((config.get("teacher") or {}).get("path"))
    return out


class TensorBoardSink:
    """A TensorBoard event file (tensorboardX's synchronous writer: a flush means every point is on disk, which its
    queued ``SummaryWriter`` does not promise) written locally and uploaded to ``RUN/tensorboard/`` after each sync."""

    def __init__(self, store: RunStore):
        from tensorboardX.event_file_writer import EventsWriter

        self.store = store
        self.tmp = tempfile.TemporaryDirectory(prefix="sida-tb-")
        self.writer = EventsWriter(os.path.join(self.tmp.name, "events"), ".sida")
        self.path = next(Path(self.tmp.name).glob("events.out.tfevents.*"))
        self.dirty = True  # the file-version header

    def write(self, points: list[Point]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        for key, value, step in points:
            self.writer.write_event(Event(wall_time=time.time(), step=step, summary=scalar(key, value)))
        self.dirty = self.dirty or bool(points)

    def flush(self) -> None:
        if not self.dirty:
            return
        self.writer.flush()
        self.store.storage.upload_file(self.path, f"tensorboard/{self.path.name}")
        for old in self.store.storage.listdir("tensorboard"):  # earlier sessions: this file replays them in full
            if old != self.path.name and "tfevents" in old:
                self.store.storage.delete(f"tensorboard/{old}")
        self.dirty = False

    def close(self, state: Optional[str]) -> None:
        self.flush()
        self.writer.close()
        self.tmp.cleanup()


class MlflowSink:
    """One MLflow run per run folder (found again by its ``sida.run_uri`` tag, so a resumed run continues it)."""

    STATES = {"finished": "FINISHED", "diverged": "FAILED", "failed": "FAILED", "stopped": "KILLED"}

    def __init__(self, store: RunStore, cfg, config: dict):
        if cfg.tracking_uri.startswith("file:") or "://" not in cfg.tracking_uri:
            # MLflow 3 keeps its file store only on request; an offline folder is what logging.mlflow promises
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=cfg.tracking_uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`sida.run_uri` = '{store.uri}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
        else:
            run = client.create_run(experiment_id, run_name=store.name,
                                    tags={"sida.run_uri": store.uri, "sida.method": str(config.get("method"))})
            self.run_id = run.info.run_id
            params = [Param(k, v[:500]) for k, v in run_params(config).items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i:i + 100])
        self.logged: dict[str, set[int]] = {}

    def _steps(self, key: str) -> set[int]:
        if key not in self.logged:
            self.logged[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self.logged[key]

    def write(self, points: list[Point]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        new = [(k, v, s) for k, v, s in points if s not in self._steps(k)]
        for i in range(0, len(new), 1000):
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, s) for k, v, s in new[i:i + 1000]])
        for k, _, s in new:
            self.logged[k].add(s)

    def flush(self) -> None:
        pass

    def close(self, state: Optional[str]) -> None:
        if state in self.STATES:
            self.client.set_terminated(self.run_id, status=self.STATES[state])


class WandbSink:
    """Weights & Biases through its own client (untested here: no wandb package or account offline). Points are
    logged with ``cur_nimg`` as the x-axis metric, so late scores land at their checkpoint's images."""

    def __init__(self, store: RunStore, cfg, config: dict):
        import wandb

        run_id = hashlib.sha256(store.uri.encode()).hexdigest()[:16]  # the same W&B run when the run resumes
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group, mode=cfg.mode, id=run_id,
                              name=store.name, resume="allow", config=run_params(config), reinit=True)
        self.run.define_metric("cur_nimg")
        self.run.define_metric("*", step_metric="cur_nimg")

    def write(self, points: list[Point]) -> None:
        for key, value, step in points:
            self.run.log({key: value, "cur_nimg": step})

    def flush(self) -> None:
        pass

    def close(self, state: Optional[str]) -> None:
        self.run.finish(exit_code=0 if state in (None, "finished") else 1)


class Tracker:
    """Copies a run's new metric and leaderboard rows into the configured sinks, from a background thread.

    ``sync()`` is also callable directly (tests, ``close``). A sink that fails (a tracking server down) logs one line
    per sync and is retried at the next; training never waits for it."""

    def __init__(self, store: RunStore, logging_cfg, config: dict, log: Callable[[str], None] = print):
        self.store, self.cfg, self.log = store, logging_cfg, log
        makers: list[tuple[str, Callable[[], Any]]] = []
        if logging_cfg.tensorboard:
            makers.append(("tensorboard", lambda: TensorBoardSink(store)))
        if logging_cfg.mlflow is not None:
            makers.append(("mlflow", lambda: MlflowSink(store, logging_cfg.mlflow, config)))
        if logging_cfg.wandb is not None:
            makers.append(("wandb", lambda: WandbSink(store, logging_cfg.wandb, config)))
        self.makers = dict(makers)
        self.sinks: list[Any] = [None] * len(makers)  # a sink whose service is down at start is made at a later sync
        self.pending: list[list[Point]] = [[] for _ in makers]  # points a sink has not taken yet
        check_logging(logging_cfg)  # the entry points checked already, before writing; this guards direct use
        self._connect()
        self.parts: set[str] = set()
        self.rows: set[str] = set()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _connect(self) -> None:
        for i, (name, make) in enumerate(self.makers.items()):
            if self.sinks[i] is None:
                try:
                    self.sinks[i] = make()
                except Exception as exc:  # noqa: BLE001 -- a tracking server down: train anyway, retry at each sync
                    self.log(f"logging: {name} unavailable, retried at the next sync ({_one_line(exc)})")

    @classmethod
    def for_run(cls, store: RunStore, cfg, log: Callable[[str], None] = print) -> Optional["Tracker"]:
        """A tracker for ``cfg.logging``, or None when no mirror is configured."""
        if not cfg.logging.enabled:
            return None
        from ray_jobs.train import public_config

        return cls(store, cfg.logging, public_config(cfg), log)

    def sync(self) -> int:
        """Copy the rows written since the last sync; returns how many points were new."""
        points: list[Point] = []
        for name in sorted(set(self.store.metric_parts()) - self.parts):
            try:
                points += metric_points(self.store.read_metric_part(name))
            except FileNotFoundError:
                continue
            self.parts.add(name)
        for key in sorted(self.store.row_keys() - self.rows):
            try:
                points += score_points(self.store.read_row(key))
            except FileNotFoundError:
                continue
            self.rows.add(key)
        self._connect()
        for i, sink in enumerate(self.sinks):
            self.pending[i] += points
            if sink is None:
                continue
            try:
                sink.write(self.pending[i])
                sink.flush()
                self.pending[i] = []
            except Exception as exc:  # noqa: BLE001 -- a mirror must never end the run; the next sync retries
                self.log(f"logging: {type(sink).__name__} unavailable this sync ({_one_line(exc)})")
        return len(points)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.every_s):
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 -- storage hiccup: the next sync retries
                self.log(f"logging: storage unavailable this sync ({_one_line(exc)})")

    def start(self) -> "Tracker":
        self._thread = threading.Thread(target=self._loop, name="sida-tracker", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, copy what is left and close the sinks (an MLflow run ends with the run's state)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sync()
            state = (self.store.read_status() or {}).get("state")
        except Exception as exc:  # noqa: BLE001
            self.log(f"logging: last sync failed ({_one_line(exc)})")
            state = None
        for sink in self.sinks:
            try:
                if sink is not None:
                    sink.close(state)
            except Exception as exc:  # noqa: BLE001
                self.log(f"logging: closing {type(sink).__name__} failed ({_one_line(exc)})")
