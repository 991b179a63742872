"""Opt-in, reversible, version-checked runtime patch of Megatron-LM: :func:`patch_megatron_training` swaps
the one symbol ``megatron.training.training.OptimizerParamScheduler`` for a constructor that builds
:class:`~lrscale_megatron.integrations.megatron_scheduler.LRScaleParamScheduler` when
``--lr-decay-style lrscale`` and the original otherwise; :func:`unpatch_megatron_training` restores it."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from lrscale_megatron.integrations.megatron_args import DECAY_STYLE_NAME, config_from_megatron_args
from lrscale_megatron.integrations.megatron_scheduler import LRScaleParamScheduler

logger = logging.getLogger(__name__)

#: megatron-core versions the patch was written against: [low, high).
SUPPORTED_MCORE = ((0, 13), (0, 17))
_TARGET_MODULE = "megatron.training.training"
_TARGET_SYMBOL = "OptimizerParamScheduler"
_ORIGINAL: dict[str, Any] = {}


def _mcore_version() -> tuple[int, ...]:
    from megatron.core import package_info

    return tuple(int(p) for p in package_info.__version__.split(".")[:2] if p.isdigit())


def patch_megatron_training(*, check_version: bool = True) -> None:
    """Swap ``megatron.training.training.OptimizerParamScheduler`` for an LRScale-aware constructor.

    Opt-in and idempotent; undo with :func:`unpatch_megatron_training`. Raises ``ImportError`` when
    Megatron-LM's ``megatron.training`` is not importable, ``RuntimeError`` on an untested
    megatron-core version (``check_version=False`` skips that check).
    """
    try:
        module = importlib.import_module(_TARGET_MODULE)
    except ImportError as e:
        raise ImportError(
            f"patch_megatron_training() needs Megatron-LM's `{_TARGET_MODULE}`, which cannot be imported "
            f"({e}). The PyPI megatron-core wheel ships only `megatron.core`. Fix: install Megatron-LM from "
            "source (git clone https://github.com/NVIDIA/Megatron-LM && pip install -e Megatron-LM), or "
            "build LRScaleParamScheduler yourself and pass it to your training loop."
        ) from e
    if check_version:
        v = _mcore_version()
        lo, hi = SUPPORTED_MCORE
        if not (lo <= v < hi):
            raise RuntimeError(
                f"patch_megatron_training(): megatron-core {'.'.join(map(str, v))} is outside the "
                f"tested range [{lo[0]}.{lo[1]}, {hi[0]}.{hi[1]}). Fix: use a tested version or "
                "pass check_version=False after checking OptimizerParamScheduler's signature."
            )
    current = getattr(module, _TARGET_SYMBOL, None)
    if current is None:
        raise ImportError(
            f"{_TARGET_MODULE} has no `{_TARGET_SYMBOL}` to patch; this Megatron-LM version is "
            "not supported. Fix: build LRScaleParamScheduler yourself."
        )
    if getattr(current, "__lrscale_patch__", False):
        return
    if not callable(getattr(module, "get_args", None)):
        raise ImportError(f"{_TARGET_MODULE} has no `get_args`; this Megatron-LM version is not supported.")
    _ORIGINAL[_TARGET_SYMBOL] = current
    setattr(module, _TARGET_SYMBOL, _make_constructor(current, module))
    logger.info(
        "lrscale: patched %s.%s (--lr-decay-style %s builds LRScaleParamScheduler)",
        _TARGET_MODULE,
        _TARGET_SYMBOL,
        DECAY_STYLE_NAME,
    )


def unpatch_megatron_training() -> None:
    """Restore the original ``OptimizerParamScheduler`` (no-op if not patched)."""
    original = _ORIGINAL.pop(_TARGET_SYMBOL, None)
    if original is None:
        return
    module = importlib.import_module(_TARGET_MODULE)
    setattr(module, _TARGET_SYMBOL, original)
    logger.info("lrscale: restored %s.%s", _TARGET_MODULE, _TARGET_SYMBOL)


def is_patched() -> bool:
    return _TARGET_SYMBOL in _ORIGINAL


def _make_constructor(original: Any, module: Any) -> Callable[..., Any]:
    signature = inspect.signature(original)

    def OptimizerParamScheduler(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - replaces the class name
        bound: Mapping[str, Any] = signature.bind(*args, **kwargs).arguments
        if bound.get("lr_decay_style") != DECAY_STYLE_NAME:
            return original(*args, **kwargs)
        config = config_from_megatron_args(
            module.get_args(),
            max_lr=bound["max_lr"],
            min_lr=bound["min_lr"],
            init_lr=bound["init_lr"],
            lr_warmup_steps=bound["lr_warmup_steps"],
            lr_decay_steps=bound["lr_decay_steps"],
            wsd_decay_steps=bound.get("wsd_decay_steps"),
            lr_wsd_decay_style=bound.get("lr_wsd_decay_style"),
        )
        return LRScaleParamScheduler(
            bound["optimizer"],
            config,
            start_wd=bound["start_wd"],
            end_wd=bound["end_wd"],
            wd_incr_steps=bound["wd_incr_steps"],
            wd_incr_style=bound["wd_incr_style"],
            use_checkpoint_opt_param_scheduler=bound.get("use_checkpoint_opt_param_scheduler", True),
            override_opt_param_scheduler=bound.get("override_opt_param_scheduler", False),
        )

    OptimizerParamScheduler.__lrscale_patch__ = True  # type: ignore[attr-defined]
    OptimizerParamScheduler.__wrapped__ = original  # type: ignore[attr-defined]
    return OptimizerParamScheduler
