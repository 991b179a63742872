"""Where the scheduler reports what it did: LR per group each step, and each curvature measurement.

One sink, three outputs, all written on global rank 0 only (the estimate is broadcast from rank 0, so
every rank holds the same values):

* CSV, always, in ``logdir``:

  - ``lrscale_steps.csv``: ``iteration, loss, lr_group0, lr_group1, ...``: one row per optimizer
    iteration (every ``step_every``-th): the LR each group *used* in that iteration and its loss when
    the training loop gave it (:meth:`LRScaleMonitor.log_loss`; empty otherwise).
  - ``lrscale_measurements.csv``: one row per measurement and param group (:data:`MEASURE_COLUMNS`):
    ``lambda_max``, the Lanczos ``residual`` and ``n_matvec``, ``trace`` when the estimator measured
    one, the LR in force (``lr``), the gauge ``g = lambda_max * lr / threshold`` (1 at the edge of
    stability), what the policy did (``action``: skip / hold / cut / raise / curvature) and why
    (``reason``), whether ``g`` crossed 1 at this measurement (``crossed_edge``), and the peak LR before
    and after. The policy logs a warning whenever ``g`` crosses 1.

* TensorBoard (``torch.utils.tensorboard.SummaryWriter`` in ``logdir``) when the ``tensorboard``
  package is importable; otherwise a single log line says it is unavailable.
* DeepSpeed's monitor (``engine.monitor.write_events([(tag, value, step), ...])``) when given one
  whose ``enabled`` is true (the config's ``tensorboard`` / ``wandb`` / ``csv_monitor`` / ``comet``).

Tags are ``lrscale/lr/group{g}``, ``lrscale/loss``, ``lrscale/lambda_max`` (``.../group{g}`` in
per-group mode), ``lrscale/gauge``, ``lrscale/lr_in_force``, ``lrscale/residual``, ``lrscale/n_matvec``,
``lrscale/trace``, ``lrscale/peak_lr``, ``lrscale/skipped``; x is the iteration (DeepSpeed / PyTorch) or the scheduler's step unit (samples
under Megatron-LM).

Plain PyTorch::

    monitor = LRScaleMonitor("runs/exp1")
    sched = LRScaleScheduler(opt, config, monitor=monitor)      # or sched.attach_monitor(monitor)
    for batch in data:
        loss = model(batch); loss.backward(); opt.step(); opt.zero_grad()
        monitor.log_loss(loss); sched.step()
    monitor.close()

DeepSpeed::

    engine.lr_scheduler.attach_monitor(LRScaleMonitor("runs/exp1", deepspeed_monitor=engine.monitor))

``lrscale plot runs/exp1`` draws LR, lambda_max and loss against the step from the two CSV files.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from lrscale_megatron.adapter import Decision, Estimate

logger = logging.getLogger(__name__)

STEPS_FILE = "lrscale_steps.csv"
MEASUREMENTS_FILE = "lrscale_measurements.csv"
#: Columns of ``lrscale_measurements.csv``; ``group`` is ``all`` for the global (not per-group) peak.
MEASURE_COLUMNS = (
    "step",
    "group",
    "lambda_max",
    "residual",
    "trace",
    "n_matvec",
    "converged",
    "accepted",
    "lr",
    "gauge",
    "action",
    "crossed_edge",
    "reason",
    "proposed_lr",
    "peak_before",
    "peak_after",
)
GLOBAL_GROUP = "all"

_tensorboard_note_logged = False


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be used (it needs the ``tensorboard`` package)."""
    return importlib.util.find_spec("tensorboard") is not None


def _global_rank() -> int:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it
        return 0
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _cell(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return x


def _number(x: Any) -> float | None:
    """``x`` as a float for scalar sinks, ``None`` when absent or not finite."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class LRScaleMonitor:
    """CSV (+ TensorBoard, + DeepSpeed monitor) sink for one run.

    Args:
        logdir: directory for the CSV files (and TensorBoard events); created if missing.
        tensorboard: also write TensorBoard events when the ``tensorboard`` package is importable.
        deepspeed_monitor: ``engine.monitor`` of a DeepSpeed engine; used when its ``enabled`` is true.
        step_every: write one ``lrscale_steps.csv`` row (and LR/loss events) every this many iterations.
        rank: this process's global rank (default: from ``torch.distributed`` or ``$RANK``); only rank 0
            writes anything.
    """

    def __init__(
        self,
        logdir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        deepspeed_monitor: Any | None = None,
        step_every: int = 1,
        rank: int | None = None,
    ) -> None:
        if step_every < 1:
            raise ValueError(f"step_every={step_every}: must be >= 1 (write every N iterations)")
        self.logdir = Path(logdir)
        self.step_every = step_every
        self.active = (_global_rank() if rank is None else rank) == 0
        self.deepspeed_monitor = (
            deepspeed_monitor
            if deepspeed_monitor is not None and getattr(deepspeed_monitor, "enabled", False)
            else None
        )
        self._pending_loss: float | None = None
        self._steps_file: IO[str] | None = None
        self._steps_writer: Any = None
        self._num_groups: int | None = None
        self._meas_file: IO[str] | None = None
        self._meas_writer: Any = None
        self._tb: Any = None
        if not self.active:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._tb = _summary_writer(self.logdir)

    # -- what the training loop reports
    def log_loss(self, loss: Any) -> None:
        """The loss of the iteration about to be stepped; written with that iteration's row."""
        if self.active:
            self._pending_loss = float(loss.detach() if hasattr(loss, "detach") else loss)

    # -- what the scheduler reports
    def log_step(self, iteration: int, lrs: Sequence[float]) -> None:
        """Iteration ``iteration`` (0-based) ran with ``lrs[g]`` in param group ``g``."""
        if not self.active:
            return
        loss, self._pending_loss = self._pending_loss, None
        if iteration % self.step_every:
            return
        if self._steps_writer is None:
            self._num_groups = len(lrs)
            self._steps_file, self._steps_writer = self._open(
                STEPS_FILE, ["iteration", "loss", *(f"lr_group{g}" for g in range(len(lrs)))]
            )
        if len(lrs) != self._num_groups:
            raise ValueError(
                f"log_step got {len(lrs)} LRs but {STEPS_FILE} has {self._num_groups} lr columns; "
                "use one monitor per optimizer"
            )
        self._steps_writer.writerow([iteration, _cell(loss), *lrs])
        events = [(f"lrscale/lr/group{g}", float(lr), iteration) for g, lr in enumerate(lrs)]
        if loss is not None:
            events.append(("lrscale/loss", loss, iteration))
        self._emit(events)

    def log_measurement(self, decision: Decision, estimate: Estimate) -> None:
        """One curvature measurement (of one group in per-group mode) and what the policy did with it.

        ``residual`` and ``trace`` are read from the estimate when it carries them (``Estimate``
        subclasses or future fields); absent values are written as empty cells.
        """
        if not self.active:
            return
        residual = getattr(estimate, "residual", None)
        trace = getattr(estimate, "trace", None)
        if self._meas_writer is None:
            self._meas_file, self._meas_writer = self._open(MEASUREMENTS_FILE, list(MEASURE_COLUMNS))
        group = GLOBAL_GROUP if decision.group is None else decision.group
        self._meas_writer.writerow(
            [
                decision.step,
                group,
                _cell(decision.lambda_max),
                _cell(residual),
                _cell(trace),
                decision.n_matvec,
                int(bool(estimate.converged)),
                int(decision.accepted),
                _cell(decision.lr),
                _cell(decision.gauge),
                decision.action,
                int(decision.crossed_edge),
                _cell(decision.reason),
                _cell(decision.proposed),
                decision.peak_before,
                decision.peak_after,
            ]
        )
        suffix = "" if decision.group is None else f"/group{decision.group}"
        step = decision.step
        events: list[tuple[str, float, int]] = []
        for tag, value in (
            ("lambda_max", decision.lambda_max),
            ("gauge", decision.gauge),
            ("lr_in_force", decision.lr),
            ("residual", residual),
            ("trace", trace),
            ("n_matvec", decision.n_matvec),
            ("peak_lr", decision.peak_after),
            ("skipped", 0.0 if decision.accepted else 1.0),
        ):
            v = _number(value)
            if v is not None:
                events.append((f"lrscale/{tag}{suffix}", v, step))
        self._emit(events)
        if self._tb is not None and decision.reason:
            self._tb.add_text(f"lrscale/decision{suffix}", f"{decision.action}: {decision.reason}", step)

    # -- lifetime
    def flush(self) -> None:
        for f in (self._steps_file, self._meas_file):
            if f is not None:
                f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every output (idempotent)."""
        for f in (self._steps_file, self._meas_file):
            if f is not None:
                f.close()
        self._steps_file = self._meas_file = None
        self._steps_writer = self._meas_writer = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> LRScaleMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals
    def _open(self, name: str, header: list[str]) -> tuple[IO[str], Any]:
        path = self.logdir / name
        new = not path.exists() or path.stat().st_size == 0
        f = open(path, "a", newline="", buffering=1)  # noqa: SIM115 - kept open for the run; line-buffered
        w = csv.writer(f)
        if new:
            w.writerow(header)
        else:
            logger.info("lrscale: appending to existing %s (resumed run?)", path)
        return f, w

    def _emit(self, events: list[tuple[str, float, int]]) -> None:
        if not events:
            return
        if self._tb is not None:
            for tag, value, step in events:
                self._tb.add_scalar(tag, value, step)
        if self.deepspeed_monitor is not None:
            self.deepspeed_monitor.write_events(events)

    def __repr__(self) -> str:
        sinks = ["csv"] + (["tensorboard"] if self._tb is not None else [])
        sinks += ["deepspeed"] if self.deepspeed_monitor is not None else []
        return f"LRScaleMonitor({str(self.logdir)!r}, sinks={sinks}, active={self.active})"


def _summary_writer(logdir: Path) -> Any:
    global _tensorboard_note_logged
    if not tensorboard_available():
        if not _tensorboard_note_logged:
            logger.info("lrscale: TensorBoard unavailable (package `tensorboard` not installed); CSV only")
            _tensorboard_note_logged = True
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(logdir))


__all__ = [
    "GLOBAL_GROUP",
    "MEASUREMENTS_FILE",
    "MEASURE_COLUMNS",
    "STEPS_FILE",
    "LRScaleMonitor",
    "tensorboard_available",
]
