"""Pure schedule functions against megatron-core's OptimizerParamScheduler, step by step."""

from __future__ import annotations

import math
import types

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lrscale_megatron.schedule import MEGATRON_DECAY_STYLE, WSD_DECAY_SHAPES, lr_at


def _megatron(
    style: str,
    warmup: int,
    total: int,
    peak: float,
    min_lr: float,
    init_lr: float,
    wsd_steps: int | None = None,
    wsd_shape: str | None = None,
) -> OptimizerParamScheduler:
    opt = types.SimpleNamespace(param_groups=[{}])  # a dummy optimizer: only param_groups is read
    return OptimizerParamScheduler(
        opt,
        init_lr=init_lr,
        max_lr=peak,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=MEGATRON_DECAY_STYLE[style],
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style=wsd_shape,
    )


CASES = [
    # style, warmup, total, peak, min, init, increment
    ("cosine", 10, 200, 3e-4, 3e-5, 0.0, 1),
    ("cosine", 0, 97, 1.0, 0.0, 0.0, 1),
    ("cosine", 64, 1280, 6e-4, 6e-5, 1e-6, 8),  # Megatron-LM's unit: samples, increment = batch size
    ("inverse_sqrt", 10, 200, 1e-3, 1e-5, 0.0, 1),
    ("inverse_sqrt", 0, 150, 1e-3, 2e-4, 0.0, 1),
    ("linear", 5, 120, 2e-3, 1e-4, 0.0, 1),
    ("constant", 7, 100, 1e-3, 0.0, 1e-4, 1),
]


@pytest.mark.parametrize(("style", "warmup", "total", "peak", "min_lr", "init_lr", "inc"), CASES)
def test_equals_megatron_get_lr(style, warmup, total, peak, min_lr, init_lr, inc):
    sched = _megatron(style, warmup, total, peak, min_lr, init_lr)
    group = {}
    for step in range(0, total + 40 * inc, inc):
        assert sched.num_steps == step
        ours = lr_at(
            step,
            peak_lr=peak,
            min_lr=min_lr,
            warmup_steps=warmup,
            total_steps=total,
            decay_style=style,
            init_lr=init_lr,
        )
        assert ours == sched.get_lr(group), (style, step)  # bitwise
        sched.step(inc)


@pytest.mark.parametrize("shape", WSD_DECAY_SHAPES)
@pytest.mark.parametrize(("warmup", "total", "decay"), [(10, 200, 40), (0, 100, 100), (20, 300, 1)])
def test_wsd_equals_megatron(shape, warmup, total, decay):
    sched = _megatron("wsd", warmup, total, 1e-3, 1e-5, 0.0, wsd_steps=decay, wsd_shape=shape)
    for step in range(total + 20):
        ours = lr_at(
            step,
            peak_lr=1e-3,
            min_lr=1e-5,
            warmup_steps=warmup,
            total_steps=total,
            decay_style="wsd",
            wsd_decay_steps=decay,
            wsd_decay_shape=shape,
        )
        assert ours == sched.get_lr({}), (shape, step)
        sched.step(1)


def test_shape_landmarks():
    kw = dict(peak_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, decay_style="cosine", **kw) == 0.0
    assert lr_at(5, decay_style="cosine", **kw) == 0.5
    assert lr_at(10, decay_style="cosine", **kw) == 1.0
    assert lr_at(60, decay_style="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, decay_style="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(10_000, decay_style="cosine", **kw) == 0.1
    assert lr_at(40, decay_style="inverse_sqrt", **kw) == pytest.approx(math.sqrt(10 / 40))
    assert lr_at(10_000, decay_style="constant", **kw) == 1.0
    # WSD: flat until the last 20 steps, then down to the floor.
    wsd = dict(kw, decay_style="wsd", wsd_decay_steps=20)
    assert lr_at(90, **wsd) == 1.0
    assert lr_at(100, **wsd) == pytest.approx(0.55)
    assert lr_at(110, **wsd) == pytest.approx(0.1)


def test_unknown_style_raises():
    with pytest.raises(ValueError, match="decay_style='cosin'"):
        lr_at(50, peak_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=100, decay_style="cosin")
