"""The train config on the pydantic base: same values as the JSON, strict types, bounds in the schema,
``replace`` keeps ``source``, every section's rules name the field (no DeepSpeed engine, no megatron)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from lrscale_megatron.configs import ConfigError as BaseConfigError
from lrscale_megatron.train.config import (
    ConfigError,
    ParallelConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "gpt" / "cpu-tiny.json"


def _raw() -> dict:
    raw = json.loads(TINY.read_text())
    raw["deepspeed"] = "../deepspeed/cpu-adamw-lrscale.json"
    return raw


def _err(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, base_dir=TINY.parent)
    return e.value


def test_loads_the_json_values_and_dumps_them_back():
    cfg = load_config(TINY)
    raw = json.loads(TINY.read_text())
    assert ConfigError is BaseConfigError and cfg.source == str(TINY)
    d = cfg.to_dict()
    for section in ("model", "training"):
        for key, value in raw[section].items():
            if not key.startswith("_"):
                assert d[section][key] == value, (section, key)
    assert isinstance(cfg.training.lr, float) and d["deepspeed"]["optimizer"]["type"]
    assert "_comment" not in json.dumps(d) and "source" not in d
    assert pickle.loads(pickle.dumps(cfg)).to_dict() == d


def test_replace_validates_and_keeps_source():
    cfg = load_config(TINY)
    one = cfg.replace(parallel=ParallelConfig(), model=cfg.model.replace(init="megatron"))
    assert one.model.init == "megatron" and one.source == cfg.source and one.model.name == cfg.model.name
    with pytest.raises(ConfigError, match=r"^parallel.pp=3: does not divide model.num_layers"):
        cfg.replace(parallel={"pp": 3})
    with pytest.raises(ConfigError, match=r"^init='meg': unknown init"):
        cfg.model.replace(init="meg")
    with pytest.raises(Exception, match="frozen"):
        cfg.training.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "section, key, value, field, words",
    [
        ("training", "steps", 20.0, "training.steps", "(write 20)"),
        ("training", "steps", True, "training.steps", "expected an integer"),
        ("training", "lr", float("nan"), "training.lr", "finite number > 0"),
        ("training", "dtype", "float6", "training.dtype", "did you mean 'float64'"),
        ("model", "tie_embeddings", 1, "model.tie_embeddings", "true or false"),
        ("model", "transformer_impl", "te", "model.transformer_impl", "unknown implementation"),
        ("checkpoint", "save_every", -1, "checkpoint.save_every", "integer >= 0"),
        ("data", "tokenizer_vocab_size", 100, "data.tokenizer_vocab_size", "integer >= 258"),
        ("data", "train_prefix", "x", "data.train_prefix", "together with corpus='shakespeare'"),
        ("parallel", "dp", 0, "parallel.dp", "positive integer"),
    ],
)
def test_section_rules_name_the_field(section, key, value, field, words):
    raw = _raw()
    raw.setdefault(section, {})[key] = value
    e = _err(raw)
    assert e.field_name == field and words in str(e) and "Fix:" in str(e)


def test_top_level_keys_sections_and_deepspeed():
    raw = _raw()
    raw["modle"] = {}
    e = _err(raw)
    assert e.field_name == "modle" and "did you mean 'model'" in e.fix
    raw = _raw()
    del raw["training"]
    assert _err(raw).field_name == "training"
    raw = _raw()
    raw["deepspeed"] = ["not", "a", "mapping"]
    assert "mapping or a JSON path" in str(_err(raw))
    raw = _raw()
    raw["deepspeed"] = {"zero_optimization": {"stage": 3}}
    assert "stage=3" in str(_err(raw))
    raw["deepspeed"] = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    del raw["training"]["lr"]
    e = _err(raw)
    assert e.field_name == "training.lr" and "'auto'" in e.problem
    raw["deepspeed"] = "missing.json"
    assert "file not found" in str(_err(raw))


def test_overrides_reach_sections_and_the_deepspeed_json(tmp_path):
    cfg = load_config(TINY, ["training.steps=30", "deepspeed.gradient_clipping=0.5", "model.init=megatron"])
    assert cfg.training.steps == 30 and cfg.deepspeed["gradient_clipping"] == 0.5
    assert cfg.model.init == "megatron"
    with pytest.raises(ConfigError, match="is not key=value"):
        apply_overrides({}, ["training.steps"])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="^config=.*is not valid JSON"):
        load_config(bad)
    raw = _raw()
    raw["deepspeed"] = str(bad)
    with pytest.raises(ConfigError, match="^deepspeed=.*is not valid JSON"):
        config_from_dict(raw)


def test_schema_has_docs_bounds_and_choices():
    schema = TrainConfig.json_schema()
    assert set(schema["required"]) == {"model", "training"} and schema["additionalProperties"] is False
    training = schema["$defs"]["TrainingConfig"]["properties"]
    assert training["steps"]["minimum"] == 1 and "Optimizer iterations" in training["steps"]["description"]
    assert training["dtype"]["enum"] == ["float32", "float64", "bfloat16"]
    assert training["lr"]["exclusiveMinimum"] == 0
    assert schema["$defs"]["ParallelConfig"]["description"].startswith("Layout")
