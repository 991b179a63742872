"""Run every arm x seed in this process, one :func:`lrscale_megatron.train.train` call per run.

Each finished run is written at once to ``<output_dir>/runs/<run id>.json`` (rank 0; atomic rename), and a
run whose file exists with the same train-config hash is loaded instead of trained: a killed comparison
loses at most the run in flight, and a rerun picks up where it stopped. Delete ``runs/`` (or pass
``--force``) to retrain.

Multi-process launches (torchrun) work when every rank sees the same ``output_dir``: all ranks check the
same files and train the same runs together. ``"workers": N`` instead trains N runs at once in N local
processes (:mod:`.workers`), then loads them all from disk.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrscale_megatron.compare.arms import (
    OfflinePeak,
    RunSpec,
    arm_runs,
    peaks_for,
    run_id,
    train_config_for,
)
from lrscale_megatron.compare.config import CompareConfig
from lrscale_megatron.logutil import rank

logger = logging.getLogger(__name__)


@dataclass
class CompareRuns:
    """Everything the report needs: the config, the law peaks and each arm's runs by LR.

    ``peaks``: ``{"lrscale": ..., "steplaw": ...}`` (:func:`~.arms.peaks_for`). ``arms[name][lr]`` lists one
    result dict per seed (``TrainResult.to_dict()`` plus ``run_id``, ``spec``, ``elapsed_s``).
    """

    config: CompareConfig
    peaks: dict[str, OfflinePeak]
    arms: dict[str, dict[float, list[dict[str, Any]]]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    load_start: tuple[float, float, float] | None = None
    trained: int = 0
    reused: int = 0

    @property
    def peak(self) -> OfflinePeak:
        """The LRScale arms' offline peak."""
        return self.peaks["lrscale"]


def _load_avg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run_one(
    cfg: CompareConfig,
    spec: RunSpec,
    runs_dir: Path,
    force: bool = False,
    memo: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Train one run (or take it from ``memo`` / load it from ``runs_dir``); returns ``(result, trained_now)``."""
    from lrscale_megatron.train import train

    tc = train_config_for(cfg, spec)
    rid = run_id(spec, tc)
    path = runs_dir / f"{rid}.json"
    if memo is not None and rid in memo:
        return memo[rid], False
    if path.is_file() and not force:
        logger.info("compare: %s: finished earlier, loaded %s", rid, path)
        return json.loads(path.read_text()), False
    t0 = time.perf_counter()
    res = train(tc).to_dict()
    res.update(run_id=rid, spec={"schedule": spec.schedule, "peak_lr": spec.peak_lr, "seed": spec.seed})
    res["elapsed_s"] = time.perf_counter() - t0  # training + evaluation + setup, for the job's budget
    res["load_avg_end"] = _load_avg()  # the machine's load when this run finished (shared machines)
    if rank() == 0:
        runs_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, res)
    if memo is not None:
        memo[rid] = res
    return res, True


def _plan(cfg: CompareConfig, peaks: dict[str, OfflinePeak]) -> dict[str, dict[float, list[RunSpec]]]:
    return {arm: arm_runs(cfg, arm, peaks) for arm in cfg.ordered_arms}


def _unique_ids(cfg: CompareConfig, plan: dict[str, dict[float, list[RunSpec]]]) -> list[tuple[str, RunSpec]]:
    """Every distinct run of the plan (a grid point equal to the baseline is the cosine run), in order."""
    seen: dict[str, RunSpec] = {}
    for by_lr in plan.values():
        for specs in by_lr.values():
            for spec in specs:
                seen.setdefault(run_id(spec, train_config_for(cfg, spec)), spec)
    return list(seen.items())


def run_worker(cfg: CompareConfig, output_dir: str | Path | None = None, force: bool = False) -> int:
    """A worker of :mod:`.workers`: train every run of the plan that no other worker has claimed and that
    is not on disk (or all it claims, with ``force``); returns the number trained."""
    from lrscale_megatron.compare import optimizers
    from lrscale_megatron.compare.workers import claim

    out = Path(output_dir or cfg.output_dir)
    runs_dir = out / "runs"
    optimizers.register()
    trained = 0
    for rid, spec in _unique_ids(cfg, _plan(cfg, peaks_for(cfg))):
        if (runs_dir / f"{rid}.json").is_file() and not force:
            continue
        if not claim(runs_dir, rid):
            continue
        logger.info("compare worker %d: training %s", os.getpid(), rid)
        run_one(cfg, spec, runs_dir, force=True)
        trained += 1
    return trained


def run_compare(cfg: CompareConfig, output_dir: str | Path | None = None, force: bool = False) -> CompareRuns:
    """Train (or load) every run of every arm in ``cfg.ordered_arms`` order; logs progress per arm."""
    from lrscale_megatron.compare import optimizers

    out = Path(output_dir or cfg.output_dir)
    runs_dir = out / "runs"
    peaks = peaks_for(cfg)
    for name, p in peaks.items():
        logger.info("compare: %s peak %.4g from %s", name, p.peak_lr, p.source)
    logger.info("compare: baseline LR %.4g (%s)", cfg.baseline.lr, cfg.baseline.justification)
    optimizers.require([a for a in cfg.ordered_arms if a in ("schedulefree", "prodigy")])
    optimizers.register()
    result = CompareRuns(config=cfg, peaks=peaks, load_start=_load_avg())
    plan = _plan(cfg, peaks)
    by_workers: set[str] = set()
    if cfg.workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from lrscale_megatron.compare.workers import run_workers

        pending = [
            rid for rid, _ in _unique_ids(cfg, plan) if force or not (runs_dir / f"{rid}.json").is_file()
        ]
        if len(pending) > 1:
            run_workers(cfg, out, pending, force)
            by_workers, force = set(pending), False
    total = sum(len(v) for runs in plan.values() for v in runs.values())
    done = 0
    memo: dict[str, dict[str, Any]] = {}
    for arm, by_lr in plan.items():
        t_arm = time.perf_counter()
        result.arms[arm] = {}
        for lr, specs in by_lr.items():
            result.arms[arm][lr] = []
            for spec in specs:
                done += 1
                logger.info("compare: [%d/%d] arm %s: lr %.4g seed %d", done, total, arm, lr, spec.seed)
                res, trained = run_one(cfg, spec, runs_dir, force=force, memo=memo)
                if not trained and res["run_id"] in by_workers:  # trained by a worker process just now
                    by_workers.discard(res["run_id"])
                    trained = True
                result.trained += int(trained)
                result.reused += int(not trained)
                result.arms[arm][lr].append(res)
                logger.info(
                    "compare: arm %s seed %d: final val %.4f, %.1f s training",
                    arm,
                    spec.seed,
                    res["final_val_loss"],
                    res["wall_s"],
                )
        logger.info("compare: arm %s done in %.1f s", arm, time.perf_counter() - t_arm)
    return result
