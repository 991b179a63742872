"""Run tables: one row per training run (shape, tokens, batch, peak LR, final loss).

Two sources: the Step Law release CSV (Li et al. 2025, arXiv 2503.04715, columns documented in
``shared/data/steplaw/README.md`` beside the checkout) and the project's own sweep store
(:mod:`lrscale_megatron.sweep.store`). Both give the same :class:`RunTable`.

Units: ``params`` = non-embedding parameters, ``tokens`` = training tokens, ``batch_tokens`` =
tokens per optimizer step (sequences * sequence length), ``lr`` = peak learning rate.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Predictor names understood by the fit; ``batch`` is read from ``RunTable.batch_tokens``.
PREDICTORS: tuple[str, ...] = ("width", "depth", "params", "tokens", "batch")

#: Step Law CSV columns this loader needs (name in file -> meaning).
STEPLAW_COLUMNS: dict[str, str] = {
    "h": "hidden size (width)",
    "numl": "layers (depth)",
    "N": "non-embedding parameters",
    "D": "training tokens",
    "bs": "batch size in sequences",
    "lr": "peak learning rate",
    "smooth loss": "smoothed final training loss",
}


class DataError(ValueError):
    """Input data is missing a column or holds an invalid value; the message names both."""


@dataclass(frozen=True)
class RunTable:
    """Finished runs, column-wise. All columns have one entry per run and hold positive finite floats.

    Attributes:
        width: hidden size.
        depth: number of transformer layers.
        params: non-embedding parameter count.
        tokens: training tokens.
        batch_tokens: tokens per optimizer step.
        lr: peak learning rate.
        loss: final (smoothed) loss used to locate the optimum; lower is better. ``+inf`` marks a run
            that *diverged* (NaN/Inf loss): worse than any finite loss, so an optimum just below the
            divergence LR is bracketed by it rather than mistaken for a grid edge.
        source: where the rows came from (path), for provenance.
        loss_kind: ``"val"`` or ``"train"``: which loss every row holds (never mixed), or ``"mixed"``
            only for tables built by hand.
    """

    width: np.ndarray
    depth: np.ndarray
    params: np.ndarray
    tokens: np.ndarray
    batch_tokens: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    source: str = field(default="")
    loss_kind: str = field(default="train")

    def __post_init__(self) -> None:
        n = None
        for name in ("width", "depth", "params", "tokens", "batch_tokens", "lr", "loss"):
            arr = np.asarray(getattr(self, name), dtype=float).reshape(-1)
            if n is None:
                n = arr.size
            if arr.size != n:
                raise DataError(
                    f"RunTable.{name}: has {arr.size} entries but 'width' has {n}; fix: give every column one entry per run"
                )
            finite = np.isfinite(arr) | ((arr == np.inf) if name == "loss" else False)
            bad = ~finite | (arr <= 0)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"RunTable.{name}: row {i} is {arr[i]!r}; fix: every {name} must be a positive finite number"
                )
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.lr.size)

    def column(self, predictor: str) -> np.ndarray:
        """Values of a predictor by its fit name (``batch`` -> ``batch_tokens``)."""
        if predictor == "batch":
            return self.batch_tokens
        if predictor in ("width", "depth", "params", "tokens"):
            return getattr(self, predictor)
        raise DataError(f"predictor {predictor!r} is not a RunTable column; fix: use one of {PREDICTORS}")

    def subset(self, mask: np.ndarray) -> RunTable:
        """Rows where ``mask`` is true."""
        cols = {
            n: getattr(self, n)[mask]
            for n in ("width", "depth", "params", "tokens", "batch_tokens", "lr", "loss")
        }
        return RunTable(**cols, source=self.source, loss_kind=self.loss_kind)


def _positive(value: str, row: int, column: str, path: Path) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x <= 0:
        raise DataError(
            f"{path}: row {row}, column {column!r} ({STEPLAW_COLUMNS[column]}) is {value!r}; "
            "fix: it must be a positive finite number"
        )
    return x


def load_steplaw_csv(path: str | Path, seq_len: int = 2048) -> RunTable:
    """Load the Step Law release CSV (``dense_lr_bs_loss.csv`` format).

    ``batch_tokens = bs * seq_len``; the optimum is located on column ``smooth loss``.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"steplaw csv: file {str(p)!r} does not exist; fix: pass --steplaw-csv PATH to the CSV"
        )
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in STEPLAW_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{p}: missing column {missing[0]!r} ({STEPLAW_COLUMNS[missing[0]]}); found columns {header}; "
                "fix: use the Step Law dense_lr_bs_loss.csv format"
            )
        cols: dict[str, list[float]] = {c: [] for c in STEPLAW_COLUMNS}
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            for c in STEPLAW_COLUMNS:
                cols[c].append(_positive(row[c], i, c, p))
    if not cols["lr"]:
        raise DataError(f"{p}: no data rows; fix: pass a CSV with at least one run")
    bs = np.asarray(cols["bs"])
    table = RunTable(
        width=np.asarray(cols["h"]),
        depth=np.asarray(cols["numl"]),
        params=np.asarray(cols["N"]),
        tokens=np.asarray(cols["D"]),
        batch_tokens=bs * seq_len,
        lr=np.asarray(cols["lr"]),
        loss=np.asarray(cols["smooth loss"]),
        source=str(p),
    )
    logger.info("loaded %d Step Law runs from %s", len(table), p)
    return table


def load_store(db_path: str | Path, loss: str = "val") -> RunTable:
    """Finished and diverged runs of a sweep store (:class:`lrscale_megatron.sweep.store.SweepStore`).

    ``loss="val"`` uses the final validation loss; ``loss="train"`` the final train loss. Train and
    validation losses are never mixed: with ``"val"``, a finished run without a validation loss is a
    :class:`DataError` naming it (fix: ``loss="train"``, or re-run it with evaluations). A diverged run
    (NaN/Inf loss, see :data:`lrscale_megatron.sweep.store.DIVERGED_PREFIX`) gets ``loss = +inf``.
    """
    from lrscale_megatron.sweep.store import SweepStore  # local: keeps law/ importable alone

    if loss not in ("val", "train"):
        raise DataError(f"load_store: loss={loss!r}; fix: use 'val' or 'train'")
    p = Path(db_path)
    if not p.is_file():
        raise DataError(
            f"sweep store: file {str(p)!r} does not exist; fix: pass --store PATH to a sweep database"
        )
    rows: dict[str, list[float]] = {
        k: [] for k in ("width", "depth", "params", "tokens", "batch_tokens", "lr", "loss")
    }
    store = SweepStore(p)
    try:
        runs = [r for r in store.runs() if r.done]
        for run in runs:
            cfg = run.config
            for key in ("width", "depth", "params", "tokens", "batch_tokens", "lr"):
                if key not in cfg:
                    raise DataError(
                        f"{p}: run {run.run_id} config has no field {key!r}; fix: sweep configs must set {key}"
                    )
                rows[key].append(float(cfg[key]))
            if run.diverged:
                rows["loss"].append(math.inf)
                continue
            value = run.final_val_loss if loss == "val" else run.final_train_loss
            if value is None:
                kind = "validation" if loss == "val" else "train"
                raise DataError(
                    f"{p}: run {run.run_id} (lr={cfg['lr']}) has no final {kind} loss; train and validation "
                    "losses are never mixed in one curve; fix: "
                    + (
                        "use loss='train' (lrscale fit --loss train) or re-run it with evaluations"
                        if loss == "val"
                        else "train_fn must return final_train_loss"
                    )
                )
            rows["loss"].append(float(value))
    finally:
        store.close()
    if not rows["lr"]:
        raise DataError(f"{p}: no finished runs; fix: run the sweep first")
    n_div = sum(1 for v in rows["loss"] if v == math.inf)
    if n_div:
        logger.info("%s: %d diverged run(s) kept as loss=+inf", p, n_div)
    return RunTable(**{k: np.asarray(v) for k, v in rows.items()}, source=str(p), loss_kind=loss)
