"""Cost of one Hessian-vector product relative to one training step: wall time and peak memory.

One process (it spawns one child process per model x mode, CPU only)::

    python benchmarks/hvp_cost.py                 # ~5.4M-param GPTs (megatron `small` preset and TorchGPT
                                                  # of the same shape), float32, B=8, S=128
    python benchmarks/hvp_cost.py --quick         # megatron `tiny` preset shape, B=2: smoke run
    python benchmarks/hvp_cost.py --threads 1     # torch.set_num_threads (default 2)

Modes: ``train`` (the reference: forward + backward for time; forward + backward + AdamW step for memory),
``exact`` (double backward), ``fd-forward`` (one gradient per product, base gradient cached: timed after the
first product has cached it), ``fd-central`` (two gradients), ``jvp`` (``torch.func`` forward-over-reverse;
TorchGPT only: megatron's custom autograd Functions have no forward-mode rule).

Time: min over ``--repeats`` calls after one warm-up call, in a fresh child process per (model, mode)
(``--quick``: one child per model, all modes in turn).
Memory: torch's CPU allocations are invisible to ``tracemalloc``, so each child resets the kernel's
resident-set high-water mark (``echo 5 > /proc/self/clear_refs``) after building the model and batch,
reads ``VmRSS`` (baseline), runs the first (cold) call, and reports ``VmHWM - baseline`` (the peak increase
of resident memory, allocator caches included). The fd-forward figure includes its cached base gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MODELS = ("megatron", "torch")
MODES = ("train", "exact", "fd-forward", "fd-central", "jvp")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _build(model_kind: str, quick: bool) -> tuple[Any, Callable, dict, int]:
    import torch

    from lrscale_megatron.models.gpt import get_preset
    from lrscale_megatron.models.text import byte_batch

    preset = get_preset("tiny" if quick else "small")
    bsz = 2 if quick else 8
    batch = byte_batch(bsz, preset.seq_length, seed=0)
    if model_kind == "megatron":
        from lrscale_megatron.launch import init_megatron
        from lrscale_megatron.models.gpt import build_gpt, gpt_loss_fn

        ctx = init_megatron(1, 1, seed=0)
        model = build_gpt(preset, ctx, dtype=torch.float32, seed=0)
        loss_fn = gpt_loss_fn
    else:
        from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

        cfg = TorchGPTConfig(
            vocab_size=preset.vocab_size,
            seq_length=preset.seq_length,
            hidden_size=preset.hidden_size,
            num_layers=preset.num_layers,
            num_heads=preset.num_heads,
        )
        model = TorchGPT(cfg).float()
        model.init_weights(0)
        loss_fn = torch_gpt_loss
        batch = {"tokens": batch["tokens"], "labels": batch["labels"]}
    n_params = sum(p.numel() for p in model.parameters())
    return model, loss_fn, batch, n_params


def child(model_kind: str, modes: list[str], quick: bool, repeats: int) -> list[dict]:
    model, loss_fn, batch, n_params = _build(model_kind, quick)
    out = [_measure(model_kind, mode, model, loss_fn, batch, n_params, repeats) for mode in modes]
    if model_kind == "megatron":
        from lrscale_megatron.launch import shutdown

        shutdown()
    return out


def _measure(model_kind: str, mode: str, model, loss_fn, batch, n_params: int, repeats: int) -> dict:
    import torch

    from lrscale_megatron.curvature import HessianOperator

    if mode == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step_mem() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            opt.step()

        def step_time() -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()

        first, call = step_mem, step_time
    else:
        op = HessianOperator(
            model,
            loss_fn,
            batch,
            mode="fd" if mode.startswith("fd") else mode,
            fd_scheme="central" if mode == "fd-central" else "forward",
        )
        v = op.backend.randn(0)

        def first() -> None:
            op.matvec(v)

        call = first
    base_kb = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    first()
    peak_kb = _status_kb("VmHWM")
    call()  # warm-up (fd-forward: the base gradient is cached by now)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return {
        "model": model_kind,
        "mode": mode,
        "n_params": n_params,
        "seconds": min(times),
        "peak_increase_mb": (peak_kb - base_kb) / 1024,
    }


def run_child(model_kind: str, modes: list[str], args: argparse.Namespace) -> list[dict]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        model_kind,
        ",".join(modes),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ] + (["--quick"] if args.quick else [])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"child {model_kind}/{modes} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


TARGETS = {"exact": 2.5, "fd-forward": 1.2}


def report(rows: list[dict]) -> str:
    out = [
        "| model | params | mode | time (ms) | time / fwd+bwd | time target | peak RSS increase (MB) | "
        "memory / train step | memory target (<= 2) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in MODELS:
        ref = next((r for r in rows if r["model"] == m and r["mode"] == "train"), None)
        if ref is None:
            continue
        for r in (r for r in rows if r["model"] == m):
            tr = r["seconds"] / ref["seconds"]
            mr = r["peak_increase_mb"] / ref["peak_increase_mb"]
            tgt = TARGETS.get(r["mode"])
            tcell = (
                ""
                if r["mode"] == "train" or tgt is None
                else (f"<= {tgt}: {'met' if tr <= tgt else 'MISSED'}")
            )
            mcell = "" if r["mode"] == "train" else ("met" if mr <= 2 else "MISSED")
            out.append(
                f"| {m} | {r['n_params']:,} | {r['mode']} | {1000 * r['seconds']:.0f} | {tr:.2f} | {tcell} | "
                f"{r['peak_increase_mb']:.1f} | {mr:.2f} | {mcell} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 repeat (smoke run)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per mode (min reported); default 5, 1 with --quick",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS)
    )
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child[0], args.child[1].split(","), args.quick, args.repeats)))
        return
    rows = []
    for m in args.models.split(","):
        if m not in MODELS:
            raise SystemExit(f"--models: {m!r} is not one of {MODELS}")
        # no forward-mode rule for megatron's autograd Functions (HessianOperator refuses jvp there)
        modes = [mode for mode in MODES if not (mode == "jvp" and m == "megatron")]
        if (
            args.quick
        ):  # one child per model: fast, but a mode's memory may be masked by earlier modes' caches
            rows += run_child(m, modes, args)
        else:
            for mode in modes:
                rows += run_child(m, [mode], args)
    print(report(rows))
    print(
        f"\n({'quick' if args.quick else 'full'} run, {args.threads} threads, min of {args.repeats}; "
        f"load average at the end {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
