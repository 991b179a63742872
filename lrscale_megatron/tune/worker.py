"""One ladder run on a compute node: ``python -m lrscale_megatron.tune.worker TASKS INDEX``.

``TASKS`` is a JSON file written by the head (:mod:`lrscale_megatron.tune.slurm`)::

    {"ladder": "/shared/out/ladder.json", "runs_dir": "/shared/out/runs", "heartbeat_s": 30,
     "train_fn": "lrscale_megatron.sweep.megatron:gpt_train_fn", "attempt": 1, "configs": [{...}, ...]}

The worker trains ``configs[INDEX]`` (``INDEX`` = ``$SLURM_ARRAY_TASK_ID``), stamping its heartbeat
file meanwhile, and writes the result file atomically (:mod:`lrscale_megatron.tune.filestore`). A run
whose result file already says finished or diverged is skipped (a resubmitted array never runs a
finished run twice). Exit codes: 0 finished, diverged or skipped; 1 the run failed (the traceback is
in its result file).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.runner import DivergedError, _as_result
from lrscale_megatron.tune.filestore import DONE_STATES, Heartbeat, read_result, write_result

logger = logging.getLogger(__name__)

GPT_TRAIN_FN = "lrscale_megatron.sweep.megatron:gpt_train_fn"


def _train_fn(tasks: dict[str, Any]):  # type: ignore[no-untyped-def]
    ref = tasks.get("train_fn", GPT_TRAIN_FN)
    mod, _, name = ref.partition(":")
    fn = getattr(importlib.import_module(mod), name)
    if ref == GPT_TRAIN_FN:
        from lrscale_megatron.sweep.cli import load_sweep_config

        return functools.partial(fn, settings=load_sweep_config(tasks["ladder"]).settings)
    return fn


def run_task(tasks_path: str | Path, index: int) -> int:
    """Train ``configs[index]`` of a tasks file into its result file; returns the exit code."""
    tasks = json.loads(Path(tasks_path).read_text())
    configs = tasks["configs"]
    if not 0 <= index < len(configs):
        raise SystemExit(f"error: index={index} outside 0..{len(configs) - 1} of {tasks_path}")
    config = configs[index]
    runs_dir = Path(tasks["runs_dir"])
    runs_dir.mkdir(parents=True, exist_ok=True)
    from lrscale_megatron.sweep.store import run_id

    rid = run_id(config)
    done = read_result(runs_dir, rid)
    if done is not None and done["state"] in DONE_STATES:
        logger.info("run %s already %s; skipped", rid, done["state"])
        return 0
    attempt = int(tasks.get("attempt", 1))
    steps: list[tuple[int, float, int | None, float | None]] = []
    vals: list[tuple[int, float, int | None]] = []
    t0 = time.monotonic()

    def report(
        step: int, train_loss: float, tokens: int | None = None, val_loss: float | None = None
    ) -> None:
        steps.append((int(step), float(train_loss), tokens, time.monotonic() - t0))
        if val_loss is not None:
            vals.append((int(step), float(val_loss), tokens))

    with Heartbeat(runs_dir, rid, attempt, float(tasks.get("heartbeat_s", 30.0))):
        try:
            res = _as_result(_train_fn(tasks)(config, report))
        except DivergedError as e:
            write_result(
                runs_dir,
                config,
                "diverged",
                error=str(e),
                wall_clock_s=time.monotonic() - t0,
                attempt=attempt,
            )
            return 0
        except Exception:
            err = traceback.format_exc()
            logger.error("run %s failed:\n%s", rid, err)
            write_result(
                runs_dir, config, "failed", error=err, wall_clock_s=time.monotonic() - t0, attempt=attempt
            )
            return 1
    finite = [s for s in steps if s[1] == s[1] and abs(s[1]) != float("inf")]
    write_result(
        runs_dir,
        config,
        "finished",
        final_train_loss=res.final_train_loss,
        final_val_loss=res.final_val_loss,
        tokens=res.tokens,
        wall_clock_s=time.monotonic() - t0,
        energy_j=res.energy_j,
        steps=finite,
        vals=vals,
        attempt=attempt,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from lrscale_megatron.logutil import setup_logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m lrscale_megatron.tune.worker TASKS.json INDEX", file=sys.stderr)
        return 2
    setup_logging("INFO")
    return run_task(args[0], int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
