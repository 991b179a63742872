"""Megatron-LM command line for LRScale: ``--lr-decay-style lrscale`` and the ``--lrscale-*`` options
(:func:`add_lrscale_args`, an ``extra_args_provider``) and the :class:`~lrscale_megatron.scheduler.LRScaleConfig`
they describe (:func:`config_from_megatron_args`). Steps are samples (Megatron-LM's ``increment``)."""

from __future__ import annotations

import argparse
from typing import Any

from lrscale_megatron.adapter import OnlineConfig
from lrscale_megatron.schedule import DECAY_STYLES, WSD_DECAY_SHAPES
from lrscale_megatron.scheduler import LRScaleConfig, ModelSizes

DECAY_STYLE_NAME = "lrscale"


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
    g.add_argument(
        "--lrscale-basis", choices=("auto", "host", "recompute"), default=d.basis, help="k=1 Lanczos basis"
    )
    g.add_argument("--lrscale-tol", type=float, default=d.tol)
    g.add_argument(
        "--lrscale-warmup-checks", type=int, default=d.warmup_checks, help="measurements in warmup"
    )
    g.add_argument("--lrscale-warmup-tol", type=float, default=d.warmup_tol, help="Lanczos tol in warmup")
    g.add_argument("--lrscale-cut-above", type=float, default=d.cut_above, help="gauge above which to cut")
    g.add_argument(
        "--lrscale-raise-below", type=float, default=d.raise_below, help="gauge below which to raise"
    )
    g.add_argument(
        "--lrscale-no-confirm-cuts",
        dest="lrscale_confirm_cuts",
        action="store_false",
        help="cut on a lone sample above --lrscale-cut-above without re-measuring first",
    )
    g.add_argument("--lrscale-max-cut", type=float, default=d.max_cut, help="largest cut per measurement")
    g.add_argument("--lrscale-kappa", type=float, default=d.kappa, help="curvature predictor kappa / lambda")
    g.add_argument("--lrscale-curvature-peak", choices=("max", "curv"), default=d.curvature_peak)
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
        basis=args.lrscale_basis,
        tol=args.lrscale_tol,
        warmup_checks=args.lrscale_warmup_checks,
        warmup_tol=args.lrscale_warmup_tol,
        cut_above=args.lrscale_cut_above,
        raise_below=args.lrscale_raise_below,
        confirm_cuts=args.lrscale_confirm_cuts,
        max_cut=args.lrscale_max_cut,
        kappa=args.lrscale_kappa,
        curvature_peak=args.lrscale_curvature_peak,
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
