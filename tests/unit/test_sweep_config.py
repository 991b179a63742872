"""Sweep configs: the shipped ones parse, sweep points map to valid pretraining configs, bad values name the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lrscale_megatron.sweep.cli import SweepConfigError, load_sweep_config, parse_sweep_config
from lrscale_megatron.sweep.megatron import GPTSweepSettings, train_config_dict
from lrscale_megatron.train.config import config_from_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cpu-sweep", "cpu-pilot", "cpu-sweep-seed1", "ci-tiny"])
def test_shipped_sweep_configs_map_to_valid_train_configs(name):
    sc = load_sweep_config(ROOT / "configs" / "sweep" / f"{name}.json")
    points = sc.grid.expand()
    assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points)
    for p in points:
        raw, base = train_config_dict(p, sc.settings)
        cfg = config_from_dict(raw, base_dir=base)
        t, m = cfg.training, cfg.model
        assert (m.hidden_size, m.num_layers, m.seq_length) == (p["width"], p["depth"], p["seq_len"])
        assert t.global_batch_size * m.seq_length == p["batch_tokens"]
        assert t.steps * p["batch_tokens"] == p["tokens"] and t.lr == p["lr"]
        assert cfg.data.tokenizer == "byte" and cfg.checkpoint.dir is None
        assert cfg.lambada_passages == 0  # sweep points feed the law: no last-word scoring per point


def test_cpu_sweep_covers_the_required_design():
    g = load_sweep_config(ROOT / "configs" / "sweep" / "cpu-sweep.json").grid
    assert len(g.widths) >= 3 and len(g.depths) >= 2 and len(g.token_budgets) >= 2
    assert len(g.batch_tokens) >= 2 and g.n_lr >= 6


def test_bad_values_name_the_fix(tmp_path):
    base = str(ROOT / "configs" / "gpt" / "cpu-tiny.json")
    grid = {
        "widths": [32],
        "depths": [1],
        "token_budgets": [4096],
        "batch_tokens": [256],
        "lr_min": 1e-3,
        "lr_max": 1e-2,
        "n_lr": 2,
        "seq_len": 32,
    }
    with pytest.raises(SweepConfigError, match=r"bogus=1: unknown key\. Fix: remove it; known keys: store"):
        parse_sweep_config({"store": "s", "base_config": base, "grid": grid, "bogus": 1}, tmp_path)
    with pytest.raises(
        SweepConfigError, match=r"train\.x=1: unknown key\. Fix: remove it; known keys: head_dim"
    ):
        parse_sweep_config({"store": "s", "base_config": base, "grid": grid, "train": {"x": 1}}, tmp_path)
    with pytest.raises(SweepConfigError, match=r"grid\.widht=.*did you mean 'widths'"):
        parse_sweep_config({"store": "s", "base_config": base, "grid": {**grid, "widht": [3]}}, tmp_path)
    with pytest.raises(SweepConfigError, match=r"grid\.widths\.0='32': has type str, expected an integer"):
        parse_sweep_config({"store": "s", "base_config": base, "grid": {**grid, "widths": ["32"]}}, tmp_path)
    with pytest.raises(SweepConfigError, match=r"grid\.lr_min=0\.1.*Fix: need 0 < lr_min <= lr_max"):
        parse_sweep_config({"store": "s", "base_config": base, "grid": {**grid, "lr_min": 0.1}}, tmp_path)
    with pytest.raises(SweepConfigError, match=r"base_config='nope\.json': not found"):
        parse_sweep_config({"store": "s", "base_config": "nope.json", "grid": grid}, tmp_path)
    with pytest.raises(SweepConfigError, match=r"store=None: missing required key"):
        parse_sweep_config({"base_config": base, "grid": grid}, tmp_path)
    from lrscale_megatron.configs.base import ConfigError

    assert issubclass(SweepConfigError, ConfigError)
    s = GPTSweepSettings(base_config=base, head_dim=16)
    with pytest.raises(ValueError, match="head_dim"):
        train_config_dict(
            {**grid, "width": 24, "depth": 1, "tokens": 4096, "batch_tokens": 256, "lr": 1e-3}, s
        )
    with pytest.raises(ValueError, match="token budget"):
        train_config_dict(
            {**grid, "width": 32, "depth": 1, "tokens": 256, "batch_tokens": 256, "lr": 1e-3}, s
        )


def test_lr_center_in_a_sweep_config(tmp_path):
    base = str(ROOT / "configs" / "gpt" / "cpu-tiny.json")
    grid = {
        "widths": [32, 64],
        "depths": [1],
        "token_budgets": [4096],
        "batch_tokens": [256],
        "n_lr": 3,
        "seq_len": 32,
        "lr_center": {"coefficient": 0.064, "exponents": {"width": -1.0}, "source": "pilot"},
        "lr_span": 4.0,
    }
    sc = parse_sweep_config({"store": "s", "base_config": base, "grid": grid}, tmp_path)
    lrs = {w: sorted(p["lr"] for p in sc.grid.expand() if p["width"] == w) for w in (32, 64)}
    assert lrs[32] == pytest.approx([1e-3, 2e-3, 4e-3])
    assert lrs[64] == pytest.approx([5e-4, 1e-3, 2e-3])
    with pytest.raises(SweepConfigError, match="lr_span"):
        parse_sweep_config({"store": "s", "base_config": base, "grid": {**grid, "lr_span": 0.5}}, tmp_path)


def test_lr_center_from_a_law_file(tmp_path):
    from lrscale_megatron.law.lawfile import load_law

    base = str(ROOT / "configs" / "gpt" / "cpu-tiny.json")
    law_path = tmp_path / "pilot.json"
    law_path.write_text((ROOT / "data" / "sweeps" / "cpu-sweep-law-withdrawn.json").read_text())
    grid = {
        "widths": [32, 128],
        "depths": [1],
        "token_budgets": [524288],
        "batch_tokens": [256],
        "n_lr": 3,
        "seq_len": 64,
        "lr_center": {"law": "pilot.json"},  # relative to the sweep config's directory
        "lr_span": 4.0,
    }
    sc = parse_sweep_config({"store": "s", "base_config": base, "grid": grid}, tmp_path)
    law = load_law(law_path)
    for w in (32, 128):
        lrs = sorted(p["lr"] for p in sc.grid.expand() if p["width"] == w)
        x = {"width": w, "depth": 1, "tokens": 524288, "batch": 256}
        want = law.coefficient * math.prod(x[k] ** e for k, e in law.exponents.items())
        assert lrs[1] == pytest.approx(want, rel=1e-5)
    with pytest.raises(SweepConfigError, match=r"lr_center.law='missing.json'"):
        parse_sweep_config(
            {"store": "s", "base_config": base, "grid": {**grid, "lr_center": {"law": "missing.json"}}},
            tmp_path,
        )
    with pytest.raises(SweepConfigError, match="not both"):
        bad = {"law": "pilot.json", "coefficient": 1.0}
        parse_sweep_config({"store": "s", "base_config": base, "grid": {**grid, "lr_center": bad}}, tmp_path)
