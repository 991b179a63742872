"""One validation mechanism for every config: pydantic v2 models, errors in the project's own words.

DeepSpeed validates its JSON with pydantic models (``DeepSpeedConfigModel``); so do we. Every config
(scheduler params, train, sweep, compare, tune) subclasses :class:`ConfigModel`, which

* forbids unknown keys (keys starting with ``_``, e.g. ``"_comment"``, are dropped first) and suggests the
  closest known key ("did you mean ...");
* is strict about types (``"3"`` is not a number, ``3.0`` is not an integer, ``1`` is not ``true``; an
  integer is accepted where a float is expected);
* is frozen (a config never changes after validation; use :meth:`ConfigModel.replace`);
* turns pydantic's ``ValidationError`` into :class:`ConfigError` (or the subclass named by
  ``error_class``) whose message names the field path, the value, what is wrong and the fix:
  ``online.safety=2.0: must be in (0, 1]. Fix: use e.g. 0.5``.

The fix comes from, in order: a :class:`ConfigError` raised by a validator (it keeps its own words; its
field is prefixed with the path), the field's ``json_schema_extra={"fix": "..."}``, or a generic fix from
the error type. Each model emits a JSON schema for editors with :meth:`ConfigModel.json_schema`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A bad config value: names the field, the value, what is wrong and the fix."""

    def __init__(self, field_name: str, value: Any, problem: str, fix: str) -> None:
        self.field_name, self.value, self.problem, self.fix = field_name, value, problem, fix
        super().__init__(f"{field_name}={value!r}: {problem}. Fix: {fix}")

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error with ``prefix.`` in front of the field name (same class)."""
        name = f"{prefix}.{self.field_name}" if prefix else self.field_name
        return type(self)(name, self.value, self.problem, self.fix)


_KIND = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}


def did_you_mean(value: Any, choices: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def strip_comments(raw: Any) -> Any:
    """Drop keys starting with ``_`` at every level (JSON has no comments)."""
    if isinstance(raw, Mapping):
        return {k: strip_comments(v) for k, v in raw.items() if not str(k).startswith("_")}
    if isinstance(raw, list):
        return [strip_comments(v) for v in raw]
    return raw


def _model_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model class that holds the last element of ``loc`` (for key lists and fixes)."""
    cur: Any = cls
    for part in loc[:-1]:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        f = cur.model_fields.get(str(part))
        if f is None:
            return None
        ann = f.annotation
        cur = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            ann,
        )
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


class ConfigModel(BaseModel):
    """Base of every lrscale-megatron config model (see the module docstring).

    Subclasses set ``error_class`` to their module's :class:`ConfigError` subclass, declare fields with
    docstrings (and ``Field(json_schema_extra={"fix": ...})`` for a field-specific fix), and raise
    :class:`ConfigError` (field name relative to the model) from ``field_validator`` / ``model_validator``
    for cross-field rules.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, validate_default=False, use_attribute_docstrings=True
    )
    error_class: ClassVar[type[ConfigError]] = ConfigError

    @classmethod
    def from_dict(cls, raw: Any, where: str = ""):  # type: ignore[no-untyped-def]
        """Validate ``raw`` (a mapping from JSON); raise ``error_class`` naming ``where.field``."""
        if not isinstance(raw, Mapping):
            raise cls.error_class(where or cls.__name__, raw, "must be a mapping", "write {...}")
        try:
            return cls.model_validate(strip_comments(raw))
        except ValidationError as e:
            raise cls._translate(e, where) from None

    @classmethod
    def _translate(cls, exc: ValidationError, where: str) -> ConfigError:
        err = exc.errors(include_url=False)[0]
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in ((where,) if where else ()) + loc)
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, ConfigError):
            # a validator's own words; its field is relative to the model that raised it (a field
            # validator's loc ends with that field, a model validator's at the model)
            if loc and inner.field_name.split(".")[0] == str(loc[-1]):
                loc = loc[:-1]
            owner = ".".join(str(p) for p in ((where,) if where else ()) + loc)
            e = inner.prefixed(owner)
            return cls.error_class(e.field_name, e.value, e.problem, e.fix)
        value, kind = err.get("input"), err["type"]
        holder = _model_at(cls, loc) if loc else cls
        known = list(holder.model_fields) if holder is not None else []
        fix = ""
        if holder is not None and loc and str(loc[-1]) in holder.model_fields:
            extra = holder.model_fields[str(loc[-1])].json_schema_extra
            given = extra.get("fix") if isinstance(extra, dict) else None
            fix = given if isinstance(given, str) else ""
        if kind == "extra_forbidden":
            return cls.error_class(
                path,
                value,
                "unknown key",
                f"remove it; known keys: {', '.join(known)}{did_you_mean(loc[-1], known)}",
            )
        if kind == "missing":
            return cls.error_class(path, None, "missing required key", fix or f"add {str(loc[-1])!r}")
        if kind == "literal_error":
            expected = ctx.get("expected", "")
            choices = [
                c.strip().strip("'") for c in str(expected).replace(" or ", ",").split(",") if c.strip()
            ]
            return cls.error_class(
                path, value, "unknown value", fix or f"use one of {expected}{did_you_mean(value, choices)}"
            )
        if kind in _KIND:
            want = _KIND[kind]
            hint = ""
            if isinstance(value, str) and want in ("an integer", "a number"):
                hint = " (write the number without quotes)"
            elif isinstance(value, float) and want == "an integer" and value.is_integer():
                hint = f" (write {int(value)})"
            return cls.error_class(
                path,
                value,
                f"has type {type(value).__name__}, expected {want}",
                (fix or f"give {want}") + hint,
            )
        problem = err["msg"][0].lower() + err["msg"][1:] if err["msg"] else kind
        return cls.error_class(path, value, problem, fix or "see the field's documentation")

    def replace(self, **changes: Any):  # type: ignore[no-untyped-def]
        """A validated copy with ``changes`` (like ``dataclasses.replace``; errors as ``from_dict``)."""
        return type(self).from_dict({**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists)."""
        return self.model_dump(mode="json")

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """JSON schema of this config, with the field docstrings as descriptions (for editors)."""
        return cls.model_json_schema()
