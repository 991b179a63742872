"""The offline peak LR of the LRScale scheduler: ``peak_lr`` as given, or a fitted law's prediction.

The law package is imported lazily, only when a config names a law, so the scheduler works without it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
from collections.abc import Callable
from typing import Any

from lrscale_megatron.scheduler_config import LRScaleConfig, LRScaleConfigError

logger = logging.getLogger(__name__)


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
