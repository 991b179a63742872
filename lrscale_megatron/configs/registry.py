"""Every top-level config model, by name: the one list ``lrscale schema`` and ``lrscale init`` read.

A new config model is registered with one line in :data:`CONFIG_MODELS`::

    "NAME": ("package.module:ClassName", "folder"),

``folder`` is the ``configs/<folder>/`` whose files the model validates (``lrscale init`` points editors
at the schema for them), or ``None`` for a model that lives inside another file (e.g. the LRScale
``scheduler.params`` block of a DeepSpeed JSON). Classes are imported only when asked for, so listing the
names imports nothing heavy. ``tests/unit/test_config_registry.py`` checks that every
:class:`~lrscale_megatron.configs.base.ConfigModel` subclass in the package is registered or is a section
of a registered model.
"""

from __future__ import annotations

import importlib
from typing import Any

from lrscale_megatron.configs.base import ConfigModel

CONFIG_MODELS: dict[str, tuple[str, str | None]] = {
    "train": ("lrscale_megatron.train.config:TrainConfig", "gpt"),
    "scheduler": ("lrscale_megatron.scheduler_config:LRScaleConfig", None),
    "compare": ("lrscale_megatron.compare.config:CompareConfig", "compare"),
    "sweep": ("lrscale_megatron.sweep.config:SweepFile", "sweep"),
    "tune": ("lrscale_megatron.tune.config:TuneConfig", "tune"),
}
"""name -> (``module:Class``, the ``configs/`` folder its files live in, or ``None``)."""


def config_names() -> list[str]:
    return sorted(CONFIG_MODELS)


def config_model(name: str) -> type[ConfigModel]:
    """The registered model class called ``name`` (an error lists the names)."""
    if name not in CONFIG_MODELS:
        raise KeyError(f"unknown config {name!r}; choose one of {config_names()}")
    module, _, cls_name = CONFIG_MODELS[name][0].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, ConfigModel)):
        raise TypeError(f"config {name!r}: {CONFIG_MODELS[name][0]} is not a ConfigModel subclass")
    return cls


def config_schema(name: str) -> dict[str, Any]:
    """JSON schema (draft 2020-12) of config ``name``, for editors: ``_``-keys (comments) allowed."""
    schema = config_model(name).json_schema()
    _allow_comment_keys(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _allow_comment_keys(node: Any) -> None:
    """Every closed object also accepts keys starting with ``_`` (dropped on load, see ``strip_comments``)."""
    if isinstance(node, dict):
        if node.get("additionalProperties") is False:
            node["patternProperties"] = {"^_": {}}
        for v in node.values():
            _allow_comment_keys(v)
    elif isinstance(node, list):
        for v in node:
            _allow_comment_keys(v)
