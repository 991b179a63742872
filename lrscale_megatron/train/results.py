"""What the pretraining loop returns: one :class:`StepRecord` per iteration and the :class:`TrainResult`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One optimizer iteration.

    Attributes:
        step: iterations completed (1 after the first).
        tokens: training tokens consumed so far (``step * global_batch_size * seq_length``).
        wall_s: wall-clock seconds of training so far (evaluation and checkpointing excluded; carried
            over a resume).
        train_loss: mean next-token loss of this iteration's global batch (nats/token).
        lr: LR of the first param group used by this iteration's update.
        val_loss: validation loss after this iteration, on ``eval_every`` steps; else ``None``.
        lambda_max: top Hessian eigenvalue when LRScale's online mode measured at this step; else ``None``.
    """

    step: int
    tokens: int
    wall_s: float
    train_loss: float
    lr: float
    val_loss: float | None = None
    lambda_max: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` returns (identical on every rank).

    Attributes:
        history: one :class:`StepRecord` per iteration, from step 1 (a resumed run includes the steps
            before the checkpoint, from the checkpoint).
        final_val_loss: validation loss at the end (``training.eval_batches`` global batches).
        shift_loss: the same on the distribution-shift corpus, ``None`` without one.
        steps, tokens, wall_s: totals at the end.
        tokens_per_s: training tokens per second over the iterations this call ran.
        mfu: model FLOPs utilisation (:mod:`.metrics`), ``None`` without ``peak_flops_per_device``.
        energy_j: GPU energy of this call's iterations over all ranks (NVML), ``None`` when unavailable.
        num_params: parameters of the whole model.
        layout: ``{"tp", "pp", "dp", "world_size"}``.
        scheduler: the DeepSpeed scheduler type (``"LRScale"``, ``"WarmupCosineLR"``, ...) or ``None``.
        adaptations: LRScale online decisions (``scheduler.history``), empty otherwise.
        checkpoint: the last checkpoint written, ``None`` if none.
        lambada: LAMBADA-style last-word figures at the end (``accuracy``, ``n``, ``word_nll``,
            ``source``; :mod:`.downstream`), ``None`` when ``data.lambada_passages`` is off.
        config: the validated config as a dict (``deepspeed`` as given, before ``"auto"`` filling).
    """

    history: tuple[StepRecord, ...]
    final_val_loss: float
    shift_loss: float | None
    steps: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    mfu: float | None
    energy_j: float | None
    num_params: int
    layout: dict[str, int]
    scheduler: str | None
    adaptations: tuple[dict[str, Any], ...] = ()
    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    lambada: dict[str, Any] | None = None

    @property
    def losses(self) -> list[float]:
        return [r.train_loss for r in self.history]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["history"] = [dataclasses.asdict(r) for r in self.history]
        d["adaptations"] = list(self.adaptations)
        return d
