"""One leaderboard row: a score of one checkpoint, as stored in ``RUN_URI/leaderboard/*.parquet``.

The pydantic model is the single source of truth; the Parquet schema is derived from it, so readers of
older and newer rows agree on names and types.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

RowKind = Literal["live", "final"]  # live: scored during training; final: `sida evaluate` re-scores


# metrics whose larger values are better (the rest, distances, rank lowest first): the schema's copy of
# sida_core.metrics.catalog's higher_is_better (tests/test_metrics.py checks the two agree)
HIGHER_IS_BETTER = frozenset({"precision_digits", "recall_digits", "precision_inception", "recall_inception",
                              "is_inception"})


def rank_value(metric: str, value: float) -> float:
    """A row's value as a sort key where lower is better, whichever way its metric points."""
    return -value if metric in HIGHER_IS_BETTER else value


def row_key(checkpoint: str, metric: str, kind: str, seed: int) -> str:
    """File stem of a row: one file per (checkpoint, metric, kind, seed), so a retried write replaces it."""
    return f"{checkpoint}-{metric}-{kind}-s{seed}"


class LeaderboardRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run: str                      # run name (the run folder's name)
    run_uri: str
    trial: Optional[str] = None   # Tune trial / sweep point, if any
    config_summary: str           # e.g. "sida alpha=1.2 lambda_sid=100 lambda_adv_theta=0.01 ..."
    method: str
    alpha: float
    lambda_sid: float
    lambda_adv_theta: float
    lambda_adv_psi: float
    lr_theta: float
    lr_psi: float
    init_generator: Optional[str] = None  # SiD²A lineage: the SiD checkpoint theta started from
    checkpoint: str               # checkpoint folder name, e.g. ckpt-000000020480
    checkpoint_uri: str
    checkpoint_hash: str          # the checkpoint manifest's content hash
    kimg: float
    cur_nimg: int
    metric: str                   # sida_core/metrics/catalog.py: fd_digits, fid_inception, kid_inception, ...
    value: float
    num_images: int
    seed: int
    kind: RowKind = "live"
    reference: str                # where the reference statistics came from
    extractor_id: str
    protocol: Optional[str] = None  # clean-fid resizing mode of the score (clean / legacy_tensorflow); None: older rows
    scorer: str = ""              # host:pid of the scorer that wrote the row
    seconds: float = 0.0          # time to load, generate and score
    time: float                   # unix time the row was written

    def key(self) -> str:
        return row_key(self.checkpoint, self.metric, self.kind, self.seed)


def parquet_schema():
    """The Parquet schema of :class:`LeaderboardRow` (nullable where the model allows None)."""
    import typing

    import pyarrow as pa

    types = {str: pa.string(), float: pa.float64(), int: pa.int64()}
    fields = []
    for name, f in LeaderboardRow.model_fields.items():
        args = [a for a in typing.get_args(f.annotation) if a is not type(None)] or [f.annotation]
        base = args[0] if args[0] in types else str  # Literal[...] -> string
        fields.append(pa.field(name, types[base], nullable=type(None) in typing.get_args(f.annotation)))
    return pa.schema(fields)
