"""The real sweep ``train_fn``: one sweep point -> one megatron-core GPT pretraining run.

A sweep point (``width``, ``depth``, ``tokens``, ``batch_tokens``, ``seq_len``, ``lr``, from
:meth:`~lrscale_megatron.sweep.runner.SweepGrid.expand`) is turned into a pretraining config by
overriding a base GPT config (``configs/gpt/*.json``) and run by :func:`lrscale_megatron.train.train`:
the same megatron-core model code, IndexedDataset data path, DeepSpeed engine and schedule as
pretraining. Per-step train losses, the periodic validation losses, tokens and wall-clock go into the
store; energy is NVML's (``None`` = unavailable on CPU, never 0). The distribution-shift loss (KJV when
training on Shakespeare) is kept per run in ``shift_losses`` (see :func:`shift_loss_of`).

Mapping (units: ``tokens`` and ``batch_tokens`` are tokens; steps are optimizer iterations)::

    model.hidden_size = width          model.num_layers = depth      model.num_heads = width // head_dim
    model.seq_length  = seq_len        training.lr      = lr
    training.global_batch_size = batch_tokens // seq_len   (sequences)
    training.steps             = tokens // batch_tokens
    training.warmup_steps      = round(warmup_fraction * steps)

Launch (one process per worker, each starting its own single-process gloo group on a free port)::

    lrscale sweep configs/sweep/cpu-sweep.json                 # resumable; Ctrl-C / SIGKILL safe
    python -m lrscale_megatron.cli sweep configs/sweep/ci-tiny.json --workers 1
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import math
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.runner import DivergedError, Report, RunResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTSweepSettings:
    """How sweep points become pretraining configs (fixed over a sweep; part of every run's config).

    Attributes:
        base_config: path of the base GPT config (``configs/gpt/*.json``); its model / data / DeepSpeed
            sections are the defaults every run overrides.
        head_dim: attention head size; ``num_heads = width // head_dim`` (width must be a multiple).
        warmup_fraction: linear-warmup iterations as a fraction of the run's iterations.
        evals: validation losses per run (evenly spaced; the last at the final iteration).
        eval_batches: global batches per validation / shift-corpus evaluation.
        micro_batch_size: sequences per forward pass (0: the whole global batch in one pass).
        threads: torch intra-op threads per worker process (0: leave torch's default).
        overrides: extra ``key.sub=value`` overrides applied to the base config (e.g. ``data.shift=null``).
        shift_log: SQLite file where the shift-corpus loss of each run is kept (``None``: not kept).
    """

    base_config: str
    head_dim: int = 16
    warmup_fraction: float = 0.05
    evals: int = 4
    eval_batches: int = 4
    micro_batch_size: int = 0
    threads: int = 1
    overrides: tuple[str, ...] = field(default_factory=tuple)
    shift_log: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.head_dim < 1:
            raise ValueError(f"GPTSweepSettings.head_dim={self.head_dim}; fix: use a positive head size")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(
                f"GPTSweepSettings.warmup_fraction={self.warmup_fraction}; fix: use a fraction in [0, 1)"
            )
        if self.evals < 1 or self.eval_batches < 1:
            raise ValueError(
                f"GPTSweepSettings.evals={self.evals}, eval_batches={self.eval_batches}; fix: use >= 1"
            )
        if self.micro_batch_size < 0 or self.threads < 0:
            raise ValueError(
                f"GPTSweepSettings.micro_batch_size={self.micro_batch_size}, threads={self.threads}; "
                "fix: use >= 0 (0 = default)"
            )


def train_config_dict(point: dict[str, Any], settings: GPTSweepSettings) -> tuple[dict[str, Any], Path]:
    """The raw pretraining config of one sweep point (base config with the point's overrides)."""
    from lrscale_megatron.train.config import apply_overrides, load_deepspeed_json

    base_path = Path(settings.base_config)
    raw = json.loads(base_path.read_text())
    if isinstance(raw.get("deepspeed"), str):
        raw["deepspeed"] = load_deepspeed_json(raw["deepspeed"], base_path.parent)
    raw = apply_overrides(raw, list(settings.overrides))
    width, depth, seq = int(point["width"]), int(point["depth"]), int(point["seq_len"])
    batch_tokens, tokens = int(point["batch_tokens"]), int(point["tokens"])
    if width % settings.head_dim:
        raise ValueError(
            f"sweep point width={width} is not a multiple of head_dim={settings.head_dim}; "
            "fix: pick widths that are multiples of head_dim or change head_dim"
        )
    if batch_tokens % seq:
        raise ValueError(
            f"sweep point batch_tokens={batch_tokens} is not a multiple of seq_len={seq}; "
            f"fix: use batch_tokens = sequences x {seq}"
        )
    gbs = batch_tokens // seq
    steps = tokens // batch_tokens
    if steps < 2:
        raise ValueError(
            f"sweep point tokens={tokens} < 2 x batch_tokens={batch_tokens}; fix: raise the token budget"
        )
    mbs = settings.micro_batch_size or gbs
    if gbs % mbs:
        mbs = math.gcd(gbs, mbs)
    raw = copy.deepcopy(raw)
    # the law reads validation losses only: no last-word passages per point unless the base config asks
    raw.setdefault("data", {}).setdefault("lambada_passages", 0)
    model = raw.setdefault("model", {})
    model.update(
        name=f"sweep-w{width}-d{depth}",
        hidden_size=width,
        num_layers=depth,
        num_heads=width // settings.head_dim,
        seq_length=seq,
    )
    tr = raw.setdefault("training", {})
    tr.update(
        steps=steps,
        global_batch_size=gbs,
        micro_batch_size=mbs,
        lr=float(point["lr"]),
        lr_source="sweep point",
        warmup_steps=min(steps - 1, round(settings.warmup_fraction * steps)),
        eval_every=max(1, steps // settings.evals),
        eval_batches=settings.eval_batches,
        log_every=max(1, steps // 4),
        output_dir=None,
        seed=int(point.get("seed", tr.get("seed", 0))),
    )
    raw["checkpoint"] = {"dir": None, "save_every": 0, "load": None}
    return raw, base_path.parent


_STARTED = False


def _start_process() -> None:
    """Once per worker process: threads, a free rendezvous port when not launched by torchrun."""
    global _STARTED
    if _STARTED:
        return
    import torch.distributed as dist

    from lrscale_megatron.launch import free_port, shutdown

    if not dist.is_initialized() and "RANK" not in os.environ:
        # every worker is its own 1-process group; an inherited MASTER_PORT would make them collide
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
    atexit.register(shutdown)
    _STARTED = True


def gpt_train_fn(config: dict[str, Any], report: Report, settings: GPTSweepSettings) -> RunResult:
    """Train the megatron-core GPT of one sweep point; report steps and validation losses to the store.

    Bind ``settings`` with :func:`functools.partial` to get a picklable ``train_fn(config, report)``.
    """
    import torch

    from lrscale_megatron.train import config_from_dict, train

    _start_process()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    raw, base_dir = train_config_dict(config, settings)
    cfg = config_from_dict(raw, base_dir=base_dir, source=f"sweep:{settings.base_config}")
    result = train(cfg)
    for rec in result.history:
        if not math.isfinite(rec.train_loss):  # diverged from here on: kept as a diverged run, below
            break
        val = rec.val_loss if rec.val_loss is not None and math.isfinite(rec.val_loss) else None
        report(step=rec.step, train_loss=rec.train_loss, tokens=rec.tokens, val_loss=val)
    if settings.shift_log is not None and result.shift_loss is not None:
        _log_shift(settings.shift_log, config, result.shift_loss, cfg.data.corpus)
    if not math.isfinite(result.history[-1].train_loss):
        raise DivergedError(f"final train loss {result.history[-1].train_loss}")
    return RunResult(
        final_train_loss=float(result.history[-1].train_loss),
        final_val_loss=float(result.final_val_loss) if math.isfinite(result.final_val_loss) else None,
        tokens=int(result.tokens),
        energy_j=result.energy_j if result.energy_j is not None and result.energy_j > 0 else None,
    )


# -------------------------------------------------------------------------- shift-corpus losses
_SHIFT_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS shift_losses (run_id TEXT PRIMARY KEY, corpus TEXT, loss REAL NOT NULL)"
)


def _log_shift(db_path: str, config: dict[str, Any], loss: float, corpus: str | None) -> None:
    """Keep a run's shift-corpus loss in ``shift_losses`` of the sweep store (idempotent per run id)."""
    from lrscale_megatron.sweep.store import run_id

    db = sqlite3.connect(db_path, timeout=60.0, isolation_level=None)
    try:
        db.execute(_SHIFT_SCHEMA)
        db.execute(
            "INSERT OR REPLACE INTO shift_losses (run_id, corpus, loss) VALUES (?, ?, ?)",
            (run_id(config), corpus, float(loss)),
        )
    finally:
        db.close()


def shift_losses(db_path: str | Path) -> dict[str, float]:
    """``run_id -> shift-corpus loss`` of a sweep store (empty when none was kept)."""
    db = sqlite3.connect(str(db_path))
    try:
        db.execute(_SHIFT_SCHEMA)
        return {r[0]: float(r[1]) for r in db.execute("SELECT run_id, loss FROM shift_losses")}
    finally:
        db.close()
