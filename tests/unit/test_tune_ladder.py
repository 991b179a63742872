"""``lrscale tune`` ladder derivation: proxies inherit the target's data/tokenizer/batch, are smaller, and
bad targets or ladders are refused naming the field, the value and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrscale_megatron.sweep.cli import parse_sweep_config
from lrscale_megatron.sweep.megatron import train_config_dict
from lrscale_megatron.train.config import config_from_dict, load_config
from lrscale_megatron.tune.config import TuneConfig, TuneConfigError, load_tune_config
from lrscale_megatron.tune.ladder import approx_params, derive_ladder

ROOT = Path(__file__).resolve().parents[2]
TARGET = str(ROOT / "configs" / "gpt" / "cpu-target.json")


def _cfg(**ladder) -> TuneConfig:
    return TuneConfig.from_dict({"target": TARGET, "ladder": ladder})


def _sweep(ladder, tmp_path):
    return parse_sweep_config({**ladder.sweep, "store": str(tmp_path / "s.sqlite")}, tmp_path)


def test_cpu_demo_ladder_keeps_data_tokenizer_batch_and_shrinks_the_model(tmp_path):
    cfg = load_tune_config(ROOT / "configs" / "tune" / "cpu-demo.json")
    assert cfg.target == str(Path(TARGET).resolve())
    lad = derive_ladder(cfg)
    sc = _sweep(lad, tmp_path)
    points = sc.grid.expand()
    assert len(points) == 4 * 7
    target = load_config(TARGET)
    for p in points:
        raw, base = train_config_dict(p, sc.settings)
        tc = config_from_dict(raw, base_dir=base)
        # same corpus, tokenizer, shift corpus; only the last-word metric is off on the proxies
        assert tc.data.model_copy(update={"lambada_passages": None}) == target.data
        assert tc.lambada_passages == 0 < target.lambada_passages
        assert tc.model.seq_length == target.model.seq_length
        assert tc.training.global_batch_size == target.training.global_batch_size
        assert tc.training.steps == target.training.steps  # tokens: fixed
        assert tc.training.warmup_steps == target.training.warmup_steps
        assert tc.model.num_non_embedding_params() * 9 < target.model.num_non_embedding_params()
    assert lad.target.params == target.model.num_non_embedding_params()


def test_derived_widths_and_the_error_when_the_target_leaves_too_few():
    lad = derive_ladder(_cfg(head_dim=8))
    assert lad.grid["widths"] == [16, 24, 32, 40]
    assert approx_params(40, 2) * 9 <= approx_params(128, 2)
    with pytest.raises(TuneConfigError) as e:  # the target's own head_dim (32) leaves one width
        derive_ladder(_cfg())
    msg = str(e.value)
    assert "ladder.n_proxies=4" in msg and "hidden_size=128" in msg and "head_dim=32" in msg
    assert "Fix: set ladder.head_dim" in msg


def test_seeds_repeat_every_run_and_keep_the_single_seed_run_ids(tmp_path):
    one = _sweep(derive_ladder(_cfg(head_dim=8)), tmp_path).grid.expand()
    two = _sweep(derive_ladder(_cfg(head_dim=8, seeds=2)), tmp_path).grid.expand()
    assert len(two) == 2 * len(one) and sorted({p["seed"] for p in two}) == [0, 1]
    key = [json.dumps(p, sort_keys=True) for p in one]
    assert set(key) <= {json.dumps(p, sort_keys=True) for p in two}  # seed-0 runs are reused


def test_per_param_tokens_scale_with_the_proxy(tmp_path):
    lad = derive_ladder(_cfg(head_dim=8, tokens="per_param", tokens_per_param=40.0))
    pts = _sweep(lad, tmp_path).grid.expand()
    by_w = {p["width"]: p["tokens"] for p in pts}
    assert by_w[32] / by_w[16] == pytest.approx(4.0, rel=0.05)
    assert by_w[16] == pytest.approx(40.0 * approx_params(16, 2), rel=0.05)


@pytest.mark.parametrize(
    ("ladder", "field", "fix"),
    [
        ({"widths": [16, 20, 32], "head_dim": 8}, "ladder.widths=[16, 20, 32]", "multiples of 8"),
        ({"widths": [32, 64, 128], "head_dim": 8}, "ladder.widths=", "fewer parameters than the target"),
        ({"head_dim": 8, "batch_tokens": [500]}, "ladder.batch_tokens=[500]", "sequences x 64"),
        ({"head_dim": 8, "batch_tokens": [65536]}, "ladder.batch_tokens=[65536]", "smaller batches"),
        (
            {"head_dim": 8, "tokens": "per_param", "tokens_per_param": 0.5},
            "ladder.tokens_per_param=0.5",
            "raise tokens_per_param",
        ),
        ({"head_dim": 8, "lr_min": 0.01, "lr_max": 0.001}, "ladder.lr_max=0.001", "widen the LR range"),
        ({"widths": [16, 16, 32]}, "ladder.widths=[16, 16, 32]", "distinct"),
        ({"n_lr": 2}, "ladder.n_lr=2", "7 LRs"),
    ],
)
def test_bad_ladders_name_field_value_and_fix(ladder, field, fix):
    with pytest.raises(TuneConfigError) as e:
        derive_ladder(_cfg(**ladder))
    assert field in str(e.value) and fix in str(e.value), str(e.value)


def test_bad_targets_name_field_value_and_fix(tmp_path):
    with pytest.raises(TuneConfigError, match=r"target=.*missing\.json.*Fix: fix the target config"):
        derive_ladder(TuneConfig.from_dict({"target": str(tmp_path / "missing.json")}))
    raw = json.loads(Path(TARGET).read_text())
    raw["deepspeed"] = str(ROOT / "configs" / "deepspeed" / "cpu-adamw-lrscale.json")
    raw["model"]["num_heads"] = 5  # 128 / 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(TuneConfigError) as e:
        derive_ladder(TuneConfig.from_dict({"target": str(bad)}))
    assert "target" in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(TuneConfigError, match=r"ladder\.widht.*did you mean 'widths'"):
        TuneConfig.from_dict({"target": TARGET, "ladder": {"widht": [16]}})


def test_a_train_config_is_a_tune_config_with_defaults(tmp_path):
    cfg = load_tune_config(TARGET)
    assert cfg.target == str(Path(TARGET).resolve()) and cfg.ladder.n_proxies == 4
    assert cfg.launcher == "local" and cfg.ladder.tokens == "fixed"


def test_target_sweep_trains_the_target_itself_at_each_lr_and_seed():
    from lrscale_megatron.tune.ladder import load_target, target_sweep

    cfg = load_tune_config(ROOT / "configs" / "tune" / "cpu-demo.json")
    t = load_target(cfg)
    settings, configs = target_sweep(cfg, t, [1e-3, 4e-3], [0, 1], eval_batches=2)
    assert sorted((c["lr"], c["seed"]) for c in configs) == [(1e-3, 0), (1e-3, 1), (4e-3, 0), (4e-3, 1)]
    target = load_config(t.path)
    for c in configs:
        raw, base = train_config_dict(c, settings)
        run = config_from_dict(raw, base_dir=base)
        assert (run.model.hidden_size, run.model.num_layers) == (
            target.model.hidden_size,
            target.model.num_layers,
        )
        assert run.training.steps == target.training.steps and run.training.lr == c["lr"]
        assert run.training.warmup_steps == target.training.warmup_steps
