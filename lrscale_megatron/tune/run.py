"""Run the ladder sweep (local worker processes or a SLURM array) and widen its LR grid at an edge.

The ladder lives in ``OUT/ladder.json`` (``configs/sweep`` format) and its results in
``OUT/sweep.sqlite``, written only by this (head) process and its local workers: the crash-safe store
of ``lrscale sweep`` (resumable; runs killed with ``kill -9`` are reset and redone; finished runs are
never run twice). Under ``launcher: slurm`` the compute nodes never touch that database: each run
writes its own result file, merged here (:mod:`lrscale_megatron.tune.filestore`).

Edge extension: when a proxy's lowest loss sits at the smallest or largest LR of the grid (and that
LR did not diverge), the optimum is not bracketed; the grid is widened by one step on that side for
every proxy (so the ladder stays one ``configs/sweep`` grid), up to ``ladder.extend`` times.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lrscale_megatron.sweep.cli import load_sweep_config, prepare_data, usable_cores

logger = logging.getLogger(__name__)

LADDER_FILE = "ladder.json"


def write_ladder(sweep: dict[str, Any], out_dir: Path) -> Path:
    """Write the ladder sweep config (its store is ``OUT/sweep.sqlite``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / LADDER_FILE
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**sweep, "store": "sweep.sqlite"}, indent=2) + "\n")
    tmp.replace(p)
    return p


def run_local(ladder_path: Path, workers: int, progress: bool = True) -> None:
    """Every run of the ladder not yet done, in ``workers`` local processes, into its store."""
    from lrscale_megatron.sweep.megatron import gpt_train_fn
    from lrscale_megatron.sweep.runner import run_sweep

    sc = load_sweep_config(ladder_path)
    n = max(1, min(workers, usable_cores()))
    prepare_data(sc.settings, sc.grid.seq_len)
    summary = run_sweep(
        sc.store,
        sc.grid.expand(),
        functools.partial(gpt_train_fn, settings=sc.settings),
        workers=n,
        progress=progress,
    )
    logger.info(
        "ladder sweep: %d/%d finished, %d diverged, %d failed, %d already done",
        summary.finished,
        summary.total,
        summary.diverged,
        summary.failed,
        summary.skipped,
    )
    if summary.failed:
        raise RuntimeError(
            f"{summary.failed} ladder run(s) failed (errors in {sc.store}, table runs); "
            "fix: see the logged tracebacks, then re-run `lrscale tune` (finished runs are kept)"
        )


def edge_sides(store: Path, loss: str) -> set[str]:
    """``{"low", "high"}`` subset: grid edges where some proxy's lowest finite loss sits."""
    from lrscale_megatron.law.data import load_store
    from lrscale_megatron.law.optimum import group_curves

    sides: set[str] = set()
    for c in group_curves(load_store(store, loss)):
        y = np.asarray(c.loss)
        if len(y) < 3 or not np.isfinite(y).any():
            continue
        i = int(np.argmin(y))
        if i == 0:
            sides.add("low")
        elif i == len(y) - 1:
            sides.add("high")
    return sides


def widen(grid: dict[str, Any], sides: set[str]) -> dict[str, Any]:
    """The grid with one more LR (same spacing) on each side in ``sides``; existing LRs unchanged."""
    g = dict(grid)
    step = math.log(g["lr_max"] / g["lr_min"]) / (g["n_lr"] - 1)
    if "low" in sides:
        g["lr_min"] = g["lr_min"] * math.exp(-step)
        g["n_lr"] += 1
    if "high" in sides:
        g["lr_max"] = g["lr_max"] * math.exp(step)
        g["n_lr"] += 1
    return g


def sweep_ladder(
    out_dir: Path,
    launch: Callable[[Path], None],
    extend: int,
    loss: str,
) -> list[str]:
    """Run the ladder with ``launch(ladder_path)``, widening the LR grid at edges up to ``extend`` times.

    Returns a note per widening (for the prediction's provenance).
    """
    ladder_path = out_dir / LADDER_FILE
    notes: list[str] = []
    for k in range(extend + 1):
        launch(ladder_path)
        raw = json.loads(ladder_path.read_text())
        grid = raw["grid"]
        if "lr_center" in grid or k == extend:
            break
        sides = edge_sides(out_dir / "sweep.sqlite", loss)
        if not sides:
            break
        before = load_sweep_config(ladder_path).grid.expand()
        raw["grid"] = widen(grid, sides)
        write_ladder(raw, out_dir)
        after = load_sweep_config(ladder_path).grid.expand()
        kept = {json.dumps(c, sort_keys=True) for c in before} <= {
            json.dumps(c, sort_keys=True) for c in after
        }
        if not kept:  # never silently re-run: the widened grid must contain every earlier run
            raise RuntimeError("widening the LR grid changed existing LRs; fix: report this bug")
        msg = (
            f"a proxy's best LR sat at the {' and '.join(sorted(sides))} edge of the grid: widened to "
            f"[{raw['grid']['lr_min']:.4g}, {raw['grid']['lr_max']:.4g}] with {raw['grid']['n_lr']} LRs"
        )
        logger.warning("tune: %s", msg)
        notes.append(msg)
    return notes
