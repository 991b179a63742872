"""Target train config -> proxy ladder: smaller widths (and depths), same data, tokenizer and batch.

The ladder is a ``configs/sweep`` config (:mod:`lrscale_megatron.sweep.cli`) whose base is the target
config itself, so every proxy inherits the target's corpus, tokenizer, sequence length, optimizer and
DeepSpeed section; only ``hidden_size``, ``num_layers``, ``num_heads``, the token budget and the peak LR
change. Derived widths (``ladder.widths: null``): the largest proxy has at most
``1 / max_params_ratio`` of the target's ``12 L h^2`` parameters, the next ones are ``width_step``
smaller each, all multiples of ``head_dim``.

Every refusal names the field, the value and the fix (:class:`TuneConfigError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lrscale_megatron.tune.config import TuneConfig, TuneConfigError


@dataclass(frozen=True)
class Target:
    """What the law is asked about: the target run's sizes (units: tokens; steps are iterations).

    ``params`` is the non-embedding parameter count as ``ModelConfig.num_non_embedding_params`` counts
    it, the quantity ``lrscale compare`` and the DeepSpeed ``"model": "auto"`` block feed a law.
    """

    path: str
    name: str
    width: int
    depth: int
    heads: int
    seq_len: int
    params: int
    tokens: int
    batch_tokens: int
    steps: int
    warmup_steps: int
    lr: float
    seed: int
    tp: int
    pp: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def flops(self) -> float:
        """Training FLOPs, ``6 N D`` (Kaplan et al. 2020) with N the non-embedding parameters."""
        return 6.0 * self.params * self.tokens


@dataclass(frozen=True)
class Ladder:
    """The derived ladder: the sweep config (``configs/sweep`` format) and the target it stands for."""

    target: Target
    sweep: dict[str, Any]
    head_dim: int

    @property
    def grid(self) -> dict[str, Any]:
        return dict(self.sweep["grid"])


def load_target(cfg: TuneConfig) -> Target:
    """The target train config's sizes; a config the train loader refuses is refused naming ``target``."""
    from lrscale_megatron.train.config import load_config

    try:
        tc = load_config(cfg.target, list(cfg.target_overrides))
    except ValueError as e:
        raise TuneConfigError(
            "target", cfg.target, f"is not a valid train config ({e})", "fix the target config"
        ) from None
    m, t, par = tc.model, tc.training, tc.parallel
    batch_tokens = int(t.global_batch_size * m.seq_length)
    return Target(
        path=cfg.target,
        name=str(m.name),
        width=int(m.hidden_size),
        depth=int(m.num_layers),
        heads=int(m.num_heads),
        seq_len=int(m.seq_length),
        params=int(m.num_non_embedding_params()),
        tokens=int(t.steps) * batch_tokens,
        batch_tokens=batch_tokens,
        steps=int(t.steps),
        warmup_steps=int(t.warmup_steps),
        lr=float(t.lr) if t.lr is not None else math.nan,
        seed=int(t.seed),
        tp=int(par.tp),
        pp=int(par.pp),
    )


def approx_params(width: int, depth: int) -> int:
    """``12 L h^2``: the sweep grid's parameter count (Kaplan et al. 2020)."""
    return 12 * depth * width * width


def derive_widths(target: Target, head_dim: int, depth: int, n: int, ratio: float, step: float) -> list[int]:
    """``n`` distinct multiples of ``head_dim``, the largest with ``12 depth w^2 <= target / ratio``."""
    budget = approx_params(target.width, target.depth) / ratio
    w_max = int(math.sqrt(budget / (12 * depth)) // head_dim) * head_dim
    widths: list[int] = []
    w = w_max
    while w >= head_dim and len(widths) < n:
        widths.append(w)
        nxt = int(round(w / step / head_dim)) * head_dim
        w = nxt if nxt < w else w - head_dim
    if len(widths) < n:
        raise TuneConfigError(
            "ladder.n_proxies",
            n,
            f"the target (model.hidden_size={target.width}, num_layers={target.depth}) with "
            f"head_dim={head_dim} leaves only {len(widths)} proxy width(s) {widths} with at most "
            f"1/{ratio:g} of its parameters",
            "set ladder.head_dim to a smaller divisor (e.g. 8), lower ladder.max_params_ratio or "
            "ladder.n_proxies, or list ladder.widths",
        )
    return sorted(widths)


def _check_widths(target: Target, widths: tuple[int, ...], depths: tuple[int, ...], head_dim: int) -> None:
    for w in widths:
        if w % head_dim:
            raise TuneConfigError(
                "ladder.widths",
                list(widths),
                f"width {w} is not a multiple of head_dim={head_dim}",
                f"use multiples of {head_dim}, or set ladder.head_dim",
            )
    target_p = approx_params(target.width, target.depth)
    big = [(w, d) for w in widths for d in depths if approx_params(w, d) >= target_p]
    if big:
        raise TuneConfigError(
            "ladder.widths",
            list(widths),
            f"proxy (width, depth)={big[0]} is not smaller than the target "
            f"(hidden_size={target.width}, num_layers={target.depth})",
            "a proxy must have fewer parameters than the target: use smaller widths or depths",
        )


def derive_ladder(cfg: TuneConfig, target: Target | None = None) -> Ladder:
    """The proxy ladder of ``cfg`` as a ``configs/sweep`` config dict (paths absolute)."""
    t = target or load_target(cfg)
    spec = cfg.ladder
    if t.width % t.heads:
        raise TuneConfigError(
            "target model.hidden_size",
            t.width,
            f"is not a multiple of model.num_heads={t.heads}",
            "fix the target config",
        )
    head_dim = spec.head_dim if spec.head_dim is not None else t.head_dim
    if head_dim < 1:
        raise TuneConfigError("ladder.head_dim", head_dim, "must be >= 1", "use e.g. 8 or 16")
    depths = tuple(spec.depths) if spec.depths is not None else (t.depth,)
    if spec.widths is not None:
        widths = tuple(sorted(spec.widths))
    else:
        widths = tuple(
            derive_widths(t, head_dim, max(depths), spec.n_proxies, spec.max_params_ratio, spec.width_step)
        )
    _check_widths(t, widths, depths, head_dim)
    batches = tuple(spec.batch_tokens) if spec.batch_tokens is not None else (t.batch_tokens,)
    for b in batches:
        if b % t.seq_len:
            raise TuneConfigError(
                "ladder.batch_tokens",
                list(batches),
                f"{b} is not a multiple of the target's seq_length={t.seq_len}",
                f"use sequences x {t.seq_len}",
            )
    grid: dict[str, Any] = {
        "widths": list(widths),
        "depths": list(depths),
        "batch_tokens": list(batches),
        "n_lr": spec.n_lr,
        "seq_len": t.seq_len,
        "base": {"seed": t.seed},
    }
    if spec.seeds > 1:
        grid["seeds"] = [t.seed + k for k in range(spec.seeds)]
    if spec.tokens == "fixed":
        grid["token_budgets"] = [t.tokens]
        short = [b for b in batches if t.tokens // b < 10]
        if short:
            raise TuneConfigError(
                "ladder.batch_tokens",
                list(batches),
                f"batch {short[0]} leaves {t.tokens // short[0]} iterations of the target's {t.tokens} tokens",
                "use smaller batches or a target with more training.steps (>= 10 iterations per proxy)",
            )
    else:
        tpp = spec.tokens_per_param or t.tokens / approx_params(t.width, t.depth)
        shortest = tpp * approx_params(min(widths), min(depths)) / max(batches)
        if shortest < 10:
            raise TuneConfigError(
                "ladder.tokens_per_param",
                round(tpp, 6),
                f"gives the smallest proxy (width {min(widths)}) only {shortest:.1f} iterations",
                "raise tokens_per_param, use larger proxy widths, or tokens: fixed",
            )
        grid["token_budgets"] = []
        grid["tokens_per_param"] = tpp
    if (spec.lr_min is None or spec.lr_max is None) and not math.isfinite(t.lr):
        raise TuneConfigError(
            "ladder.lr_min",
            spec.lr_min,
            "is needed: the target has no training.lr to centre the grid on",
            "set ladder.lr_min and ladder.lr_max",
        )
    lr_min = spec.lr_min if spec.lr_min is not None else t.lr / 2
    lr_max = spec.lr_max if spec.lr_max is not None else t.lr * 32
    if not lr_min < lr_max:
        raise TuneConfigError(
            "ladder.lr_max", lr_max, f"must exceed lr_min={lr_min}", "set ladder.lr_min and ladder.lr_max"
        )
    grid.update(lr_min=float(f"{lr_min:.6g}"), lr_max=float(f"{lr_max:.6g}"))
    warmup = cfg.train.warmup_fraction
    if warmup is None:
        warmup = round(t.warmup_steps / t.steps, 6)
    overrides = list(cfg.target_overrides) + list(cfg.train.overrides)
    if t.tp != 1 or t.pp != 1:  # proxies run as single processes
        overrides += ["parallel.tp=1", "parallel.pp=1", "parallel.dp=null", "parallel.world_size=null"]
    sweep = {
        "_comment": f"proxy ladder of {t.path} derived by `lrscale tune` (edit it, then pass it with --ladder)",
        "store": "sweep.sqlite",
        "workers": cfg.workers,
        "base_config": t.path,
        "grid": grid,
        "train": {
            "head_dim": head_dim,
            "warmup_fraction": warmup,
            "evals": cfg.train.evals,
            "eval_batches": cfg.train.eval_batches,
            "threads": cfg.train.threads,
            "overrides": overrides,
        },
    }
    return Ladder(t, sweep, head_dim)


def target_sweep(
    cfg: TuneConfig, target: Target, lrs: list[float], seeds: list[int], eval_batches: int
) -> tuple[Any, list[dict[str, Any]]]:
    """The sweep settings and points that train the *target itself* at each of ``lrs`` for each of
    ``seeds`` (a grid to check a prediction against): ``(GPTSweepSettings, configs)`` for
    :func:`lrscale_megatron.sweep.runner.run_sweep`."""
    from lrscale_megatron.sweep.megatron import GPTSweepSettings
    from lrscale_megatron.sweep.runner import SweepGrid

    settings = GPTSweepSettings(
        base_config=target.path,
        head_dim=target.head_dim,
        warmup_fraction=target.warmup_steps / target.steps,
        evals=2,
        eval_batches=eval_batches,
        overrides=tuple(cfg.target_overrides),
    )
    configs: list[dict[str, Any]] = []
    for seed in seeds:
        for lr in lrs:
            grid = SweepGrid(
                widths=(target.width,),
                depths=(target.depth,),
                token_budgets=(target.tokens,),
                batch_tokens=(target.batch_tokens,),
                lr_min=lr,
                lr_max=lr,
                n_lr=1,
                seq_len=target.seq_len,
                base={"seed": seed},
            )
            configs += grid.expand()
    return settings, configs
