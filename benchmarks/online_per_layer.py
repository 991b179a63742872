"""Per-layer vs global online adaptation (the gauge policy with ``online.per_group``), one param group per layer.

    python benchmarks/online_per_layer.py --json out/online-per-layer.json        # tiny preset, 300 its, 2 seeds
    python benchmarks/online_per_layer.py --peak-lr 2e-2 --steps 300 --seeds 0 1
    python benchmarks/online_per_layer.py --quick                                 # smoke: 12 iterations, 1 seed

Single process, CPU: megatron-core GPTModel (``init_megatron(1, 1)``), float32, torch AdamW (betas 0.9/0.95,
wd 0.1) with one param group per block (embedding, each transformer layer, the rest), byte-level
Shakespeare batches (``models.text.byte_batch``), cosine schedule with warmup ``steps // 20``. Three arms
from the same seed and batches: ``offline`` (no adaptation), ``global`` (one gauge on the whole model's
Adam-preconditioned lambda_max) and ``per_layer`` (``per_group=True``: each block's own lambda_l, gauge and
peak, the seed's layer-wise scheme ``eta_l ~ 1 / lambda_l`` on the eos footing). Reported: the mean loss on 8
held-out batches at the end, the decisions, the final peak per group, and wall-clock. A step is one
optimizer iteration.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import time
from typing import Any

import torch

from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler, OnlineConfig


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


def layer_groups(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """``[(name, params)]``: ``embedding``, ``layer<i>`` for each transformer layer, ``rest``."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts:
            key = f"layer{parts[parts.index('layers') + 1]}"
        elif "embedding" in parts:
            key = "embedding"
        else:
            key = "rest"
        groups.setdefault(key, []).append(p)
    order = ["embedding", *sorted(k for k in groups if k.startswith("layer")), "rest"]
    return [(k, groups[k]) for k in order if k in groups]


def run(
    arm: str,
    preset: Any,
    ctx: Any,
    batches: list[dict],
    held: list[dict],
    peak: float,
    seed: int,
    adapt_every: int,
) -> dict[str, Any]:
    from lrscale_megatron.models.gpt import build_gpt, gpt_loss_fn

    steps = len(batches)
    model = build_gpt(preset, ctx, dtype=torch.float32, seed=seed)
    groups = layer_groups(model)
    opt = torch.optim.AdamW(
        [{"params": ps} for _, ps in groups], lr=peak, betas=(0.9, 0.95), weight_decay=0.1
    )
    online = OnlineConfig(enabled=arm != "offline", adapt_every=adapt_every, per_group=arm == "per_layer")
    cfg = LRScaleConfig(
        total_steps=steps,
        peak_lr=peak,
        min_lr=peak / 10,
        warmup_steps=max(1, steps // 20),
        decay_style="cosine",
        online=online,
    )
    sched = LRScaleScheduler(opt, cfg)
    if online.enabled:
        sched.attach_curvature(model, gpt_loss_fn, held[0], param_groups=[ps for _, ps in groups])
    t0 = time.perf_counter()
    for b in batches:
        loss = gpt_loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    wall = time.perf_counter() - t0
    with torch.no_grad():
        final = sum(float(gpt_loss_fn(model, h)) for h in held[1:]) / (len(held) - 1)
    return {
        "arm": arm,
        "seed": seed,
        "final_heldout_loss": final if math.isfinite(final) else None,
        "wall_s": wall,
        "groups": [k for k, _ in groups],
        "final_peaks": [sched.core.peak(g) for g in range(len(groups))],
        "decisions": [
            {k: h[k] for k in ("step", "group", "lambda_max", "gauge", "action", "peak_after")}
            for h in sched.history
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--peak-lr", type=float, default=2e-2, help="default: ~10x the tiny preset's good LR")
    ap.add_argument("--adapt-every", type=int, default=25)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.adapt_every = 12, [0], 4
    logging.basicConfig(level=logging.WARNING)
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.models.gpt import get_preset
    from lrscale_megatron.models.text import byte_batch

    preset = get_preset(args.preset)
    out: dict[str, Any] = {
        "load_before": _uptime(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "preset": preset.name,
        "steps": args.steps,
        "peak_lr": args.peak_lr,
        "runs": [],
    }
    ctx = init_megatron(1, 1, seed=0)
    try:
        mbs, seq = 8, preset.seq_length
        for seed in args.seeds:
            batches = [byte_batch(mbs, seq, seed=1000 * seed + 1 + i) for i in range(args.steps)]
            held = [byte_batch(mbs, seq, seed=10**6 + 97 * k) for k in range(9)]
            for arm in ("offline", "global", "per_layer"):
                r = run(arm, preset, ctx, batches, held, args.peak_lr, seed, args.adapt_every)
                out["runs"].append(r)
                print(
                    f"seed {seed} {arm:9s} held-out loss {r['final_heldout_loss']:.4f}  {r['wall_s']:.1f} s  "
                    f"final peaks {[f'{p:.3g}' for p in r['final_peaks']]}",
                    flush=True,
                )
    finally:
        shutdown()
    out["load_after"] = _uptime()
    out["command"] = " ".join(sys.argv) if argv is None else str(argv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
