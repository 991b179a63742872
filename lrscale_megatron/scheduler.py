"""The LRScale scheduler: a pure schedule (:mod:`.schedule`) bound to an optimizer's param groups.

One typed config (:class:`LRScaleConfig`), one state machine (:class:`LRScaleCore`: step count, peak(s),
online adaptation, checkpoint state) and one optimizer binding for DeepSpeed and plain PyTorch
(:class:`LRScaleScheduler`). The Megatron binding lives in :mod:`.integrations.megatron` and reuses
the same core.

Units: under DeepSpeed and plain PyTorch a step is one optimizer iteration (``scheduler.step()`` after
each ``optimizer.step()``). Under Megatron-LM a step is a *sample* (``step(increment=global_batch_size)``)
and ``warmup_steps``, ``total_steps`` and ``online.adapt_every`` are then counted in samples.

Plain PyTorch::

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)        # lr only sets per-group ratios
    sched = LRScaleScheduler(opt, LRScaleConfig(peak_lr=3e-4, warmup_steps=100, total_steps=10_000))
    for batch in data:
        loss = model(batch); loss.backward(); opt.step(); opt.zero_grad(); sched.step()

Per-group LRs set by the user are kept as ratios (DeepSpeed issue #7713): a group created with
``lr=1e-4`` in an optimizer whose default ``lr`` is ``1e-3`` follows the schedule scaled by 0.1.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrscale_megatron.adapter import (
    AdapterState,
    Decision,
    Estimate,
    Estimator,
    OnlineConfig,
    adapt,
    crossed,
    curvature_estimator,
)
from lrscale_megatron.schedule import DECAY_STYLES, WSD_DECAY_SHAPES, lr_at

if TYPE_CHECKING:
    from lrscale_megatron.monitor import LRScaleMonitor

logger = logging.getLogger(__name__)

STATE_FORMAT = 1


class LRScaleConfigError(ValueError):
    """A bad scheduler setting: names the field, the value, what is wrong and how to fix it."""

    def __init__(self, field_name: str, value: Any, problem: str, fix: str) -> None:
        self.field_name, self.value, self.problem, self.fix = field_name, value, problem, fix
        super().__init__(f"{field_name}={value!r}: {problem}. Fix: {fix}")

    def prefixed(self, prefix: str) -> LRScaleConfigError:
        return LRScaleConfigError(f"{prefix}.{self.field_name}", self.value, self.problem, self.fix)


@dataclass(frozen=True)
class ModelSizes:
    """The run's sizes fed to the law (the ``model`` block of the scheduler params).

    Attributes:
        params: number of (non-embedding) parameters, as the law was fitted.
        tokens: training tokens of the whole run.
        batch_tokens: tokens per optimizer step (global batch size x sequence length).
        width: hidden size, for laws with a width term.
        depth: number of layers, for laws with a depth term.
    """

    params: float
    tokens: float
    batch_tokens: float
    width: int | None = None
    depth: int | None = None

    def __post_init__(self) -> None:
        for name in ("params", "tokens", "batch_tokens"):
            _check_positive(name, getattr(self, name), f"give the run's {name} as a positive number")
        for name in ("width", "depth"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise LRScaleConfigError(name, v, "must be a positive integer", f"give the model's {name}")


@dataclass(frozen=True)
class LRScaleConfig:
    """Scheduler settings (the ``params`` of ``"scheduler": {"type": "LRScale"}``).

    Give the peak LR either explicitly (``peak_lr``) or from a fitted law (``law`` + ``model``).

    Attributes:
        total_steps: step at which decay ends (warmup included); afterwards the LR is ``min_lr``.
        peak_lr: explicit peak LR (exclusive with ``law``).
        min_lr: floor of the decay.
        init_lr: LR at step 0, from which warmup rises linearly.
        warmup_steps: steps of linear warmup (< ``total_steps``).
        decay_style: ``cosine`` | ``linear`` | ``inverse_sqrt`` | ``wsd`` | ``constant``.
        wsd_decay_fraction: for ``wsd``, fraction of ``total_steps`` spent in the final decay.
        wsd_decay_shape: for ``wsd``: ``linear`` | ``cosine`` | ``exponential`` | ``minus_sqrt``.
        law: preset name or path of a law file (resolved by ``lrscale_megatron.law.predict``).
        model: the run's sizes for the law (:class:`ModelSizes`).
        online: online spectral adaptation (:class:`~lrscale_megatron.adapter.OnlineConfig`).
    """

    total_steps: int
    peak_lr: float | None = None
    min_lr: float = 0.0
    init_lr: float = 0.0
    warmup_steps: int = 0
    decay_style: str = "cosine"
    wsd_decay_fraction: float = 0.2
    wsd_decay_shape: str = "linear"
    law: str | None = None
    model: ModelSizes | None = None
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise LRScaleConfigError(
                "total_steps",
                self.total_steps,
                "must be > 0",
                "set the step at which decay ends (e.g. the run's total iterations)",
            )
        if self.warmup_steps < 0:
            raise LRScaleConfigError("warmup_steps", self.warmup_steps, "must be >= 0", "use 0 for no warmup")
        if self.warmup_steps >= self.total_steps:
            raise LRScaleConfigError(
                "warmup_steps",
                self.warmup_steps,
                f"must be < total_steps ({self.total_steps})",
                "shorten the warmup or raise total_steps",
            )
        if self.peak_lr is None and self.law is None:
            raise LRScaleConfigError(
                "peak_lr",
                None,
                "no peak LR: neither peak_lr nor law is given",
                "set peak_lr, or law (preset name or law-file path) with model sizes",
            )
        if self.peak_lr is not None and self.law is not None:
            raise LRScaleConfigError(
                "law",
                self.law,
                f"given together with peak_lr={self.peak_lr!r}",
                "keep exactly one of peak_lr and law",
            )
        if self.peak_lr is not None:
            _check_positive("peak_lr", self.peak_lr, "use a positive learning rate such as 3e-4")
        if self.law is not None:
            if not self.law:
                raise LRScaleConfigError("law", self.law, "is empty", "give a preset name or a law-file path")
            if self.model is None:
                raise LRScaleConfigError(
                    "model",
                    None,
                    "is required with law",
                    "add model: {params, tokens, batch_tokens[, width, depth]}",
                )
        _check_nonneg("min_lr", self.min_lr, "use 0.0 or a positive floor")
        _check_nonneg("init_lr", self.init_lr, "use 0.0 (warmup from zero) or a positive start")
        if self.peak_lr is not None:
            for name in ("min_lr", "init_lr"):
                if getattr(self, name) > self.peak_lr:
                    raise LRScaleConfigError(
                        name,
                        getattr(self, name),
                        f"exceeds peak_lr ({self.peak_lr})",
                        f"make {name} <= peak_lr",
                    )
        if self.decay_style not in DECAY_STYLES:
            raise LRScaleConfigError(
                "decay_style",
                self.decay_style,
                "unknown decay style",
                f"use one of {', '.join(DECAY_STYLES)}{_did_you_mean(self.decay_style, DECAY_STYLES)}",
            )
        if self.wsd_decay_shape not in WSD_DECAY_SHAPES:
            raise LRScaleConfigError(
                "wsd_decay_shape",
                self.wsd_decay_shape,
                "unknown WSD decay shape",
                f"use one of {', '.join(WSD_DECAY_SHAPES)}",
            )
        if not (0.0 < self.wsd_decay_fraction <= 1.0) or not math.isfinite(self.wsd_decay_fraction):
            raise LRScaleConfigError(
                "wsd_decay_fraction",
                self.wsd_decay_fraction,
                "must be in (0, 1]",
                "use e.g. 0.2 (decay over the last 20% of total_steps)",
            )
        if self.decay_style == "wsd":
            n = self.wsd_decay_steps
            if n < 1 or n > self.total_steps - self.warmup_steps:
                raise LRScaleConfigError(
                    "wsd_decay_fraction",
                    self.wsd_decay_fraction,
                    f"gives {n} decay steps, outside [1, total_steps - warmup_steps = "
                    f"{self.total_steps - self.warmup_steps}]",
                    "pick a fraction whose decay fits after the warmup",
                )
        _validate_online(self.online)

    @property
    def wsd_decay_steps(self) -> int:
        """Length of the WSD decay phase in steps: ``round(wsd_decay_fraction * total_steps)``."""
        return int(round(self.wsd_decay_fraction * self.total_steps))

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], where: str = "scheduler.params") -> LRScaleConfig:
        """Build from a JSON-like mapping (DeepSpeed ``scheduler.params``), checking keys and types.

        Every error names ``where.field``, the value and the fix.
        """
        if not isinstance(params, Mapping):
            raise LRScaleConfigError(where, params, "must be a mapping", 'write "params": {...}')
        kw = _typed_fields(cls, params, where, nested={"model": ModelSizes, "online": OnlineConfig})
        if "total_steps" not in kw:
            raise LRScaleConfigError(
                f"{where}.total_steps",
                None,
                "is required",
                "set the step at which decay ends (e.g. the run's total iterations)",
            )
        try:
            return cls(**kw)
        except LRScaleConfigError as e:
            raise e.prefixed(where) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-compatible; tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _did_you_mean(value: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_positive(name: str, v: float, fix: str) -> None:
    if not (math.isfinite(v) and v > 0):
        raise LRScaleConfigError(name, v, "must be a finite number > 0", fix)


def _check_nonneg(name: str, v: float, fix: str) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise LRScaleConfigError(name, v, "must be a finite number >= 0", fix)


def _validate_online(c: OnlineConfig) -> None:
    p = "online"
    if c.adapt_every < 1:
        raise LRScaleConfigError(
            f"{p}.adapt_every", c.adapt_every, "must be >= 1", "measure every N >= 1 steps"
        )
    if c.start_step is not None and c.start_step < 0:
        raise LRScaleConfigError(
            f"{p}.start_step", c.start_step, "must be >= 0", "omit it to start after warmup"
        )
    if c.rule not in ("eos", "inverse"):
        raise LRScaleConfigError(f"{p}.rule", c.rule, "unknown rule", "use 'eos' or 'inverse'")
    if not (0.0 <= c.beta1 < 1.0):
        raise LRScaleConfigError(f"{p}.beta1", c.beta1, "must be in [0, 1)", "use Adam's beta1, e.g. 0.9")
    if not (0.0 < c.safety <= 1.0):
        raise LRScaleConfigError(f"{p}.safety", c.safety, "must be in (0, 1]", "use e.g. 0.5")
    _check_positive(f"{p}.eta_base", c.eta_base, "use a positive numerator, e.g. 1.0")
    if not (0.0 <= c.ema < 1.0):
        raise LRScaleConfigError(f"{p}.ema", c.ema, "must be in [0, 1)", "use 0 for no smoothing, e.g. 0.5")
    if c.combine not in ("min", "max", "geomean", "online"):
        raise LRScaleConfigError(
            f"{p}.combine",
            c.combine,
            "unknown combination",
            "use 'min' (default), 'max', 'geomean' or 'online'",
        )
    lo, hi = c.band
    if not (math.isfinite(hi) and 0.0 < lo <= 1.0 <= hi):
        raise LRScaleConfigError(
            f"{p}.band",
            c.band,
            "must satisfy 0 < low <= 1 <= high",
            "use e.g. [0.1, 10.0] (multiples of the offline peak)",
        )
    if not (math.isfinite(c.max_change) and c.max_change > 1.0):
        raise LRScaleConfigError(
            f"{p}.max_change",
            c.max_change,
            "must be a finite number > 1",
            "use e.g. 2.0 (at most x2 or /2 per adaptation)",
        )
    if c.hvp not in ("exact", "fd"):
        raise LRScaleConfigError(
            f"{p}.hvp", c.hvp, "unknown Hessian-vector product mode", "use 'exact' or 'fd'"
        )
    if c.max_iter < 1:
        raise LRScaleConfigError(f"{p}.max_iter", c.max_iter, "must be >= 1", "use e.g. 20")
    _check_positive(f"{p}.tol", c.tol, "use e.g. 1e-3")


_FLOAT, _INT, _STR, _BOOL = "a number", "an integer", "a string", "true or false"


def _expected_kind(annotation: str) -> str:
    a = annotation.replace(" ", "")
    if a.startswith("int"):
        return _INT
    if a.startswith("float"):
        return _FLOAT
    if a.startswith("bool"):
        return _BOOL
    if a.startswith("tuple[float,float]"):
        return "a list of two numbers"
    return _STR


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Check one JSON value against its field's annotation; ``None`` only where the field is optional."""
    if value is None:
        if "None" in annotation:
            return None
        raise LRScaleConfigError(name, value, "must not be null", f"give {_expected_kind(annotation)}")
    kind = _expected_kind(annotation)
    ok = {
        _INT: isinstance(value, int) and not isinstance(value, bool),
        _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        _BOOL: isinstance(value, bool),
        _STR: isinstance(value, str),
    }.get(kind)
    if kind == "a list of two numbers":
        ok = (
            isinstance(value, (list, tuple))
            and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        )
        if ok:
            return (float(value[0]), float(value[1]))
    if not ok:
        hint = ""
        if isinstance(value, str) and kind in (_INT, _FLOAT):
            hint = " (write the number without quotes)"
        elif isinstance(value, float) and kind == _INT and value.is_integer():
            hint = f" (write {int(value)})"
        raise LRScaleConfigError(
            name, value, f"has type {type(value).__name__}, expected {kind}", f"give {kind}{hint}"
        )
    return float(value) if kind == _FLOAT else value


def _typed_fields(
    cls: Any, params: Mapping[str, Any], where: str, nested: Mapping[str, Any]
) -> dict[str, Any]:
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{where}.{key}"
        if key not in fields:
            raise LRScaleConfigError(
                name,
                value,
                "unknown key",
                f"remove it; known keys: {', '.join(fields)}{_did_you_mean(key, list(fields))}",
            )
        if key in nested and value is not None:
            if not isinstance(value, Mapping):
                raise LRScaleConfigError(name, value, "must be a mapping", f'write "{key}": {{...}}')
            sub = _typed_fields(nested[key], value, name, {})
            missing = [
                f.name
                for f in dataclasses.fields(nested[key])
                if f.name not in sub and f.default is dataclasses.MISSING
            ]
            if missing:
                raise LRScaleConfigError(name, dict(value), f"missing {missing}", f"add {missing}")
            try:
                out[key] = nested[key](**sub)
            except LRScaleConfigError as e:
                raise e.prefixed(name) from None
            continue
        out[key] = _coerce(name, value, fields[key])
    return out


# --------------------------------------------------------------------------- offline peak from a law


def _law_api() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(load_law, predict)`` of the law package (imported lazily, only when a law is used).

    Each name is taken from the first of ``lrscale_megatron.law.predict``, ``lrscale_megatron.law``,
    ``lrscale_megatron.law.lawfile`` that defines it.
    """
    found: dict[str, Callable[..., Any]] = {}
    errors = []
    for name in ("lrscale_megatron.law.predict", "lrscale_megatron.law", "lrscale_megatron.law.lawfile"):
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
            continue
        for attr in ("load_law", "predict"):
            fn = getattr(mod, attr, None)
            if attr not in found and callable(fn) and not inspect.ismodule(fn):
                found[attr] = fn
    if len(found) == 2:
        return found["load_law"], found["predict"]
    missing = [a for a in ("load_law", "predict") if a not in found]
    raise ImportError(
        f"LRScale: a peak LR from `law` needs {missing} from lrscale_megatron.law.predict, "
        f"which is not available ({'; '.join(errors) or 'not defined'}). Fix: give peak_lr "
        "explicitly."
    )


def resolve_offline_peak(config: LRScaleConfig) -> float:
    """The offline peak LR: ``config.peak_lr``, or the law's prediction for ``config.model``."""
    if config.peak_lr is not None:
        return config.peak_lr
    assert config.law is not None and config.model is not None  # guaranteed by LRScaleConfig
    load_law, predict = _law_api()
    m = config.model
    pred = predict(
        load_law(config.law),
        params=m.params,
        tokens=m.tokens,
        batch_tokens=m.batch_tokens,
        width=m.width,
        depth=m.depth,
    )
    peak = float(pred.peak_lr)
    if not (math.isfinite(peak) and peak > 0):
        raise LRScaleConfigError(
            "law",
            config.law,
            f"predicted peak_lr={peak!r} for {m}",
            "check the law file and the model sizes, or give peak_lr",
        )
    for name in ("min_lr", "init_lr"):
        if getattr(config, name) > peak:
            raise LRScaleConfigError(
                name, getattr(config, name), f"exceeds the law's peak_lr ({peak:.6g})", f"lower {name}"
            )
    logger.info("lrscale: law %r predicts peak LR %.6g for %s", config.law, peak, m)
    return peak


# --------------------------------------------------------------------------- the state machine


def _as_estimate(x: Estimate | float) -> Estimate:
    return x if isinstance(x, Estimate) else Estimate(lambda_max=float(x))


class LRScaleCore:
    """Step count, peak(s) and online adaptation, independent of any optimizer.

    ``group_ratios[g]`` scales group ``g``'s offline peak (user per-group LRs). In global mode one
    adapted peak drives every group (times its ratio); with ``online.per_group`` each group has its own.
    """

    def __init__(
        self, config: LRScaleConfig, group_ratios: Sequence[float], offline_peak: float | None = None
    ):
        self.config = config
        self.offline_peak = resolve_offline_peak(config) if offline_peak is None else float(offline_peak)
        self.group_ratios = [float(r) for r in group_ratios]
        self.reference_peaks = [
            self.offline_peak if r == 1.0 else self.offline_peak * r for r in self.group_ratios
        ]
        n = len(self.group_ratios) if config.online.per_group else 1
        refs = self.reference_peaks if config.online.per_group else [self.offline_peak]
        self.states = [AdapterState(peak=p) for p in refs[:n]]
        self.num_steps = 0
        self.history: list[dict[str, Any]] = []
        self._estimator: Estimator | None = None
        self._group_params: Sequence[Sequence[Any]] | None = None
        #: where each measurement is reported (:class:`~lrscale_megatron.monitor.LRScaleMonitor`); not state.
        self.monitor: LRScaleMonitor | None = None

    # -- peaks and LRs
    def peak(self, group: int) -> float:
        """Current peak LR of param group ``group``."""
        if self.config.online.per_group:
            return self.states[group].peak
        p = self.states[0].peak
        ref = self.reference_peaks[group]
        if ref == self.offline_peak:
            return p
        return ref if p == self.offline_peak else ref * (p / self.offline_peak)

    def lr(self, group: int, step: int | None = None) -> float:
        """LR of group ``group`` at ``step`` (default: now) under the current peak."""
        c, r = self.config, self.group_ratios[group]
        return lr_at(
            self.num_steps if step is None else step,
            peak_lr=self.peak(group),
            min_lr=c.min_lr if r == 1.0 else c.min_lr * r,
            init_lr=c.init_lr if r == 1.0 else c.init_lr * r,
            warmup_steps=c.warmup_steps,
            total_steps=c.total_steps,
            decay_style=c.decay_style,
            wsd_decay_steps=c.wsd_decay_steps,
            wsd_decay_shape=c.wsd_decay_shape,
        )

    # -- online adaptation
    def set_estimator(
        self,
        estimator: Callable[[Sequence[Any] | None], Estimate | float],
        group_params: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        if (
            self.config.online.per_group
            and group_params is not None
            and len(group_params) != len(self.states)
        ):
            raise ValueError(
                f"param_groups has {len(group_params)} entries but the optimizer has "
                f"{len(self.states)} param groups; pass one parameter list per group, in order"
            )
        self._estimator = lambda params: _as_estimate(estimator(params))
        self._group_params = group_params

    def advance(self, increment: int) -> None:
        """Move ``increment`` steps forward, measuring curvature when a measurement point is crossed."""
        if increment < 0:
            raise ValueError(f"increment={increment}: the scheduler cannot step backwards")
        prev = self.num_steps
        self.num_steps += increment
        on = self.config.online
        if on.enabled and crossed(prev, self.num_steps, on, self.config.warmup_steps):
            self.adapt_now()

    def adapt_now(self) -> None:
        """Measure and update the peak(s) at the current step."""
        if self._estimator is None:
            raise RuntimeError(
                "LRScale online mode is enabled but no curvature source is attached. Fix: call "
                "scheduler.attach_curvature(model, loss_fn, batch) (DeepSpeed: engine.lr_scheduler) "
                "before training, or set online.enabled=false."
            )
        on = self.config.online
        measured: list[tuple[Decision, Estimate]] = []  # per measured group
        if not on.per_group:
            est = self._estimator(None)
            d = adapt(
                self.states[0], est, offline_peak=self.offline_peak, cfg=on, step=self.num_steps, group=None
            )
            measured.append((d, est))
        else:
            if self._group_params is None:
                raise RuntimeError(
                    "LRScale per-group mode needs the parameters of each group: "
                    "attach_curvature(..., param_groups=[[...], ...])"
                )
            for g, (st, ps, ref) in enumerate(zip(self.states, self._group_params, self.reference_peaks)):
                est = self._estimator(ps)
                measured.append((adapt(st, est, offline_peak=ref, cfg=on, step=self.num_steps, group=g), est))
        self.history.extend(d.to_dict() for d, _ in measured)
        if self.monitor is not None:
            for d, est in measured:
                self.monitor.log_measurement(d, est)

    # -- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "num_steps": self.num_steps,
            "offline_peak": self.offline_peak,
            "group_ratios": list(self.group_ratios),
            "states": [dataclasses.asdict(s) for s in self.states],
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"LRScale checkpoint format {sd.get('format')!r} != supported {STATE_FORMAT}")
        _compare("", sd["config"], self.config.to_dict())
        for key, mine in (("offline_peak", self.offline_peak), ("group_ratios", self.group_ratios)):
            if sd[key] != mine:
                raise ValueError(
                    f"LRScale checkpoint has {key}={sd[key]!r} but this run has {key}={mine!r}; "
                    "restore the same law/peak and optimizer param groups, or start a fresh schedule"
                )
        self.num_steps = int(sd["num_steps"])
        self.states = [AdapterState(**s) for s in sd["states"]]
        self.history = [dict(h) for h in sd["history"]]


def _compare(prefix: str, ckpt: Any, mine: Any) -> None:
    """Raise naming both values at the first config field where checkpoint and run disagree."""
    if isinstance(ckpt, dict) and isinstance(mine, dict):
        for k in sorted(set(ckpt) | set(mine)):
            _compare(f"{prefix}{k}" if not prefix else f"{prefix}.{k}", ckpt.get(k), mine.get(k))
        return
    if ckpt != mine:
        raise ValueError(
            f"LRScale config mismatch: checkpoint has {prefix}={ckpt!r} but this run has "
            f"{prefix}={mine!r}. Fix: restore {prefix}={ckpt!r} to continue this run, or start "
            "a fresh schedule without loading the scheduler state"
        )


# --------------------------------------------------------------------------- optimizer binding


class LRScaleScheduler:
    """LR scheduler for DeepSpeed and plain PyTorch; one ``step()`` per optimizer iteration.

    ``optimizer`` is a ``torch.optim.Optimizer`` (or anything with ``param_groups``); under DeepSpeed
    the registered factory unwraps ZeRO/bf16 wrappers first. The LR of every group is set at
    construction (step 0) and after every ``step()``.
    """

    def __init__(
        self,
        optimizer: Any,
        config: LRScaleConfig,
        *,
        offline_peak: float | None = None,
        monitor: LRScaleMonitor | None = None,
    ) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(optimizer).__name__} has no param_groups; pass a torch optimizer")
        self.optimizer = optimizer
        self.config = config
        self.core = LRScaleCore(config, _group_ratios(optimizer), offline_peak=offline_peak)
        self._apply()
        if monitor is not None:
            self.attach_monitor(monitor)

    # -- torch / DeepSpeed scheduler API
    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one iteration; or, DeepSpeed-style, to just after iteration ``last_batch_iteration``."""
        target = self.core.num_steps + 1 if last_batch_iteration is None else int(last_batch_iteration) + 1
        used = self.get_last_lr() if self.core.monitor is not None else None
        self.core.advance(target - self.core.num_steps)
        self._apply()
        if used is not None and self.core.monitor is not None:
            self.core.monitor.log_step(target - 1, used)

    def get_lr(self) -> list[float]:
        """Current LR of each param group."""
        return [self.core.lr(g) for g in range(len(self.optimizer.param_groups))]

    def get_last_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    @property
    def num_steps(self) -> int:
        """Iterations completed."""
        return self.core.num_steps

    @property
    def last_batch_iteration(self) -> int:
        """DeepSpeed's name: index of the last completed iteration (-1 before the first)."""
        return self.core.num_steps - 1

    @property
    def peak_lr(self) -> float:
        """Current (possibly adapted) peak LR of group 0."""
        return self.core.peak(0)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per curvature measurement (step, group, lambda_max, accepted, reason, peaks)."""
        return self.core.history

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore; raises ``ValueError`` naming both values if the config disagrees with the checkpoint."""
        self.core.load_state_dict(state_dict)
        self._apply()

    # -- curvature
    def attach_curvature(
        self,
        model: Any,
        loss_fn: Callable[..., Any],
        batch: Any,
        *,
        param_groups: Sequence[Sequence[Any]] | None = None,
        sync: bool = True,
        parallel: Any = None,
    ) -> None:
        """Give online mode what it measures: ``loss_fn(model, batch)`` at the current weights.

        ``batch`` is the held batch (the same on every data-parallel rank). ``param_groups`` lists the
        model parameters of each optimizer param group, in order, for ``online.per_group``; it defaults
        to the optimizer's own groups, which is right for plain PyTorch but not under ZeRO (where the
        optimizer holds flat partitions). With ``sync`` rank 0's estimate is broadcast to all ranks.
        ``parallel`` is the job's :class:`~lrscale_megatron.parallel.ParallelContext` (default: resolved
        from megatron ``parallel_state`` or the DDP world); every rank must keep calling ``step()``:
        the measurement is collective.
        """
        estimator = curvature_estimator(
            model, loss_fn, batch, self.config.online, sync=sync, parallel=parallel, optimizer=self.optimizer
        )
        self.attach_estimator(estimator, param_groups)

    def attach_estimator(
        self,
        estimator: Callable[[Sequence[Any] | None], Estimate | float],
        param_groups: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        """Inject a curvature estimator ``estimator(params_or_None) -> Estimate | lambda_max``."""
        if param_groups is None and self.config.online.per_group:
            param_groups = [list(g["params"]) for g in self.optimizer.param_groups]
        self.core.set_estimator(estimator, param_groups)

    # -- monitoring
    def attach_monitor(self, monitor: LRScaleMonitor | None) -> None:
        """Report each iteration's LRs and each measurement to ``monitor`` (``None`` detaches).

        Not part of ``state_dict``: attach again after a restore.
        """
        self.core.monitor = monitor

    @property
    def monitor(self) -> LRScaleMonitor | None:
        return self.core.monitor

    def _apply(self) -> None:
        for g, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.core.lr(g)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LRScaleScheduler(peak_lr={self.core.offline_peak:.6g}, decay_style={c.decay_style}, "
            f"warmup_steps={c.warmup_steps}, total_steps={c.total_steps}, online={c.online.enabled})"
        )


def _group_ratios(optimizer: Any) -> list[float]:
    """Each group's LR relative to the optimizer's default LR (1.0 for groups that did not set one)."""
    groups = optimizer.param_groups
    ref = getattr(optimizer, "defaults", {}).get("lr")
    if not isinstance(ref, (int, float)) or isinstance(ref, bool) or not ref > 0:
        return [1.0] * len(groups)
    ratios = [float(g.get("lr", ref)) / float(ref) for g in groups]
    if any(r != 1.0 for r in ratios):
        logger.info(
            "lrscale: keeping per-group LR ratios %s (relative to the optimizer's lr=%g)", ratios, ref
        )
    return ratios
