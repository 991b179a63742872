"""``lrscale sweep CONFIG``: run an LR sweep of real megatron-core GPT pretraining runs into a store.

    lrscale sweep configs/sweep/cpu-sweep.json                      # resumable; re-run to finish
    lrscale sweep configs/sweep/cpu-sweep.json --workers 1 --store /tmp/s.sqlite
    lrscale sweep configs/sweep/cpu-sweep.json --dry-run            # list the runs and the store state
    lrscale sweep configs/sweep/cpu-sweep.json --csv out.csv        # also export finished runs

Sweep config (JSON; keys starting with ``_`` are comments; paths relative to the config file)::

    {
      "store": "../../data/sweeps/cpu-sweep.sqlite",
      "csv": "../../data/sweeps/cpu-sweep.csv",                  # optional export after the sweep
      "workers": 2,                                                # worker processes (capped by cores)
      "base_config": "../gpt/cpu-tiny.json",
      "grid": {"widths": [32, 48, 64], "depths": [1, 2], "token_budgets": [65536, 131072],
               "batch_tokens": [512, 1024], "lr_min": 1e-3, "lr_max": 1e-1, "n_lr": 7, "seq_len": 64,
               "base": {"seed": 0}},
      # or per-group LR grids centred on a prior law (a pilot's fit), n_lr LRs over a factor lr_span:
      #   "lr_center": {"law": "pilot-law.json"}   (or {"coefficient": c, "exponents": {"width": a, ...}}),
      #   "lr_span": 8
      "train": {"head_dim": 16, "warmup_fraction": 0.05, "evals": 4, "eval_batches": 4, "threads": 1,
                "overrides": []}
    }

    (``"tokens_per_param": t`` with ``"token_budgets": []`` gives each shape ``t x 12 L h^2`` tokens.)
    The file is validated by :class:`lrscale_megatron.sweep.config.SweepFile` (pydantic; errors name
    the field path, the value and the fix).

Each worker process starts its own single-process gloo group on a free port and trains runs one after
another (:mod:`lrscale_megatron.sweep.megatron`). The corpus is prepared once, before the workers start.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from lrscale_megatron.sweep.config import (  # noqa: F401  (re-exported: the config API lives there)
    SweepConfig,
    SweepConfigError,
    load_sweep_config,
    parse_sweep_config,
)
from lrscale_megatron.sweep.megatron import GPTSweepSettings, gpt_train_fn, shift_losses
from lrscale_megatron.sweep.runner import run_sweep
from lrscale_megatron.sweep.store import SweepStore

logger = logging.getLogger(__name__)


def usable_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_data(settings: GPTSweepSettings, seq_len: int) -> None:
    """Prepare (tokenize, cache) the base config's corpus once, before worker processes start."""
    from lrscale_megatron.data import prepare_corpus
    from lrscale_megatron.train.config import load_config

    cfg = load_config(settings.base_config, list(settings.overrides))
    d = cfg.data
    if d.corpus is None or cfg.model.arch == "vit":  # the ViT's digits ship with scikit-learn
        return
    prepare_corpus(
        d.corpus,
        vocab_size=d.tokenizer_vocab_size,
        out_dir=d.data_dir,
        seq_length=seq_len,
        tokenizer=d.tokenizer,
        shift=d.shift,
        max_documents=d.max_documents,
    )


CSV_COLUMNS = (
    "run_id",
    "width",
    "depth",
    "params",
    "tokens",
    "batch_tokens",
    "seq_len",
    "lr",
    "final_train_loss",
    "final_val_loss",
    "shift_loss",
    "wall_clock_s",
    "energy_j",
    "attempts",
)


def export_csv(store_path: str | Path, out: str | Path) -> Path:
    """Finished runs of a store as CSV (one row per run; energy empty = unavailable)."""
    store = SweepStore(store_path)
    try:
        runs = store.finished_runs()
    finally:
        store.close()
    shift = shift_losses(store_path)
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in runs:
            c = r.config
            w.writerow(
                [
                    r.run_id,
                    c.get("width"),
                    c.get("depth"),
                    c.get("params"),
                    c.get("tokens"),
                    c.get("batch_tokens"),
                    c.get("seq_len"),
                    c.get("lr"),
                    r.final_train_loss,
                    r.final_val_loss,
                    shift.get(r.run_id, ""),
                    r.wall_clock_s,
                    "" if r.energy_j is None else r.energy_j,
                    r.attempts,
                ]
            )
    return p


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to an ``argparse`` subparsers object (handler in ``func``)."""
    s = subparsers.add_parser("sweep", help="run an LR sweep of GPT pretraining runs into a sweep store")
    s.add_argument("config", help="sweep config JSON (configs/sweep/*.json)")
    s.add_argument("--store", default=None, help="store path (default: the config's 'store')")
    s.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: the config's, capped by cores)"
    )
    s.add_argument(
        "--csv", default=None, help="export finished runs to this CSV (default: the config's 'csv')"
    )
    s.add_argument("--dry-run", action="store_true", help="print the runs and store state; train nothing")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=run_sweep_cli)


def run_sweep_cli(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Handler of ``lrscale sweep``: 0 when every run finished, 1 when some failed, 2 on input errors."""
    try:
        sc = load_sweep_config(args.config)
    except (SweepConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store_path = Path(args.store) if args.store else sc.store
    settings = sc.settings
    if args.store:
        settings = GPTSweepSettings(**{**settings.__dict__, "shift_log": str(store_path)})
    configs = sc.grid.expand()
    requested = args.workers if args.workers is not None else sc.workers
    workers = max(1, min(requested, usable_cores()))
    if workers < requested:
        logger.warning("workers=%d capped at %d usable cores", requested, workers)
    if args.dry_run:
        from lrscale_megatron.sweep.store import run_id

        states: dict[str, str] = {}
        if store_path.is_file():
            store = SweepStore(store_path)
            try:
                states = {r.run_id: r.state for r in store.runs()}
            finally:
                store.close()
        n_done = sum(states.get(run_id(c)) == "finished" for c in configs)
        print(f"{len(configs)} runs ({n_done} finished in {store_path}); {workers} worker(s)", file=out)
        for c in configs:
            print(json.dumps(c, sort_keys=True), states.get(run_id(c), "new"), file=out)
        return 0
    try:
        prepare_data(settings, sc.grid.seq_len)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    summary = run_sweep(
        store_path,
        configs,
        functools.partial(gpt_train_fn, settings=settings),
        workers=workers,
        progress=not args.no_progress,
    )
    dt = time.monotonic() - t0
    print(
        f"sweep {sc.source}: {summary.finished}/{summary.total} finished, {summary.diverged} diverged, "
        f"{summary.failed} failed, "
        f"{summary.skipped} already done, {summary.reset} reset; {dt:.0f} s with {workers} worker(s); "
        f"store {store_path}",
        file=out,
    )
    csv_out = args.csv or sc.csv
    if csv_out:
        print(f"wrote {export_csv(store_path, csv_out)}", file=out)
    return 0 if summary.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m lrscale_megatron.sweep.cli CONFIG ...`` (same as ``lrscale sweep``)."""
    from lrscale_megatron.logutil import setup_logging

    p = argparse.ArgumentParser(prog="lrscale-sweep")
    sub = p.add_subparsers(dest="command", required=True)
    add_subcommand(sub)
    args = p.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    setup_logging("INFO")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
