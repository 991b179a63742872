"""The optax schedule equals the PyTorch LRScale scheduler step for step, for every decay style."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from lrscale_megatron.jax import optax_schedule
from lrscale_megatron.law.predict import Prediction
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleConfigError, LRScaleScheduler

TOTAL, WARMUP = 40, 7
STYLES = [
    {"decay_style": "cosine"},
    {"decay_style": "linear"},
    {"decay_style": "inverse_sqrt"},
    {"decay_style": "constant"},
    *(
        {"decay_style": "wsd", "wsd_decay_shape": s, "wsd_decay_fraction": 0.3}
        for s in ("linear", "cosine", "exponential", "minus_sqrt")
    ),
]


def _torch_lrs(config: LRScaleConfig, n: int) -> list[float]:
    """LR used by optimizer update k (0-based): set at construction, then after each step()."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = LRScaleScheduler(opt, config)
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("style", STYLES, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_equal_to_the_torch_schedule_at_every_step(style):
    params = {"total_steps": TOTAL, "warmup_steps": WARMUP, "min_lr": 2e-5, "init_lr": 1e-6, **style}
    n = TOTAL + 6  # past the end of decay too
    want = _torch_lrs(LRScaleConfig(peak_lr=3e-3, **params), n)
    sched = optax_schedule(Prediction(3e-3, (2e-3, 4e-3), None, (), "test", {}), **params)
    assert [float(sched.values[min(k, TOTAL + 1)]) for k in range(n)] == want  # float64, bit for bit
    got32 = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(n)))
    assert got32.dtype == np.float32 and np.array_equal(got32, np.asarray(want, dtype=np.float32))
    with jax.enable_x64(True):
        sched64 = optax_schedule(3e-3, **params)
        got64 = [float(sched64(jnp.asarray(k))) for k in range(n)]
    assert got64 == want
    assert len(set(want)) > 3  # the schedule actually moves


def test_optax_updates_apply_the_torch_lrs_in_order():
    """Count alignment end to end: SGD on a constant gradient moves by exactly the torch LRs."""
    params = {"total_steps": 12, "warmup_steps": 3, "decay_style": "cosine", "min_lr": 1e-4}
    want = _torch_lrs(LRScaleConfig(peak_lr=0.5, **params), 15)
    with jax.enable_x64(True):
        tx = optax.sgd(optax_schedule(0.5, **params))
        p = jnp.zeros(())
        state = tx.init(p)
        moved = []
        for _ in range(15):
            upd, state = tx.update(jnp.ones(()), state, p)
            moved.append(-float(upd))
            p = optax.apply_updates(p, upd)
    assert moved == want


def test_law_prediction_matches_the_torch_scheduler_with_the_same_law():
    params = {
        "law": "steplaw-dense",
        "model": {"params": 1.2e8, "tokens": 2.5e9, "batch_tokens": 524288},
        "total_steps": 30,
        "warmup_steps": 5,
        "decay_style": "wsd",
    }
    want = _torch_lrs(LRScaleConfig.from_dict(params), 32)
    sched = optax_schedule(**params)
    assert sched.values[:32].tolist() == want and sched.peak_lr == max(want)


def test_refusals_name_the_field():
    with pytest.raises(LRScaleConfigError, match="total_steps"):
        optax_schedule(1e-3, warmup_steps=10)
    with pytest.raises(LRScaleConfigError, match="decay_style"):
        optax_schedule(1e-3, total_steps=10, decay_style="cosin")
    with pytest.raises(LRScaleConfigError, match=r"online\.enabled"):
        optax_schedule(1e-3, total_steps=10, online={"enabled": True})
    with pytest.raises(TypeError, match="once"):
        optax_schedule(1e-3, total_steps=10, peak_lr=1e-3)
    with pytest.raises(TypeError, match="Prediction"):
        optax_schedule("3e-4", total_steps=10)  # type: ignore[arg-type]
