"""``lrscale spectrum``: top Hessian eigenvalues, trace and per-layer sharpness of a GPT preset.

One process::

    lrscale spectrum --preset tiny --dtype float64 --json out.json

Tensor x pipeline parallel on one node (the result equals the one-process run)::

    torchrun --nproc_per_node 4 -m lrscale_megatron.cli spectrum --preset tiny --tp 2 --pp 2 \\
        --dtype float64 --seed 0 --json out.json

Many nodes: the same under ``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="GPT preset (tiny | small)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the batch and the start vectors")
    p.add_argument(
        "--hvp", default="exact", choices=["exact", "fd", "jvp"], help="Hessian-vector product mode"
    )
    p.add_argument("--fd-scheme", default="forward", choices=["forward", "central"])
    p.add_argument("--top-k", type=int, default=1, help="number of top eigenvalues")
    p.add_argument("--max-iter", type=int, default=20, help="Lanczos iterations (Hessian-vector products)")
    p.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance")
    p.add_argument("--trace-samples", type=int, default=0, help="Hutchinson probes (0: no trace)")
    p.add_argument("--per-layer", action="store_true", help="also lambda_max of every transformer block")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="global batch in sequences (default 2 x preset micro-batch); split over DP ranks",
    )
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per data-parallel rank")
    p.add_argument("--json", dest="json_out", default=None, help="write the result as JSON here")


def _validate(args: argparse.Namespace, preset, dp: int) -> int:
    gb = args.batch_size or 2 * preset.micro_batch_size
    for name in ("top_k", "max_iter", "micro_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.top_k > args.max_iter:
        raise SystemExit(f"--top-k={args.top_k} exceeds --max-iter={args.max_iter}; raise --max-iter")
    if gb % (dp * args.micro_batches):
        raise SystemExit(
            f"--batch-size={gb} is not divisible by dp({dp}) * --micro-batches({args.micro_batches}); "
            f"use a multiple of {dp * args.micro_batches}"
        )
    return gb


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lrscale_megatron.curvature import HessianOperator, hutchinson_trace, lanczos
    from lrscale_megatron.curvature.blocks import BlockOperator, transformer_blocks
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
    from lrscale_megatron.models.text import byte_batch

    preset = get_preset(args.preset)
    ctx = init_megatron(args.tp, args.pp, seed=args.seed)
    try:
        gb = _validate(args, preset, ctx.dp_size)
        model = build_gpt(preset, ctx, dtype=DTYPES[args.dtype], seed=args.seed)
        from lrscale_megatron.megatron_state import layer_offset

        ctx.layer_offset = layer_offset(model)
        full = byte_batch(gb, preset.seq_length, seed=args.seed)
        per_rank = gb // ctx.dp_size
        rows = slice(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)
        mbs = per_rank // args.micro_batches
        micro = [
            {k: v[rows][i * mbs : (i + 1) * mbs] for k, v in full.items()} for i in range(args.micro_batches)
        ]
        logger.info(
            "spectrum: preset=%s (%d params) %s dtype=%s hvp=%s global batch=%d",
            preset.name,
            preset.num_params(),
            ctx.describe(),
            args.dtype,
            args.hvp,
            gb,
        )
        op = HessianOperator(model, gpt_loss_fn, micro, mode=args.hvp, parallel=ctx, fd_scheme=args.fd_scheme)
        t0 = time.perf_counter()
        res = lanczos(op, k=args.top_k, max_iter=args.max_iter, tol=args.tol, seed=args.seed)
        t_lanczos = time.perf_counter() - t0
        out: dict[str, Any] = {
            "lambda_max": res.eigenvalues[0],
            "eigenvalues": list(res.eigenvalues),
            "residuals": list(res.residuals),
            "converged": res.converged,
            "reason": res.reason,
            "n_matvec": res.n_matvec,
            "loss": ctx.reduce_loss(op.last_loss if op.last_loss is not None else float("nan")),
            "seconds": t_lanczos,
            "config": {
                "preset": asdict(preset),
                "tp": ctx.tp_size,
                "pp": ctx.pp_size,
                "dp": ctx.dp_size,
                "dtype": args.dtype,
                "hvp": args.hvp,
                "seed": args.seed,
                "batch_size": gb,
                "micro_batches": args.micro_batches,
                "max_iter": args.max_iter,
                "tol": args.tol,
            },
        }
        logger.info(
            "lambda_max=%.6g converged=%s (%d products, %.2fs)",
            res.eigenvalues[0],
            res.converged,
            res.n_matvec,
            t_lanczos,
        )
        if args.trace_samples:
            tr = hutchinson_trace(op, n_samples=args.trace_samples, seed=args.seed)
            out["trace"] = {
                "estimate": tr.estimate,
                "stderr": tr.stderr,
                "n_samples": tr.n_samples,
                "converged": tr.converged,
                "reason": tr.reason,
            }
        if args.per_layer:
            local = transformer_blocks(op.backend)
            names = ["embedding"] + [f"layers.{i}" for i in range(preset.num_layers)] + ["final"]
            per: dict[str, Any] = {}
            for name in names:
                r = lanczos(
                    BlockOperator(op, local.get(name, [])),
                    k=1,
                    max_iter=args.max_iter,
                    tol=args.tol,
                    seed=args.seed,
                )
                per[name] = {
                    "lambda_max": r.eigenvalues[0],
                    "converged": r.converged,
                    "n_matvec": r.n_matvec,
                    "reason": r.reason,
                }
                logger.info("  %-12s lambda_max=%.6g converged=%s", name, r.eigenvalues[0], r.converged)
            out["per_layer"] = per
        import torch.distributed as dist

        if dist.get_rank() == 0:
            _print_table(out)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(out, f, indent=2)
        return out
    finally:
        shutdown()


def _print_table(out: dict[str, Any]) -> None:
    lines = ["  #  eigenvalue        residual"]
    for i, (e, r) in enumerate(zip(out["eigenvalues"], out["residuals"])):
        lines.append(f"{i + 1:3d}  {e:16.9g}  {r:10.3g}")
    lines.append(f"converged={out['converged']}  products={out['n_matvec']}  loss={out['loss']}")
    if out.get("reason"):
        lines.append(f"not converged: {out['reason']}")
    if "trace" in out:
        t = out["trace"]
        lines.append(f"trace = {t['estimate']:.6g} ± {t['stderr']:.2g} ({t['n_samples']} probes)")
    for name, r in out.get("per_layer", {}).items():
        lines.append(f"  {name:12s} lambda_max = {r['lambda_max']:.6g}")
    print("\n".join(lines), flush=True)
