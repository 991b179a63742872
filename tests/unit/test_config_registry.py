"""The config registry behind ``lrscale schema`` / ``lrscale init``: every config model is in it, every
schema is valid JSON Schema, and every shipped example config validates against its schema."""

from __future__ import annotations

import importlib
import json
import pkgutil
import typing
from pathlib import Path

import jsonschema
import pytest

import lrscale_megatron
from lrscale_megatron.configs import ConfigModel
from lrscale_megatron.configs.registry import CONFIG_MODELS, config_model, config_names, config_schema

ROOT = Path(__file__).resolve().parents[2]


def _models_in(annotation: object) -> list[type[ConfigModel]]:
    if isinstance(annotation, type) and issubclass(annotation, ConfigModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def _reachable(root: type[ConfigModel]) -> set[type[ConfigModel]]:
    seen, todo = set(), [root]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo += [m for f in cls.model_fields.values() for m in _models_in(f.annotation)]
    return seen


def test_every_config_model_in_the_package_is_registered():
    for mod in pkgutil.walk_packages(lrscale_megatron.__path__, "lrscale_megatron."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    ours, todo = set(), list(ConfigModel.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("lrscale_megatron."):
            ours.add(cls)
        todo += cls.__subclasses__()
    covered = set().union(*(_reachable(config_model(n)) for n in config_names()))
    bases = {b for cls in covered for b in cls.__mro__}
    missing = sorted(f"{c.__module__}:{c.__name__}" for c in ours - covered - bases)
    assert not missing, f"add these to CONFIG_MODELS in lrscale_megatron/configs/registry.py: {missing}"


@pytest.mark.parametrize("name", sorted(CONFIG_MODELS))
def test_schema_is_valid_and_every_shipped_example_matches_it(name):
    schema = config_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    folder = CONFIG_MODELS[name][1]
    files = sorted((ROOT / "configs" / folder).glob("*.json")) if folder else []
    assert not folder or files, f"no configs/{folder}/*.json"
    for path in files:
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(json.loads(path.read_text()))
        ]
        assert not errors, (path.name, errors)


def test_train_schema_flags_what_the_model_refuses():
    validator = jsonschema.Draft202012Validator(config_schema("train"))
    raw = json.loads((ROOT / "configs" / "gpt" / "cpu-tiny.json").read_text())
    raw["model"]["hidden_sise"] = 64
    raw["training"]["steps"] = 0
    raw["training"]["dtype"] = "fp8"
    messages = sorted(e.message for e in validator.iter_errors(raw))
    assert len(messages) == 3 and any("hidden_sise" in m for m in messages)
    assert any("minimum of 1" in m for m in messages) and any("'fp8' is not one of" in m for m in messages)


def test_unknown_name_lists_the_names():
    with pytest.raises(KeyError, match="choose one of"):
        config_model("nope")
