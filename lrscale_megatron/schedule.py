"""Learning-rate schedules as pure functions of the step.

A schedule maps a step count to a learning rate and knows nothing about optimizers, param groups or
the host framework; :mod:`lrscale_megatron.scheduler` binds it to an optimizer. The *unit* of a step is
the caller's: DeepSpeed and plain PyTorch count optimizer iterations, Megatron-LM counts samples
(``OptimizerParamScheduler.step(increment=global_batch_size)``); ``warmup_steps`` and ``total_steps``
must then be given in the same unit.

Where they overlap, :func:`lr_at` performs the same floating-point operations in the same order as
``megatron.core.optimizer_param_scheduler.OptimizerParamScheduler.get_lr`` (megatron-core 0.16), so the
two agree bit for bit (tested step by step against the real class). Sources: cosine annealing
(Loshchilov & Hutter 2017), inverse square root (Vaswani et al. 2017), warmup-stable-decay
(Hu et al. 2024, MiniCPM; Hägele et al. 2024).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

DecayStyle = Literal["cosine", "linear", "inverse_sqrt", "wsd", "constant"]
WsdDecayShape = Literal["linear", "cosine", "exponential", "minus_sqrt"]

DECAY_STYLES: tuple[str, ...] = get_args(DecayStyle)
WSD_DECAY_SHAPES: tuple[str, ...] = get_args(WsdDecayShape)

#: Our decay-style names -> megatron-core's ``lr_decay_style`` names.
MEGATRON_DECAY_STYLE: dict[str, str] = {
    "cosine": "cosine",
    "linear": "linear",
    "inverse_sqrt": "inverse-square-root",
    "wsd": "WSD",
    "constant": "constant",
}


def wsd_decay_coeff(ratio: float, shape: str) -> float:
    """Fraction of ``peak - min`` left after ``ratio`` (0..1) of the WSD decay phase."""
    if shape == "linear":
        return 1.0 - ratio
    if shape == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if shape == "exponential":
        return (2.0 * math.pow(0.5, ratio)) - 1.0
    if shape == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(f"wsd_decay_shape={shape!r} is not one of {WSD_DECAY_SHAPES}")


def lr_at(
    step: int,
    *,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay_style: str,
    init_lr: float = 0.0,
    wsd_decay_steps: int = 0,
    wsd_decay_shape: str = "linear",
) -> float:
    """Learning rate after ``step`` steps (iterations or samples: the caller's unit).

    ``total_steps`` is the step at which decay ends (warmup included); after it the LR is ``min_lr``
    (except ``constant``, which stays at ``peak_lr``, as in megatron-core). ``wsd_decay_steps`` is the
    length of the final WSD decay phase, ending at ``total_steps``.
    """
    # 1. Linear warmup from init_lr to peak_lr, reaching the peak at step == warmup_steps.
    if warmup_steps > 0 and step <= warmup_steps:
        return init_lr + ((peak_lr - init_lr) * float(step) / float(warmup_steps))
    # 2. Constant: the peak forever.
    if decay_style == "constant":
        return peak_lr
    # 3. Past the end of decay: the floor.
    if step > total_steps:
        return min_lr
    # 4. Inverse square root, continuous with the warmup, floored at min_lr.
    if decay_style == "inverse_sqrt":
        lr = peak_lr * max(warmup_steps, 1) ** 0.5 / (max(step, 1) ** 0.5)
        return max(min_lr, lr)
    # 5. Cosine / linear over [warmup_steps, total_steps]; WSD holds the peak, then decays at the end.
    decay_ratio = float(step - warmup_steps) / float(total_steps - warmup_steps)
    if decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
    elif decay_style == "linear":
        coeff = 1.0 - decay_ratio
    elif decay_style == "wsd":
        anneal_start = total_steps - wsd_decay_steps
        if step <= anneal_start:
            coeff = 1.0
        else:
            coeff = wsd_decay_coeff(float(step - anneal_start) / float(wsd_decay_steps), wsd_decay_shape)
    else:
        raise ValueError(f"decay_style={decay_style!r} is not one of {DECAY_STYLES}")
    # 6. Interpolate between the floor and the peak.
    return min_lr + coeff * (peak_lr - min_lr)
