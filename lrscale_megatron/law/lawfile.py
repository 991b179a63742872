"""Law files: a fitted (or published) power law as versioned JSON.

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "name": "steplaw-dense",
      "predictors": ["params", "tokens", "batch"],
      "coefficient": 1.79,                         # c in eta* = c * prod x ** e
      "exponents": {"params": -0.713, ...},        # signed
      "ci": {"level": 0.95, "coefficient": [lo, hi] | null, "exponents": {"params": [lo, hi], ...} | null},
      "fitted_ranges": {"params": [min, max], ...} | null,
      "cv": {"folds": 5, "grouped": true, "r2": ..., "mae_log": ...} | null,
      "bootstrap": {"log_coefficient": [...], "exponents": {"params": [...], ...}} | null,
      "batch_law": {"coefficient": 0.58, "exponents": {"tokens": 0.571}} | null,   # batch_tokens*
      "optimum_method": "parabola" | null,
      "collinearity": {...} | null,
      "provenance": {"data": ..., "date": ..., "command": ..., ...}
    }

Shipped laws live in ``lrscale_megatron/laws/NAME.json`` and are loaded by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class LawFileError(ValueError):
    """A law file is missing a field or holds an invalid value; the message names the field."""


@dataclass(frozen=True)
class PowerLaw:
    """``y = coefficient * prod_p x_p ** exponents[p]``."""

    coefficient: float
    exponents: dict[str, float]

    def __call__(self, values: dict[str, float]) -> float:
        out = self.coefficient
        for p, e in self.exponents.items():
            out *= values[p] ** e
        return out


@dataclass(frozen=True)
class ScalingLaw:
    """A learning-rate law as stored in a law file (see module docstring for the JSON schema).

    Attributes:
        name: short name (shipped laws are loaded by it).
        predictors: predictor names in coefficient order.
        coefficient: c.
        exponents: signed exponent per predictor.
        ci_level: level of the CIs; ``exponent_ci``/``coefficient_ci`` may be ``None`` (published law).
        exponent_ci: (lo, hi) per predictor.
        coefficient_ci: (lo, hi) of c.
        fitted_ranges: (min, max) of each predictor over the fitted data, ``None`` if unknown.
        cv: cross-validation metrics (``folds``, ``grouped``, ``r2``, ``mae_log``), ``None`` if not run.
        bootstrap_log_c: bootstrap samples of log c (may be empty).
        bootstrap_exponents: bootstrap samples per predictor, aligned with ``bootstrap_log_c``.
        batch_law: optimal batch size in tokens as a power law, ``None`` if the law has none.
        optimum_method: how eta* was extracted from each LR sweep.
        collinearity: separability report of the fitted design.
        provenance: data, date, command and anything else that says where the law came from.
    """

    name: str
    predictors: tuple[str, ...]
    coefficient: float
    exponents: dict[str, float]
    provenance: dict[str, Any]
    ci_level: float = 0.95
    exponent_ci: dict[str, tuple[float, float]] | None = None
    coefficient_ci: tuple[float, float] | None = None
    fitted_ranges: dict[str, tuple[float, float]] | None = None
    cv: dict[str, Any] | None = None
    bootstrap_log_c: tuple[float, ...] = ()
    bootstrap_exponents: dict[str, tuple[float, ...]] = field(default_factory=dict)
    batch_law: PowerLaw | None = None
    optimum_method: str | None = None
    collinearity: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # Constructing from code goes through the same checks as loading from JSON.
        _parse(self.to_dict(), f"ScalingLaw({self.name!r})")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "predictors": list(self.predictors),
            "coefficient": self.coefficient,
            "exponents": {p: self.exponents.get(p) for p in self.predictors},
            "ci": {
                "level": self.ci_level,
                "coefficient": list(self.coefficient_ci) if self.coefficient_ci else None,
                "exponents": {p: list(v) for p, v in self.exponent_ci.items()} if self.exponent_ci else None,
            },
            "fitted_ranges": {p: list(v) for p, v in self.fitted_ranges.items()}
            if self.fitted_ranges
            else None,
            "cv": self.cv,
            "bootstrap": (
                {
                    "log_coefficient": list(self.bootstrap_log_c),
                    "exponents": {p: list(v) for p, v in self.bootstrap_exponents.items()},
                }
                if self.bootstrap_log_c
                else None
            ),
            "batch_law": (
                {"coefficient": self.batch_law.coefficient, "exponents": dict(self.batch_law.exponents)}
                if self.batch_law
                else None
            ),
            "optimum_method": self.optimum_method,
            "collinearity": self.collinearity,
            "provenance": self.provenance,
        }
        return d

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p


# ---------------------------------------------------------------------------------------------
# Parsing with errors that name the field.


def _err(src: str, fld: str, problem: str, value: Any, fix: str) -> LawFileError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return LawFileError(f"{src}: field {fld!r} {problem}, got {shown}; fix: {fix}")


def _number(src: str, fld: str, value: Any, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise _err(
            src,
            fld,
            "must be a finite" + (" positive" if positive else "") + " number",
            value,
            "write a number",
        )
    return float(value)


def _pair(src: str, fld: str, value: Any, positive: bool = False) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _err(src, fld, "must be a [lo, hi] pair", value, "write two numbers lo <= hi")
    lo, hi = (_number(src, f"{fld}[{i}]", v, positive) for i, v in enumerate(value))
    if lo > hi:
        raise _err(src, fld, "has lo > hi", value, "write [lo, hi] with lo <= hi")
    return lo, hi


def _mapping(src: str, fld: str, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _err(src, fld, "must be an object", value, f"write an object with keys {list(keys)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise _err(src, f"{fld}.{missing[0]}", "is missing", value, f"give a value for each of {list(keys)}")
    return value


def _parse(d: Any, src: str) -> dict[str, Any]:
    """Validate a law-file dict; returns the keyword arguments of :class:`ScalingLaw`."""
    if not isinstance(d, dict):
        raise _err(src, "<root>", "must be a JSON object", d, "write a law file as produced by `lrscale fit`")
    for key in ("schema_version", "name", "predictors", "coefficient", "exponents", "provenance"):
        if key not in d:
            raise _err(src, key, "is missing", sorted(d), f"add {key!r} (see lrscale_megatron.law.lawfile)")
    if d["schema_version"] != SCHEMA_VERSION:
        raise _err(
            src,
            "schema_version",
            "is not supported",
            d["schema_version"],
            f"use schema_version {SCHEMA_VERSION}",
        )
    if not isinstance(d["name"], str) or not d["name"]:
        raise _err(src, "name", "must be a non-empty string", d["name"], "name the law")
    preds = d["predictors"]
    if not isinstance(preds, list | tuple) or not preds or not all(isinstance(p, str) and p for p in preds):
        raise _err(src, "predictors", "must be a non-empty list of names", preds, 'e.g. ["params", "tokens"]')
    if len(set(preds)) != len(preds):
        raise _err(src, "predictors", "has duplicates", preds, "name each predictor once")
    preds = tuple(preds)
    exps = _mapping(src, "exponents", d["exponents"], preds)
    out: dict[str, Any] = {
        "name": d["name"],
        "predictors": preds,
        "coefficient": _number(src, "coefficient", d["coefficient"], positive=True),
        "exponents": {p: _number(src, f"exponents.{p}", exps[p]) for p in preds},
    }
    ci = d.get("ci") or {}
    if not isinstance(ci, dict):
        raise _err(src, "ci", "must be an object or null", ci, 'write {"level": 0.95, ...}')
    level = ci.get("level", 0.95)
    out["ci_level"] = _number(src, "ci.level", level, positive=True)
    if not out["ci_level"] < 1:
        raise _err(src, "ci.level", "must be in (0, 1)", level, "e.g. 0.95")
    if ci.get("coefficient") is not None:
        out["coefficient_ci"] = _pair(src, "ci.coefficient", ci["coefficient"], positive=True)
    if ci.get("exponents") is not None:
        m = _mapping(src, "ci.exponents", ci["exponents"], preds)
        out["exponent_ci"] = {p: _pair(src, f"ci.exponents.{p}", m[p]) for p in preds}
    if d.get("fitted_ranges") is not None:
        m = _mapping(src, "fitted_ranges", d["fitted_ranges"], preds)
        out["fitted_ranges"] = {p: _pair(src, f"fitted_ranges.{p}", m[p], positive=True) for p in preds}
    if d.get("cv") is not None:
        cv = _mapping(src, "cv", d["cv"], ("folds", "r2", "mae_log"))
        for k in ("r2", "mae_log"):
            if cv[k] is not None:
                _number(src, f"cv.{k}", cv[k])
        out["cv"] = dict(cv)
    if d.get("bootstrap") is not None:
        b = _mapping(src, "bootstrap", d["bootstrap"], ("log_coefficient", "exponents"))
        logc = b["log_coefficient"]
        if not isinstance(logc, list | tuple):
            raise _err(
                src, "bootstrap.log_coefficient", "must be a list", logc, "write one number per resample"
            )
        out["bootstrap_log_c"] = tuple(
            _number(src, f"bootstrap.log_coefficient[{i}]", v) for i, v in enumerate(logc)
        )
        be = _mapping(src, "bootstrap.exponents", b["exponents"], preds)
        out["bootstrap_exponents"] = {}
        for p in preds:
            v = be[p]
            if not isinstance(v, list | tuple) or len(v) != len(logc):
                raise _err(
                    src,
                    f"bootstrap.exponents.{p}",
                    f"must be a list of {len(logc)} numbers",
                    v,
                    "write one exponent per resample, aligned with bootstrap.log_coefficient",
                )
            out["bootstrap_exponents"][p] = tuple(
                _number(src, f"bootstrap.exponents.{p}[{i}]", x) for i, x in enumerate(v)
            )
    if d.get("batch_law") is not None:
        bl = _mapping(src, "batch_law", d["batch_law"], ("coefficient", "exponents"))
        if not isinstance(bl["exponents"], dict) or not bl["exponents"]:
            raise _err(
                src,
                "batch_law.exponents",
                "must be a non-empty object",
                bl["exponents"],
                'e.g. {"tokens": 0.571}',
            )
        out["batch_law"] = PowerLaw(
            _number(src, "batch_law.coefficient", bl["coefficient"], positive=True),
            {k: _number(src, f"batch_law.exponents.{k}", v) for k, v in bl["exponents"].items()},
        )
    if d.get("optimum_method") is not None:
        if not isinstance(d["optimum_method"], str):
            raise _err(
                src, "optimum_method", "must be a string or null", d["optimum_method"], 'e.g. "parabola"'
            )
        out["optimum_method"] = d["optimum_method"]
    if d.get("collinearity") is not None:
        out["collinearity"] = _mapping(src, "collinearity", d["collinearity"], ())
    prov = d["provenance"]
    if not isinstance(prov, dict) or not all(k in prov for k in ("data", "date", "command")):
        raise _err(
            src,
            "provenance",
            "must be an object with data, date and command",
            prov,
            'record where the law came from: {"data": ..., "date": ..., "command": ...}',
        )
    out["provenance"] = dict(prov)
    return out


def law_from_dict(d: Any, source: str = "<dict>") -> ScalingLaw:
    """Validate and build a :class:`ScalingLaw`; errors name the bad field."""
    return ScalingLaw(**_parse(d, source))


def shipped_law_names() -> list[str]:
    """Names of the law files shipped in ``lrscale_megatron/laws/``."""
    root = resources.files("lrscale_megatron") / "laws"
    if not root.is_dir():
        return []
    return sorted(e.name[: -len(".json")] for e in root.iterdir() if e.name.endswith(".json"))


def load_law(name_or_path: str | Path) -> ScalingLaw:
    """A shipped law by name (e.g. ``"steplaw-dense"``) or a law file by path."""
    text: str
    src = str(name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    elif src.endswith(".json") or "/" in src:
        raise LawFileError(
            f"law: file {src!r} does not exist; fix: pass an existing law file or one of {shipped_law_names()}"
        )
    else:
        res = resources.files("lrscale_megatron") / "laws" / f"{src}.json"
        if not res.is_file():
            raise LawFileError(
                f"law: unknown law name {src!r}; fix: use one of {shipped_law_names()} or a path to a law file"
            )
        text = res.read_text()
        src = f"shipped law {src!r}"
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise LawFileError(f"{src}: not valid JSON ({e}); fix: regenerate it with `lrscale fit`") from e
    return law_from_dict(d, src)
