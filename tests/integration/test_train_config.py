"""Configs: every shipped config passes ``--dry-run``; bad values fail with errors naming the field.

Parameter counts: the exact megatron local-spec count (``ModelConfig.num_params``) must lie within 2 % of
the GPT-3 paper's ``12 L h^2 + (V + S) h`` for every shipped config; for ``cpu-tiny`` the CLI also builds
the model on CPU and checks the exact count against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lrscale_megatron.train.config import ConfigError, config_from_dict, load_config
from lrscale_megatron.train.dryrun import dry_run

ROOT = Path(__file__).resolve().parents[2]
GPT = ROOT / "configs" / "gpt"
LARGE = ["gpt3-125m", "gpt3-350m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b"]
PAPER_PARAMS = {
    "gpt3-125m": 125e6,
    "gpt3-350m": 350e6,
    "gpt3-1.3b": 1.3e9,
    "gpt3-2.7b": 2.7e9,
    "gpt3-6.7b": 6.7e9,
    "gpt3-13b": 13e9,
}
PAPER_LR = {
    "gpt3-125m": 6e-4,
    "gpt3-350m": 3e-4,
    "gpt3-1.3b": 2e-4,
    "gpt3-2.7b": 1.6e-4,
    "gpt3-6.7b": 1.2e-4,
    "gpt3-13b": 1e-4,
}


@pytest.mark.parametrize("name", LARGE)
def test_dry_run_large_config(name):
    cfg = load_config(GPT / f"{name}.json")
    r = dry_run(cfg, build_check=False)
    assert abs(r.params / r.params_gpt3_formula - 1) < 0.02
    assert abs(r.params / PAPER_PARAMS[name] - 1) < 0.05  # the paper's rounded size
    assert r.tp * r.pp * r.dp == r.world_size == cfg.parallel.world_size and r.world_size % 8 == 0
    assert r.memory_gib["total"] < 80 and r.zero_stage == 1 and r.mixed_precision == "bf16"
    assert r.baseline_lr == PAPER_LR[name] and "Table 2.1" in (r.baseline_lr_source or "")
    assert r.predicted_lr is not None and r.predicted_lr > 0
    assert r.tokens == pytest.approx(300e9, rel=1e-3)
    # the online measurement's extra memory per GPU, next to the training step's
    fd, exact = r.measurement_gib["fd"], r.measurement_gib["exact"]
    resident = r.memory_gib["weights"] + r.memory_gib["grads"] + r.memory_gib["optimizer"]
    assert 0 < fd["extra"] < exact["extra"]
    # bf16: fd evaluates at fp32 copies, so it holds one fp32 forward's activations; exact holds its graph
    assert 0 < fd["graph"] < exact["graph"]
    assert fd["peak"] > resident + fd["extra"]  # plus the held batch's own forward/backward
    text = r.render()
    assert "online measure  hvp=fd" in text and "hvp=exact" in text and "training step" in text


def test_dry_run_cli_builds_small_model(tmp_path):
    out = tmp_path / "dry.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrscale_megatron.train",
            str(GPT / "cpu-tiny.json"),
            "--dry-run",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["built_params"] == r["params"] and 100_000 <= r["params"] <= 500_000
    assert "online measure  hvp=fd" in proc.stdout and r["measurement_gib"]["fd"]["extra"] > 0
    assert "predicted LR" in proc.stdout and "tp(1) * pp(1) * dp(1) = world_size(1)" in proc.stdout
    small = load_config(GPT / "cpu-small.json")
    assert 4e6 <= small.model.num_params() <= 6e6


def _raw(**changes) -> dict:
    raw = json.loads((GPT / "cpu-tiny.json").read_text())
    raw["deepspeed"] = json.loads((ROOT / "configs" / "deepspeed" / "cpu-adamw-lrscale.json").read_text())
    for key, value in changes.items():
        section, field = key.split("__")
        raw.setdefault(section, {})[field] = value
    return raw


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"model__hidden_size": 0}, "model.hidden_size", "positive integer"),
        ({"model__num_heads": 5}, "model.num_heads", "does not divide hidden_size(64)"),
        ({"model__hiden_size": 64}, "model.hiden_size", "did you mean 'hidden_size'"),
        ({"training__micro_batch_size": 3}, "training.global_batch_size", "micro_batch_size(3)"),
        ({"training__steps": "20"}, "training.steps", "without quotes"),
        ({"training__dtype": "fp8"}, "training.dtype", "unknown dtype"),
        ({"training__warmup_steps": 500}, "training.warmup_steps", "steps(200)"),
        ({"parallel__pp": 3}, "parallel.pp", "num_layers(2)"),
        (
            {"parallel__tp": 2, "parallel__world_size": 7},
            "parallel",
            "tp(2) * pp(1) * dp(3) = 6 != world_size(7)",
        ),
        (
            {"parallel__tp": 2, "parallel__world_size": 6},
            "training.global_batch_size",
            "micro_batch_size(4) * dp(3) = 12",
        ),
        (
            {"parallel__tp": 2, "parallel__dp": 3, "parallel__world_size": 8},
            "parallel",
            "tp(2) * pp(1) * dp(3) = 6 != world_size(8)",
        ),
        ({"data__tokenizer": "wordpiece"}, "data.tokenizer", "unknown tokenizer"),
        ({"model__vocab_size": 200}, "model.vocab_size", "258"),
        ({"data__lambada_passages": 8, "parallel__pp": 2}, "data.lambada_passages", "parallel.pp=2"),
        ({"data__lambada_passages": -1}, "data.lambada_passages", "0 (off) or null"),
        ({"data__lambada_source": "test"}, "data.lambada_source", "unknown passage source"),
        ({"data__lambada_source": "shift", "data__shift": None}, "data.lambada_source", "no shift corpus"),
    ],
)
def test_bad_config_names_the_field(changes, field, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_raw(**changes))
    assert e.value.field_name == field
    assert words in str(e.value) and "Fix:" in str(e.value)


def test_bad_deepspeed_values_name_the_field():
    raw = _raw(parallel__pp=2)
    raw["deepspeed"]["zero_optimization"] = {"stage": 1}
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_optimization\.stage=1"):
        config_from_dict(raw)
    raw = _raw()
    raw["deepspeed"]["train_batch_size"] = 64
    with pytest.raises(ConfigError, match=r"deepspeed\.train_batch_size=64: disagrees"):
        dry_run(config_from_dict(raw), build_check=False)
    raw = _raw()
    raw["deepspeed"]["scheduler"]["params"]["min_lr"] = "auto"
    with pytest.raises(ConfigError, match=r"deepspeed\.scheduler\.params\.min_lr='auto'"):
        dry_run(config_from_dict(raw), build_check=False)
    with pytest.raises(ConfigError, match=r"^config="):
        load_config(GPT / "missing.json")


def test_cli_reports_config_errors(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lrscale_megatron.train",
            str(GPT / "gpt3-1.3b.json"),
            "--dry-run",
            "--override",
            "parallel.tp=3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "parallel.tp=3" in proc.stderr or "parallel=" in proc.stderr


def test_lambada_passages_auto_resolves_to_off_where_they_cannot_be_scored():
    assert config_from_dict(_raw()).lambada_passages == 64
    assert config_from_dict(_raw(parallel__pp=2)).lambada_passages == 0  # auto: off, not refused
    assert config_from_dict(_raw(data__lambada_passages=0)).lambada_passages == 0
    prefixes = _raw(
        data__corpus=None, data__train_prefix="/x/train", data__valid_prefix="/x/valid", data__eod=0
    )
    assert config_from_dict(prefixes).lambada_passages == 0
    prefixes["data"]["lambada_passages"] = 4
    with pytest.raises(ConfigError, match="raw text"):
        config_from_dict(prefixes)
