"""Run a sweep grid into a :class:`~lrscale_megatron.sweep.store.SweepStore`, resumably.

Launch (one process, or ``workers`` processes on one node)::

    from lrscale_megatron.sweep.runner import SweepGrid, run_sweep
    grid = SweepGrid(widths=(256, 512), depths=(4, 8), token_budgets=(1e8,), batch_tokens=(65536,),
                     lr_min=1e-4, lr_max=1e-2, n_lr=9)
    run_sweep("runs/sweep.db", grid.expand(), train_fn, workers=2)

Re-running the same call skips finished runs, resets runs left ``running`` by a killed process, and
never duplicates a run (ids are hashes of the full config). ``train_fn(config, report) -> RunResult``
is pluggable: ``report(step=..., train_loss=..., tokens=..., val_loss=...)`` writes progress.
Multi-node sweeps: point several launches at one store on a shared filesystem that supports SQLite
locking; runs are claimed atomically.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lrscale_megatron.sweep.store import DIVERGED_PREFIX, SweepStore, this_owner

logger = logging.getLogger(__name__)


class Report(Protocol):
    def __call__(
        self, step: int, train_loss: float, tokens: int | None = None, val_loss: float | None = None
    ) -> None: ...


@dataclass(frozen=True)
class RunResult:
    """What a ``train_fn`` returns.

    Attributes:
        final_train_loss: last (smoothed) train loss.
        final_val_loss: last validation loss, ``None`` if never evaluated.
        tokens: tokens actually trained on.
        energy_j: energy in joules, ``None`` when unavailable (never 0).
    """

    final_train_loss: float
    final_val_loss: float | None = None
    tokens: int | None = None
    energy_j: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.final_train_loss):
            raise ValueError(
                f"RunResult.final_train_loss={self.final_train_loss!r}; fix: report a finite loss or raise"
            )
        if self.energy_j is not None and not self.energy_j > 0:
            raise ValueError(
                f"RunResult.energy_j={self.energy_j!r}; fix: use None when energy is unavailable, never 0"
            )


TrainFn = Callable[[dict[str, Any], Report], RunResult]


class DivergedError(FloatingPointError):
    """Raised by a ``train_fn`` whose loss became NaN/Inf: the run is kept as *diverged* (a result: its LR
    is too high, a loss above every finite one), not as a failure to retry."""


CENTER_PREDICTORS = ("width", "depth", "params", "tokens", "batch")


@dataclass(frozen=True)
class SweepGrid:
    """A full-factorial sweep: shapes x token budgets x batch sizes x log-uniform LRs.

    Attributes:
        widths: hidden sizes.
        depths: layer counts.
        token_budgets: training tokens per run.
        batch_tokens: tokens per optimizer step.
        lr_min, lr_max, n_lr: ``n_lr`` peak LRs log-uniform in [lr_min, lr_max] (6 significant digits).
        seq_len: sequence length in tokens.
        base: fixed config entries copied into every run (seed, vocab size, ...); part of the run id.
        lr_center: optional prior law ``{"coefficient": c, "exponents": {"width": a, ...}}`` (predictors
            among ``width``, ``depth``, ``params``, ``tokens``, ``batch``): each (width, depth, tokens,
            batch) group then gets its own ``n_lr`` LRs log-uniform over a factor ``lr_span`` centred on
            ``c * prod x ** e`` (a fine grid that brackets every group's optimum without spending runs
            far from it). ``lr_min`` / ``lr_max`` are then optional clamps on the centre.
        lr_span: ratio of the largest to the smallest LR of a centred group grid.
        tokens_per_param: when set, each run's token budget is ``tokens_per_param * params`` (rounded to
            whole batches, at least 2) instead of ``token_budgets`` (which must then be empty).
        seeds: when given, every run is repeated once per seed (``"seed"`` in its config, overriding
            ``base``); the law's optimum extraction averages the repeats' losses per LR.
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    token_budgets: tuple[float, ...]
    batch_tokens: tuple[int, ...]
    lr_min: float | None = None
    lr_max: float | None = None
    n_lr: int = 8
    seq_len: int = 2048
    base: dict[str, Any] = field(default_factory=dict)
    lr_center: dict[str, Any] | None = None
    lr_span: float | None = None
    tokens_per_param: float | None = None
    seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "token_budgets", "batch_tokens"):
            vals = tuple(getattr(self, name))
            object.__setattr__(self, name, vals)
            if name == "token_budgets" and self.tokens_per_param is not None:
                if vals:
                    raise ValueError(
                        f"SweepGrid.token_budgets={vals!r} with tokens_per_param={self.tokens_per_param}; "
                        "fix: give one of them (token_budgets: [] with tokens_per_param)"
                    )
                if not (isinstance(self.tokens_per_param, int | float) and self.tokens_per_param > 0):
                    raise ValueError(
                        f"SweepGrid.tokens_per_param={self.tokens_per_param!r}; fix: a positive number"
                    )
                continue
            if not vals or any(not (isinstance(v, int | float) and v > 0) for v in vals):
                raise ValueError(f"SweepGrid.{name}={vals!r}; fix: give at least one positive value")
        if self.lr_center is None:
            if self.lr_min is None or self.lr_max is None or not 0 < self.lr_min <= self.lr_max:
                raise ValueError(
                    f"SweepGrid.lr_min={self.lr_min}, lr_max={self.lr_max}; "
                    "fix: need 0 < lr_min <= lr_max (or an lr_center law with lr_span)"
                )
            if self.lr_span is not None:
                raise ValueError(
                    f"SweepGrid.lr_span={self.lr_span} without lr_center; fix: add lr_center or drop lr_span"
                )
        else:
            self._check_center()
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"SweepGrid.seeds={self.seeds!r}; fix: list each seed once")
        if self.n_lr < 1 or (self.n_lr == 1 and (self.lr_center is not None or self.lr_min != self.lr_max)):
            raise ValueError(f"SweepGrid.n_lr={self.n_lr}; fix: use n_lr >= 2 (or 1 with lr_min == lr_max)")

    def _check_center(self) -> None:
        c = self.lr_center
        if not isinstance(c, dict) or set(c) - {"coefficient", "exponents", "source"}:
            raise ValueError(
                f"SweepGrid.lr_center={c!r}; fix: use {{'coefficient': c, 'exponents': {{'width': a, ...}}}} "
                "(optional 'source')"
            )
        coef, exps = c.get("coefficient"), c.get("exponents")
        if not isinstance(coef, int | float) or not coef > 0:
            raise ValueError(f"SweepGrid.lr_center.coefficient={coef!r}; fix: give a positive number")
        if not isinstance(exps, dict) or any(k not in CENTER_PREDICTORS for k in exps):
            raise ValueError(
                f"SweepGrid.lr_center.exponents={exps!r}; fix: a mapping with keys among {CENTER_PREDICTORS}"
            )
        for k, v in exps.items():
            if not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"SweepGrid.lr_center.exponents.{k}={v!r}; fix: give a finite number")
        if self.lr_span is None or not self.lr_span > 1.0:
            raise ValueError(
                f"SweepGrid.lr_span={self.lr_span}; fix: with lr_center give the grid's max/min LR ratio > 1, e.g. 8"
            )
        for name in ("lr_min", "lr_max"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SweepGrid.{name}={v}; fix: a positive clamp on the centre, or omit it")

    def center(self, width: int, depth: int, tokens: float, batch_tokens: float) -> float:
        """Centre of a group's LR grid (``lr_center`` law, clamped to [lr_min, lr_max] when given)."""
        assert self.lr_center is not None
        x = {
            "width": width,
            "depth": depth,
            "params": 12 * depth * width**2,
            "tokens": tokens,
            "batch": batch_tokens,
        }
        lr = float(self.lr_center["coefficient"])
        for k, e in self.lr_center["exponents"].items():
            lr *= float(x[k]) ** float(e)
        return min(max(lr, self.lr_min or 0.0), self.lr_max or math.inf)

    def lrs(
        self, width: int = 0, depth: int = 0, tokens: float = 0.0, batch_tokens: float = 0.0
    ) -> list[float]:
        """The LR grid (of the given group when ``lr_center`` is set)."""
        if self.lr_center is not None:
            assert self.lr_span is not None
            if min(width, depth, tokens, batch_tokens) <= 0:
                raise ValueError(
                    "SweepGrid.lrs() with lr_center needs the group: lrs(width, depth, tokens, batch_tokens)"
                )
            lo = self.center(width, depth, tokens, batch_tokens) / math.sqrt(self.lr_span)
            step = math.log(self.lr_span) / (self.n_lr - 1)
            return [float(f"{lo * math.exp(i * step):.6g}") for i in range(self.n_lr)]
        assert self.lr_min is not None and self.lr_max is not None
        if self.n_lr == 1:
            return [float(f"{self.lr_min:.6g}")]
        step = math.log(self.lr_max / self.lr_min) / (self.n_lr - 1)
        return [float(f"{self.lr_min * math.exp(i * step):.6g}") for i in range(self.n_lr)]

    def expand(self) -> list[dict[str, Any]]:
        """One config per run; ``params`` = 12 * depth * width^2 non-embedding parameters (Kaplan et al. 2020)."""
        out = []
        for w in self.widths:
            for d in self.depths:
                for t, b in self._budgets(12 * int(d) * int(w) ** 2):
                    for lr in self.lrs(int(w), int(d), t, b):
                        for seed in self.seeds or (None,):
                            extra = {} if seed is None else {"seed": int(seed)}
                            out.append(
                                {
                                    **self.base,
                                    **extra,
                                    "width": int(w),
                                    "depth": int(d),
                                    "params": 12 * int(d) * int(w) ** 2,
                                    "tokens": int(t),
                                    "batch_tokens": int(b),
                                    "seq_len": self.seq_len,
                                    "lr": lr,
                                }
                            )
        return out

    def _budgets(self, params: int) -> list[tuple[float, int]]:
        """(tokens, batch_tokens) of every run of one shape."""
        if self.tokens_per_param is None:
            return [(t, int(b)) for t in self.token_budgets for b in self.batch_tokens]
        tpp = self.tokens_per_param
        return [(max(2, round(tpp * params / b)) * int(b), int(b)) for b in self.batch_tokens]


def _as_result(value: Any) -> RunResult:
    if isinstance(value, RunResult):
        return value
    if isinstance(value, dict):
        return RunResult(**value)
    raise TypeError(
        f"train_fn returned {type(value).__name__}; fix: return a RunResult (or a dict of its fields)"
    )


def _worker(store_path: str, train_fn: TrainFn, run_ids: Sequence[str]) -> int:
    """Claim and run pending runs until none is left; returns how many this process finished."""
    store = SweepStore(store_path)
    owner = this_owner()
    done = 0
    try:
        while (run := store.claim_next(owner, run_ids)) is not None:
            t0 = time.monotonic()
            rid = run.run_id

            def report(
                step: int,
                train_loss: float,
                tokens: int | None = None,
                val_loss: float | None = None,
                _rid: str = rid,
                _t0: float = t0,
            ) -> None:
                store.log_step(_rid, owner, step, train_loss, tokens, time.monotonic() - _t0)
                if val_loss is not None:
                    store.log_val(_rid, owner, step, val_loss, tokens)

            try:
                res = _as_result(train_fn(run.config, report))
            except DivergedError as e:
                logger.warning("run %s diverged (lr=%s): %s", rid, run.config.get("lr"), e)
                store.fail(rid, owner, f"{DIVERGED_PREFIX} {e}", time.monotonic() - t0)
                continue
            except Exception:
                err = traceback.format_exc()
                logger.error("run %s failed:\n%s", rid, err)
                store.fail(rid, owner, err, time.monotonic() - t0)
                continue
            store.finish(
                rid,
                owner,
                res.final_train_loss,
                res.final_val_loss,
                res.tokens,
                time.monotonic() - t0,
                res.energy_j,
            )
            done += 1
    finally:
        store.close()
    return done


@dataclass(frozen=True)
class SweepSummary:
    """Store state for this sweep's runs after :func:`run_sweep` (``failed`` excludes ``diverged``)."""

    total: int
    finished: int
    failed: int
    reset: int
    skipped: int
    diverged: int = 0


def run_sweep(
    store_path: str | Path,
    configs: Sequence[dict[str, Any]],
    train_fn: TrainFn,
    workers: int = 1,
    progress: bool = True,
    retry_failed: bool = True,
    start_method: str = "spawn",
) -> SweepSummary:
    """Run every config not yet finished; ``workers > 1`` uses that many processes (``train_fn`` must pickle)."""
    if workers < 1:
        raise ValueError(f"run_sweep: workers={workers}; fix: use workers >= 1")
    store = SweepStore(store_path)
    try:
        ids = store.add_runs(configs)
        unique = list(dict.fromkeys(ids))
        reset = store.reset_stale()
        if retry_failed:
            store.retry_failed()
        skipped = sum(1 for r in unique if (run := store.get(r)) is not None and run.done)
        logger.info("sweep: %d runs, %d already finished, %d reset", len(unique), skipped, len(reset))
        pending = [r for r in unique if (run := store.get(r)) is not None and run.state == "pending"]
        bar = None
        if progress:
            from tqdm import tqdm

            # a bar on a terminal; in a log file (no TTY) one log line per finished run instead of
            # carriage-return redraws
            bar = tqdm(total=len(unique), initial=skipped, desc="sweep", unit="run", disable=None)
        if workers == 1 or len(pending) <= 1:
            if bar is not None:
                bar.close()
                bar = None
            _worker(str(store_path), train_fn, unique)
        else:
            ctx: Any = mp.get_context(start_method)
            procs = [
                ctx.Process(target=_worker, args=(str(store_path), train_fn, unique))
                for _ in range(min(workers, len(pending)))
            ]
            for p in procs:
                p.start()
            logged = skipped
            while any(p.is_alive() for p in procs):
                time.sleep(0.2)
                if bar is not None:
                    n = sum(
                        1
                        for r in unique
                        if (run := store.get(r)) is not None and run.state in ("finished", "failed")
                    )
                    if bar.disable and n != logged:
                        logger.info("sweep: %d/%d runs done", n, len(unique))
                        logged = n
                    elif not bar.disable:
                        bar.update(n - bar.n)
            for p in procs:
                p.join()
            if bar is not None:
                bar.close()
        runs = [run for r in unique if (run := store.get(r)) is not None]
        states = [run.state for run in runs]
        n_div = sum(run.diverged for run in runs)
        return SweepSummary(
            len(unique), states.count("finished"), states.count("failed") - n_div, len(reset), skipped, n_div
        )
    finally:
        store.close()
