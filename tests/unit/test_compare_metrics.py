"""Time-to-target interpolation, spread and the compare config's validation (pure; no training)."""

from __future__ import annotations

import math

import pytest

from lrscale_megatron.compare.config import CompareConfigError, compare_config_from_dict
from lrscale_megatron.compare.metrics import measurement_overhead, spread, to_target


def _hist(vals: dict[int, float], n: int = 10, dt: float = 1.0) -> list[dict]:
    return [
        {"step": s, "wall_s": s * dt, "train_loss": 0.0, "val_loss": vals.get(s)} for s in range(1, n + 1)
    ]


def test_to_target_interpolates_between_evaluations() -> None:
    h = _hist({2: 4.0, 4: 3.0, 6: 2.0})
    t = to_target(h, target=2.5, tokens_per_step=100)
    assert t.first_eval_step == 6
    assert t.steps == pytest.approx(5.0)  # halfway from 3.0 (step 4) to 2.0 (step 6)
    assert t.wall_s == pytest.approx(5.0) and t.tokens == pytest.approx(500.0)


def test_to_target_first_eval_and_not_reached() -> None:
    h = _hist({2: 1.0, 4: 0.5})
    assert to_target(h, 1.5, 1).steps == 2.0  # no earlier evaluation to interpolate from
    nr = to_target(_hist({2: 4.0, 4: 3.0}), 1.0, 1)
    assert nr.steps is None and nr.wall_s is None and nr.first_eval_step is None
    assert to_target(_hist({2: math.nan, 4: 1.0}), 2.0, 1).steps == 4.0


def test_spread_and_overhead() -> None:
    s = spread([1.0, 3.0, None])
    assert s["mean"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n_missing"] == 1
    assert s["std"] == pytest.approx(math.sqrt(2.0))
    assert spread([None])["mean"] is None
    h = _hist({}, n=10)
    h[4] = {**h[4], "lambda_max": 3.0}  # step 5 took 1 s extra
    for r in h[4:]:
        r["wall_s"] += 1.0
    m = measurement_overhead(h)
    assert m["n_measurements"] == 1 and m["measure_s"] == pytest.approx(1.0)
    assert m["fraction"] == pytest.approx(0.1)


BASE = {
    "train_config": "../gpt/cpu-tiny.json",
    "steps": 20,
    "seeds": [0, 1],
    "baseline": {"lr": 6e-4, "justification": "GPT-3 paper, Table 2.1, 125M"},
}


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"baseline": {"lr": 6e-4, "justification": ""}}, "baseline.justification"),
        ({"arms": ["cosine", "inverse_sqrt", "lrscale_offline"]}, "arms"),
        (
            {"arms": ["cosine", "inverse_sqrt", "lrscale_offline", "lrscale_online", "cosine_grid_best"]},
            "grid",
        ),
        ({"overrides": ["training.lr=0.1"]}, "overrides"),
        ({"target": {"rule": "fixed"}}, "target.loss"),
        ({"seeds": [0, 0]}, "seeds"),
        ({"eval_every": 50}, "eval_every"),
        ({"lrscale": {"law": "steplaw-dense", "peak_lr": 1e-3}}, "lrscale.law"),
    ],
)
def test_config_errors_name_the_field(edit: dict, field: str) -> None:
    with pytest.raises(CompareConfigError) as e:
        compare_config_from_dict({**BASE, **edit})
    assert e.value.field_name == field
    assert "Fix:" in str(e.value)


def test_config_defaults() -> None:
    c = compare_config_from_dict(BASE)
    assert c.ordered_arms == ("cosine", "inverse_sqrt", "lrscale_offline", "lrscale_online")
    assert c.target.rule == "cosine_final" and c.target.reduce == "max"
