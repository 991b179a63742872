"""The compare config on the shared pydantic base: errors name the field path, the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrscale_megatron.compare.config import (
    ARM_NAMES,
    CompareConfig,
    CompareConfigError,
    compare_config_from_dict,
    load_compare_config,
)
from lrscale_megatron.configs import ConfigError

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "train_config": "../gpt/cpu-tiny.json",
    "steps": 20,
    "seeds": [0, 1],
    "baseline": {"lr": 6e-4, "justification": "GPT-3 paper, Table 2.1, 125M"},
}


def _err(edit: dict) -> CompareConfigError:
    with pytest.raises(CompareConfigError) as e:
        compare_config_from_dict({**BASE, **edit})
    return e.value


def test_error_is_a_config_error() -> None:
    assert issubclass(CompareConfigError, ConfigError)


@pytest.mark.parametrize(
    ("edit", "field", "in_fix"),
    [
        ({"arms": [*ARM_NAMES[:4], "prodigi"]}, "arms.4", "did you mean 'prodigy'"),
        ({"arms": [*ARM_NAMES[:4], "cosine"]}, "arms", "once"),
        ({"stpes": 20}, "stpes", "did you mean 'steps'"),
        ({"steps": "20"}, "steps", "without quotes"),
        ({"steps": 20.0}, "steps", "write 20"),
        ({"seeds": [0, True]}, "seeds.1", "integer"),
        ({"baseline": {"lr": -1.0, "justification": "GPT-3 paper, Table 2.1"}}, "baseline.lr", "6e-4"),
        (
            {"baseline": {"lr": 6e-4, "justification": "GPT-3 paper", "warmup_type": "lin"}},
            "baseline.warmup_type",
            "linear",
        ),
        ({"target": {"margin": -0.1}}, "target.margin", "0.01"),
        ({"grid": {"lrs": [1e-3, float("nan")]}}, "grid.lrs.1", "positive"),
        ({"prodigy": {"d_coef": 0}}, "prodigy.d_coef", "1.0"),
        ({"schedulefree": {"lr": 0.0}}, "schedulefree.lr", "0.0025"),
        ({"lrscale": {"decay_style": "cosin"}}, "lrscale.decay_style", "cosine"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio", "0.1"),
    ],
)
def test_bad_values_name_field_value_and_fix(edit: dict, field: str, in_fix: str) -> None:
    e = _err(edit)
    assert e.field_name == field, str(e)
    assert in_fix in e.fix, str(e)
    assert str(e).startswith(f"{field}=") and "Fix:" in str(e)


def test_missing_baseline_names_the_section() -> None:
    with pytest.raises(CompareConfigError) as ei:
        compare_config_from_dict({k: v for k, v in BASE.items() if k != "baseline"})
    e = ei.value
    assert e.field_name == "baseline" and "justification" in e.fix


def test_comments_lists_and_schema() -> None:
    c = compare_config_from_dict({**BASE, "_comment": "x", "grid": {"lrs": [1e-3, 3e-3], "_c": 1}})
    assert c.seeds == (0, 1) and c.grid is not None and c.grid.lrs == (1e-3, 3e-3)
    assert c.to_dict()["seeds"] == [0, 1]
    assert c.schedulefree.lr == 0.0025 and c.prodigy.lr == 1.0 and c.prodigy.safeguard_warmup
    schema = CompareConfig.json_schema()
    assert "Optimizer iterations" in schema["properties"]["steps"]["description"]


def test_steps_default_to_the_train_config(tmp_path: Path) -> None:
    raw = {k: v for k, v in BASE.items() if k != "steps"}
    c = compare_config_from_dict({**raw, "train_config": str(ROOT / "configs/gpt/cpu-tiny.json")})
    tiny = json.loads((ROOT / "configs/gpt/cpu-tiny.json").read_text())
    assert c.steps == tiny["training"]["steps"]
    with pytest.raises(CompareConfigError) as e:
        compare_config_from_dict({**raw, "train_config": str(tmp_path / "missing.json")})
    assert e.value.field_name == "steps" and "explicitly" in e.value.fix


@pytest.mark.parametrize("name", ["cpu-demo.json", "ci-smoke.json", "cpu-bench.json"])
def test_shipped_configs_validate(name: str) -> None:
    c = load_compare_config(ROOT / "configs" / "compare" / name)
    assert c.train_config_path().is_file()
    raw = json.loads((ROOT / "configs" / "compare" / name).read_text())
    assert list(c.ordered_arms) == [a for a in ARM_NAMES if a in raw["arms"]]


def test_an_online_runs_cache_key_covers_the_online_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrscale_megatron.compare.arms import RunSpec, run_id, train_config_for
    from lrscale_megatron.online_config import OnlineConfig

    cfg = compare_config_from_dict(
        {
            **BASE,
            "train_config": str(ROOT / "configs/gpt/cpu-tiny.json"),
            "lrscale": {"law": None, "peak_lr": 1e-3},
        }
    )
    online, offline = RunSpec("lrscale_online", 1e-3, 0), RunSpec("lrscale", 1e-3, 0)
    before = (run_id(online, train_config_for(cfg, online)), run_id(offline, train_config_for(cfg, offline)))
    # a default of the policy changes (the config file does not): the online run must not be reused
    field = OnlineConfig.model_fields["max_iter"]
    monkeypatch.setattr(field, "default", int(field.default) + 7)
    OnlineConfig.model_rebuild(force=True)
    try:
        after = (
            run_id(online, train_config_for(cfg, online)),
            run_id(offline, train_config_for(cfg, offline)),
        )
    finally:
        monkeypatch.undo()
        OnlineConfig.model_rebuild(force=True)
    assert after[0] != before[0] and after[1] == before[1]
