"""Reading a config file and ``key=value`` overrides: the same steps for every ``lrscale`` job.

    raw = read_json_file(path, "give a JSON file under configs/gpt/")   # errors name the file and the fix
    raw = apply_overrides(raw, ["training.steps=20", "deepspeed.gradient_clipping=0.5"])

Both raise :class:`~lrscale_megatron.configs.base.ConfigError` (or the ``error_class`` given).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lrscale_megatron.configs.base import ConfigError


def read_json_file(
    path: str | Path, fix: str, error_class: type[ConfigError] = ConfigError, field: str = "config"
) -> Any:
    """The parsed JSON of ``path``; a missing file or bad syntax is an error naming ``field`` and the path."""
    p = Path(path)
    if not p.is_file():
        raise error_class(field, str(path), "file not found", fix)
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise error_class(field, str(path), f"is not valid JSON ({e})", "fix the JSON syntax") from None


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], error_class: type[ConfigError] = ConfigError
) -> dict[str, Any]:
    """``key.sub=value`` (value parsed as JSON, else kept as a string) into a copy of ``raw``; missing
    sections on the way are created."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise error_class(
                "--override", item, "is not key=value", "write e.g. --override training.steps=20"
            )
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parts = key.strip().split(".")
        cur = out
        for i, k in enumerate(parts[:-1]):
            if k not in cur or cur[k] is None:
                cur[k] = {}
            if not isinstance(cur[k], dict):
                raise error_class(".".join(parts[: i + 1]), cur[k], "is not a section", f"cannot set {key}")
            cur = cur[k]
        cur[parts[-1]] = value
    return out
