"""Megatron compatibility: an ``OptimizerParamScheduler`` with the LRScale schedule and online peak.

* :class:`LRScaleParamScheduler` subclasses megatron-core's ``OptimizerParamScheduler`` (same
  ``step(increment)``, ``get_lr(param_group)``, ``get_wd``, ``state_dict``/``load_state_dict``;
  weight-decay handling and per-group ``max_lr``/``min_lr``/``wd_mult`` overrides are inherited).
  **Units: ``num_steps`` counts what ``step(increment)`` is given. Megatron-LM's training loop passes
  ``increment = global_batch_size`` — samples — so ``warmup_steps``, ``total_steps`` and
  ``online.adapt_every`` of its :class:`~lrscale_megatron.scheduler.LRScaleConfig` are in samples.**
* :func:`add_lrscale_args` is an ``extra_args_provider`` adding ``--lr-decay-style lrscale`` and the
  ``--lrscale-*`` options.
* :func:`patch_megatron_training` (opt-in, reversible, version-checked) swaps the one symbol
  ``megatron.training.training.OptimizerParamScheduler`` for a constructor that builds
  :class:`LRScaleParamScheduler` when ``--lr-decay-style lrscale`` and the original otherwise.

Launch with Megatron-LM (``megatron.training`` must be importable; the PyPI megatron-core wheel does
not ship it)::

    # pretrain_lrscale.py
    from megatron.training import pretrain
    from lrscale_megatron.integrations.megatron import add_lrscale_args, patch_megatron_training
    patch_megatron_training()
    pretrain(train_ds_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
             extra_args_provider=add_lrscale_args)

    # one process / one node / many nodes
    torchrun --nproc_per_node 1 pretrain_lrscale.py --lr-decay-style lrscale --lr 3e-4 ...
    torchrun --nproc_per_node 8 pretrain_lrscale.py --lr-decay-style lrscale --lrscale-law gpt-adamw ...
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-endpoint $HEAD:29500 pretrain_lrscale.py ...
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from lrscale_megatron.adapter import Estimate, OnlineConfig, curvature_estimator
from lrscale_megatron.schedule import DECAY_STYLES, WSD_DECAY_SHAPES, lr_at
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleCore, ModelSizes

logger = logging.getLogger(__name__)

DECAY_STYLE_NAME = "lrscale"
#: megatron-core versions the patch was written against: [low, high).
SUPPORTED_MCORE = ((0, 13), (0, 17))
_TARGET_MODULE = "megatron.training.training"
_TARGET_SYMBOL = "OptimizerParamScheduler"
_ORIGINAL: dict[str, Any] = {}


class LRScaleParamScheduler(OptimizerParamScheduler):
    """megatron-core ``OptimizerParamScheduler`` driven by an LRScale schedule.

    ``num_steps`` is in the caller's unit (samples under Megatron-LM). Every group's LR is
    ``lr_at(num_steps)`` with peak ``param_group.get("max_lr", peak) * online_factor`` (or its own
    adapted peak with ``online.per_group``) and floor ``param_group.get("min_lr", min_lr)``.
    """

    def __init__(
        self,
        optimizer: Any,
        config: LRScaleConfig,
        *,
        start_wd: float = 0.0,
        end_wd: float = 0.0,
        wd_incr_steps: int | None = None,
        wd_incr_style: str = "constant",
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
        offline_peak: float | None = None,
    ) -> None:
        self.lrscale_config = config
        self._loading = False
        core = LRScaleCore(config, [1.0], offline_peak=offline_peak)  # resolves the peak once
        peak = core.offline_peak
        ratios = [1.0 if "max_lr" not in g else float(g["max_lr"]) / peak for g in optimizer.param_groups]
        self.lrscale = LRScaleCore(config, ratios, offline_peak=peak)
        super().__init__(
            optimizer,
            init_lr=config.init_lr,
            max_lr=peak,
            min_lr=config.min_lr,
            lr_warmup_steps=config.warmup_steps,
            lr_decay_steps=config.total_steps,
            lr_decay_style=DECAY_STYLE_NAME,
            start_wd=start_wd,
            end_wd=end_wd,
            wd_incr_steps=config.total_steps if wd_incr_steps is None else wd_incr_steps,
            wd_incr_style=wd_incr_style,
            use_checkpoint_opt_param_scheduler=use_checkpoint_opt_param_scheduler,
            override_opt_param_scheduler=override_opt_param_scheduler,
        )

    def get_lr(self, param_group: dict) -> float:
        """LR of ``param_group`` at ``self.num_steps`` (samples under Megatron-LM)."""
        c = self.lrscale_config
        peak = self.lrscale.peak(self._group_index(param_group))
        min_lr = cast(float, param_group.get("min_lr", self.min_lr))
        return lr_at(
            self.num_steps,
            peak_lr=peak,
            min_lr=min_lr,
            init_lr=self.init_lr,
            warmup_steps=self.lr_warmup_steps,
            total_steps=self.lr_decay_steps,
            decay_style=c.decay_style,
            wsd_decay_steps=c.wsd_decay_steps,
            wsd_decay_shape=c.wsd_decay_shape,
        )

    def step(self, increment: int) -> None:
        """Advance ``increment`` units (samples under Megatron-LM), measuring curvature when due."""
        if not self._loading:
            self.lrscale.advance(increment)
        super().step(increment)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lrscale"] = self.lrscale.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore; the LRScale part raises ``ValueError`` naming both values on a config mismatch."""
        self.lrscale.load_state_dict(state_dict["lrscale"])
        self._loading = True
        try:
            super().load_state_dict(state_dict)
        finally:
            self._loading = False

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
        """Same as :meth:`LRScaleScheduler.attach_curvature`; ``param_groups`` is required for per-group
        mode (a ``MegatronOptimizer`` holds main-parameter copies, not the model's parameters)."""
        estimator = curvature_estimator(
            model,
            loss_fn,
            batch,
            self.lrscale_config.online,
            sync=sync,
            parallel=parallel,
            optimizer=self.optimizer,
        )
        self.attach_estimator(estimator, param_groups)

    def attach_estimator(
        self,
        estimator: Callable[[Sequence[Any] | None], Estimate | float],
        param_groups: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        """Inject a curvature estimator ``estimator(params_or_None) -> Estimate | lambda_max``."""
        self.lrscale.set_estimator(estimator, param_groups)

    def _group_index(self, param_group: dict) -> int:
        for i, g in enumerate(self.optimizer.param_groups):
            if g is param_group:
                return i
        raise ValueError("get_lr() was given a param_group that is not one of this optimizer's groups")


# --------------------------------------------------------------------------- argparse


def add_lrscale_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``: allow ``--lr-decay-style lrscale`` and add ``--lrscale-*``.

    Peak, floor, warmup and decay length stay Megatron's own options (``--lr``, ``--min-lr``,
    ``--lr-warmup-*``, ``--lr-decay-*``, ``--lr-warmup-init``); with ``--lrscale-law`` the peak comes from
    the law and ``--lr`` only initialises the optimizer.
    """
    action = next((a for a in parser._actions if "--lr-decay-style" in a.option_strings), None)
    if action is None:
        parser.add_argument(
            "--lr-decay-style",
            type=str,
            default="linear",
            choices=["constant", "linear", "cosine", "inverse-square-root", "WSD", DECAY_STYLE_NAME],
        )
    elif action.choices is not None and DECAY_STYLE_NAME not in action.choices:
        action.choices = [*action.choices, DECAY_STYLE_NAME]
    d = OnlineConfig()
    g = parser.add_argument_group("lrscale", "LRScale schedule (active with --lr-decay-style lrscale)")
    g.add_argument("--lrscale-decay-style", choices=DECAY_STYLES, default="cosine", help="shape after warmup")
    g.add_argument(
        "--lrscale-wsd-decay-shape",
        choices=WSD_DECAY_SHAPES,
        default=None,
        help="WSD decay shape (default: Megatron's --lr-wsd-decay-style, else linear)",
    )
    g.add_argument(
        "--lrscale-wsd-decay-fraction",
        type=float,
        default=None,
        help="WSD: fraction of the decay length spent decaying (default: from --lr-wsd-decay-*)",
    )
    g.add_argument("--lrscale-law", default=None, help="law preset name or law-file path (replaces --lr)")
    g.add_argument("--lrscale-model-params", type=float, default=None, help="law input: parameters")
    g.add_argument("--lrscale-tokens", type=float, default=None, help="law input: training tokens")
    g.add_argument(
        "--lrscale-batch-tokens",
        type=float,
        default=None,
        help="law input: tokens per iteration (default: global batch size x seq length)",
    )
    g.add_argument("--lrscale-width", type=int, default=None, help="law input: hidden size")
    g.add_argument("--lrscale-depth", type=int, default=None, help="law input: layers")
    g.add_argument("--lrscale-online", action="store_true", help="adapt the peak from measured curvature")
    g.add_argument(
        "--lrscale-adapt-every-iters",
        type=int,
        default=d.adapt_every,
        help="measure every N iterations (converted to samples with the global batch size)",
    )
    g.add_argument("--lrscale-rule", choices=("eos", "inverse"), default=d.rule)
    g.add_argument("--lrscale-safety", type=float, default=d.safety)
    g.add_argument("--lrscale-beta1", type=float, default=None, help="default: --adam-beta1")
    g.add_argument("--lrscale-eta-base", type=float, default=d.eta_base)
    g.add_argument("--lrscale-ema", type=float, default=d.ema)
    g.add_argument("--lrscale-combine", choices=("min", "max", "geomean", "online"), default=d.combine)
    g.add_argument("--lrscale-band", type=float, nargs=2, default=list(d.band), metavar=("LOW", "HIGH"))
    g.add_argument("--lrscale-max-change", type=float, default=d.max_change)
    g.add_argument("--lrscale-per-group", action="store_true")
    g.add_argument("--lrscale-hvp", choices=("exact", "fd"), default=d.hvp)
    g.add_argument("--lrscale-max-iter", type=int, default=d.max_iter)
    g.add_argument("--lrscale-tol", type=float, default=d.tol)
    return parser


def config_from_megatron_args(
    args: Any,
    *,
    max_lr: float,
    min_lr: float,
    init_lr: float,
    lr_warmup_steps: int,
    lr_decay_steps: int,
    wsd_decay_steps: int | None = None,
    lr_wsd_decay_style: str | None = None,
) -> LRScaleConfig:
    """Build the config (in samples) from Megatron-LM's args and its sample-unit schedule lengths."""
    gbs = int(getattr(args, "global_batch_size", 1) or 1)
    frac = args.lrscale_wsd_decay_fraction
    if frac is None:
        frac = wsd_decay_steps / lr_decay_steps if wsd_decay_steps else 0.2
    model = None
    if args.lrscale_law is not None:
        batch_tokens = args.lrscale_batch_tokens
        if batch_tokens is None and getattr(args, "seq_length", None):
            batch_tokens = float(gbs * args.seq_length)
        model = ModelSizes(
            params=args.lrscale_model_params,
            tokens=args.lrscale_tokens,
            batch_tokens=batch_tokens,
            width=args.lrscale_width,
            depth=args.lrscale_depth,
        )
    beta1 = args.lrscale_beta1 if args.lrscale_beta1 is not None else getattr(args, "adam_beta1", 0.9)
    online = OnlineConfig(
        enabled=args.lrscale_online,
        adapt_every=args.lrscale_adapt_every_iters * gbs,
        rule=args.lrscale_rule,
        beta1=beta1,
        safety=args.lrscale_safety,
        eta_base=args.lrscale_eta_base,
        ema=args.lrscale_ema,
        combine=args.lrscale_combine,
        band=tuple(args.lrscale_band),
        max_change=args.lrscale_max_change,
        per_group=args.lrscale_per_group,
        hvp=args.lrscale_hvp,
        max_iter=args.lrscale_max_iter,
        tol=args.lrscale_tol,
    )
    return LRScaleConfig(
        total_steps=int(lr_decay_steps),
        peak_lr=None if model is not None else float(max_lr),
        min_lr=float(min_lr),
        init_lr=float(init_lr),
        warmup_steps=int(lr_warmup_steps),
        decay_style=args.lrscale_decay_style,
        wsd_decay_fraction=float(frac),
        wsd_decay_shape=args.lrscale_wsd_decay_shape or lr_wsd_decay_style or "linear",
        law=args.lrscale_law,
        model=model,
        online=online,
    )


# --------------------------------------------------------------------------- runtime patch


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


__all__ = [
    "LRScaleParamScheduler",
    "add_lrscale_args",
    "config_from_megatron_args",
    "patch_megatron_training",
    "unpatch_megatron_training",
    "is_patched",
]
