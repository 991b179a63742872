"""The shared pydantic config base: errors name the field path, the value, the problem and the fix."""

from __future__ import annotations

import math
from typing import Literal

import pytest
from pydantic import Field, ValidationError, field_validator

from lrscale_megatron.configs import ConfigError, ConfigModel


class MyError(ConfigError):
    pass


class Inner(ConfigModel):
    error_class = MyError
    safety: float = Field(0.5, json_schema_extra={"fix": "use e.g. 0.5"})
    """Multiplier in (0, 1]."""
    band: tuple[float, float] = Field((0.1, 10.0), strict=False)
    """Low and high multipliers."""

    @field_validator("safety")
    @classmethod
    def _safety(cls, v: float) -> float:
        if not (math.isfinite(v) and 0 < v <= 1):
            raise MyError("safety", v, "must be in (0, 1]", "use e.g. 0.5")
        return v


class Outer(ConfigModel):
    error_class = MyError
    total_steps: int
    """Steps of the run."""
    style: Literal["cosine", "linear"] = "cosine"
    online: Inner = Inner()


def _err(raw, where="scheduler.params") -> MyError:
    with pytest.raises(MyError) as ei:
        Outer.from_dict(raw, where)
    return ei.value


def test_valid_and_comments_dropped():
    c = Outer.from_dict({"_comment": "x", "total_steps": 10, "online": {"band": [0.5, 2], "_c": 1}})
    assert c.total_steps == 10 and c.online.band == (0.5, 2.0) and c.style == "cosine"
    assert c.replace(total_steps=20).total_steps == 20
    assert c.to_dict()["online"]["band"] == [0.5, 2.0]


def test_unknown_key_did_you_mean():
    e = _err({"total_steps": 10, "styel": "cosine"})
    assert e.field_name == "scheduler.params.styel" and e.problem == "unknown key"
    assert "did you mean 'style'" in e.fix and "total_steps" in e.fix


def test_missing_and_types():
    assert _err({}).field_name == "scheduler.params.total_steps"
    e = _err({"total_steps": "10"})
    assert "expected an integer" in e.problem and "without quotes" in e.fix
    e = _err({"total_steps": 10.0})
    assert "write 10" in e.fix
    assert isinstance(Outer.from_dict({"total_steps": 1, "online": {"safety": 1}}).online.safety, float)


def test_literal_and_validator_words_kept():
    e = _err({"total_steps": 1, "style": "cosin"})
    assert e.field_name == "scheduler.params.style" and "did you mean 'cosine'" in e.fix
    e = _err({"total_steps": 1, "online": {"safety": 2.0}})
    assert str(e) == "scheduler.params.online.safety=2.0: must be in (0, 1]. Fix: use e.g. 0.5"
    e = _err({"total_steps": 1, "online": {"saftey": 0.5}})
    assert e.field_name == "scheduler.params.online.saftey" and "did you mean 'safety'" in e.fix


def test_not_a_mapping_and_schema():
    with pytest.raises(MyError, match="must be a mapping"):
        Outer.from_dict([1], "x")
    schema = Outer.json_schema()
    assert schema["properties"]["total_steps"]["description"] == "Steps of the run."
    with pytest.raises(ValidationError):  # frozen
        Outer.from_dict({"total_steps": 1}).total_steps = 2  # type: ignore[misc]
