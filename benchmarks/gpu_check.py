"""One-shot GPU check of the online curvature measurement (run by ``benchmarks/gpu_check.sh``).

One GPU (H200 / H100 / A100), one process, <= 8 min::

    bash benchmarks/gpu_check.sh                      # writes out/gpu_check.json, prints the tables
    python benchmarks/gpu_check.py --json out.json    # the same, directly
    python benchmarks/gpu_check.py --cpu-smoke        # tiny sizes on CPU: checks the script runs (CI)

Three parts, each a table row set:

1. **accuracy** (megatron-core GPT, local spec, ~20M parameters, bf16): ``lambda_max`` of the loss Hessian
   by Lanczos with ``hvp="fd"`` and ``hvp="exact"`` on the bf16 model against an fp32 reference (the same
   weights in fp32, exact products, tight tolerance). With Transformer Engine installed, the TE-spec model
   (fused attention / flash kernels) is also measured with ``fd`` against its own fp32 ``fd`` (exact
   products through TE are not expected to work: a refusal is reported as such).
2. **time**: fwd+bwd, one fd product, one exact product on the same model (median of ``--repeats``);
   one fd product with host vectors (split 1 and 2) against device vectors, time and device peak
   (``benchmarks/gpu_host_vectors.py``).
3. **memory** at the largest shipped GPT-3 config whose training step plus measurement fits this GPU
   (``tp = pp = 1``, micro-batch 1): peak ``torch.cuda.max_memory_allocated`` of a bf16 training step
   (fwd+bwd and AdamW over fp32 master weights, 16 B/param) and of one Adam-preconditioned fd measurement
   (``k=1``, ``max_iter`` 20) after it, next to :func:`lrscale_megatron.preflight.measurement_memory`'s
   estimate of the measurement's extra memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import types
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_host_vectors import host_vector_products, render_host_vectors  # noqa: E402

GIB = 1024**3
SMOKE = dict(vocab_size=64, seq_length=16, hidden_size=32, num_layers=1, num_heads=2, micro_batch_size=2)
GPT3 = ("gpt3-125m", "gpt3-350m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _preset(name: str, **kw: Any):
    from lrscale_megatron.models.gpt import GPTPreset

    return GPTPreset(name, **kw)


def _batch(vocab: int, seq: int, mbs: int, device: str, seed: int = 0) -> dict:
    from lrscale_megatron.models.text import byte_batch

    b = byte_batch(mbs, seq, seed=seed)
    b["tokens"] = b["tokens"] % vocab
    b["labels"] = b["labels"] % vocab
    return {k: v.to(device) for k, v in b.items()}


def _build(preset, ctx, dtype, spec=None):
    from lrscale_megatron.models.gpt import build_gpt

    kw: dict[str, Any] = {}
    if torch.cuda.is_available():
        kw = {"use_cpu_initialization": False, "bf16": dtype == torch.bfloat16}
    model = build_gpt(preset, ctx, dtype=dtype, seed=0, layer_spec=spec, init="megatron", **kw)
    return model.cuda() if torch.cuda.is_available() else model


def _lam(model, batch, ctx, mode: str, max_iter: int, tol: float, optimizer: Any = None) -> dict:
    from lrscale_megatron.measurement import measure_lambda_max
    from lrscale_megatron.models.gpt import gpt_loss_fn

    t0 = time.perf_counter()
    try:
        est = measure_lambda_max(
            model,
            gpt_loss_fn,
            [batch],
            mode=mode,
            max_iter=max_iter,
            tol=tol,
            parallel=ctx,
            optimizer=optimizer,
        )
    except Exception as e:  # a refusal (e.g. exact through TE) is a result, reported as such
        return {"lambda_max": None, "converged": False, "reason": f"{type(e).__name__}: {e}"[:300]}
    _sync()
    return {
        "lambda_max": est.lambda_max,
        "converged": est.converged,
        "reason": est.reason,
        "n_matvec": est.n_matvec,
        "wall_s": time.perf_counter() - t0,
    }


def _copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """The same weights in another dtype (bf16 -> fp32 is exact)."""
    with torch.no_grad():
        for a, b in zip(dst.parameters(), src.parameters(), strict=True):
            a.copy_(b)


def accuracy_and_time(ctx, small, repeats: int, te_spec, smoke: bool = False) -> dict:
    from lrscale_megatron.curvature import HessianOperator
    from lrscale_megatron.models.gpt import gpt_loss_fn

    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = _batch(small.vocab_size, small.seq_length, small.micro_batch_size, device)
    m16 = _build(small, ctx, torch.bfloat16)
    m32 = _build(small, ctx, torch.float32)
    _copy_weights(m16, m32)
    for m in (m16, m32):
        m.eval()  # no dropout in the presets; eval anyway: the measured loss must be deterministic
    out: dict[str, Any] = {"params": sum(p.numel() for p in m16.parameters())}
    it, it_ref = (6, 6) if smoke else (30, 60)
    out["ref_fp32_exact"] = _lam(m32, batch, ctx, "exact", it_ref, 1e-6)
    out["bf16_fd"] = _lam(m16, batch, ctx, "fd", it, 1e-3)
    out["bf16_exact"] = _lam(m16, batch, ctx, "exact", it, 1e-3)
    ref = out["ref_fp32_exact"]["lambda_max"]
    for k in ("bf16_fd", "bf16_exact"):
        lam = out[k]["lambda_max"]
        out[k]["rel_err"] = abs(lam - ref) / abs(ref) if lam is not None and ref else None

    params = [p for p in m16.parameters() if p.requires_grad]

    def fwd_bwd():
        torch.autograd.grad(gpt_loss_fn(m16, batch), params)

    fd = HessianOperator(m16, gpt_loss_fn, [batch], mode="fd", parallel=ctx)
    ex = HessianOperator(m16, gpt_loss_fn, [batch], mode="exact", parallel=ctx)
    v = fd.backend.randn(0)
    t = {"fwd_bwd_s": _timed(fwd_bwd, repeats)}
    t["fd_product_s"] = _timed(lambda: fd.matvec(v), repeats)
    try:
        t["exact_product_s"] = _timed(lambda: ex.matvec(v), repeats)
    except Exception as e:
        t["exact_product_s"] = None
        t["exact_error"] = f"{type(e).__name__}: {e}"[:300]
    t["fd_over_fwd_bwd"] = t["fd_product_s"] / t["fwd_bwd_s"]
    t["exact_over_fwd_bwd"] = t["exact_product_s"] / t["fwd_bwd_s"] if t["exact_product_s"] else None
    out["time"] = t
    out["host_vectors"] = host_vector_products(m16, batch, ctx, repeats)  # gpu_host_vectors.py
    if te_spec is not None:
        t16, t32 = _build(small, ctx, torch.bfloat16, te_spec), _build(small, ctx, torch.float32, te_spec)
        t32.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in t16.state_dict().items()}
        )
        out["te_ref_fp32_fd"] = _lam(t32, batch, ctx, "fd", 60, 1e-5)
        out["te_bf16_fd"] = _lam(t16, batch, ctx, "fd", 30, 1e-3)
        out["te_bf16_exact"] = _lam(t16, batch, ctx, "exact", 30, 1e-3)
        ref = out["te_ref_fp32_fd"]["lambda_max"]
        lam = out["te_bf16_fd"]["lambda_max"]
        out["te_bf16_fd"]["rel_err"] = abs(lam - ref) / abs(ref) if lam is not None and ref else None
        del t16, t32
    return out


def pick_config(gpu_bytes: float) -> str | None:
    """The largest shipped GPT-3 config whose 1-GPU training step + fd measurement fits 90 % of the GPU."""
    from lrscale_megatron.preflight import measurement_memory
    from lrscale_megatron.train.config import load_config
    from lrscale_megatron.train.dryrun import micro_batch_activations

    best = None
    for name in GPT3:
        cfg = load_config(os.path.join(ROOT, "configs", "gpt", f"{name}.json"))
        n = cfg.model.num_params()
        act = micro_batch_activations(cfg, tp=1, pp=1, micro_batch_size=1)
        need = 16 * n + act + measurement_memory(n, mode="fd", param_bytes=2).total_bytes
        if need <= 0.9 * gpu_bytes:
            best = name
    return best


def memory_check(ctx, preset, max_iter: int) -> dict:
    from lrscale_megatron.measurement import measure_lambda_max
    from lrscale_megatron.models.gpt import gpt_loss_fn
    from lrscale_megatron.preflight import measurement_memory

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = _build(preset, ctx, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    # megatron Float16OptimizerWithFloat16Params' layout: what moments.second_moments reads
    mixed = types.SimpleNamespace(float16_groups=[params], fp32_from_float16_groups=[master], optimizer=opt)
    batch = _batch(preset.vocab_size, preset.seq_length, 1, device, seed=1)

    def train_step():
        grads = torch.autograd.grad(gpt_loss_fn(model, batch), params)
        for m, g in zip(master, grads):
            m.grad = g.float()
        del grads
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, master):
                p.copy_(m)
                m.grad = None

    out: dict[str, Any] = {"params": sum(p.numel() for p in params)}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train_step()
    _sync()
    if cuda:
        out["train_step_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["resident_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    # the default basis ("auto": host memory when it has room) first, then the second pass, so the
    # host-device traffic of the host basis is timed against the products it saves
    for key, basis in (("measurement", "auto"), ("measurement_recompute", "recompute")):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        est = measure_lambda_max(
            model,
            gpt_loss_fn,
            [batch],
            mode="fd",
            max_iter=max_iter,
            tol=1e-3,
            parallel=ctx,
            optimizer=mixed,
            basis=basis,
        )
        _sync()
        out[key] = {
            "basis": basis,
            "lambda_max": est.lambda_max,
            "converged": est.converged,
            "reason": est.reason,
            "n_matvec": est.n_matvec,
            "wall_s": time.perf_counter() - t0,
        }
        if cuda:
            peak = torch.cuda.max_memory_allocated() / GIB
            out[key]["peak_gib"] = peak
            out[key]["extra_x_param_bytes"] = (peak - out["resident_gib"]) * GIB / (2 * out["params"])
    mm = measurement_memory(out["params"], mode="fd", param_bytes=2)
    out["estimated_extra_gib"] = mm.total_bytes / GIB
    if cuda:
        out["measurement_peak_gib"] = out["measurement"]["peak_gib"]
        out["measured_extra_gib"] = out["measurement_peak_gib"] - out["resident_gib"]
        out["measured_extra_x_param_bytes"] = out["measured_extra_gib"] * GIB / (2 * out["params"])
    return out


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def render(r: dict) -> str:
    a = r["accuracy"]
    lines = [
        f"# gpu_check ({r['device']}, torch {r['torch']}, TE {'yes' if r['te'] else 'no'})",
        "",
        "| measurement | lambda_max | rel. err vs fp32 | converged | products | wall s |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("ref_fp32_exact", "bf16_fd", "bf16_exact", "te_ref_fp32_fd", "te_bf16_fd", "te_bf16_exact"):
        if k in a:
            e = a[k]
            conv = e["converged"] if e["lambda_max"] is not None else f"refused ({e['reason']})"
            lines.append(
                f"| {k} | {_fmt(e['lambda_max'])} | {_fmt(e.get('rel_err'), '.2e')} | {conv} | "
                f"{_fmt(e.get('n_matvec'))} | {_fmt(e.get('wall_s'), '.3g')} |"
            )
    t = a["time"]
    lines += [
        "",
        "| fwd+bwd s | fd product s | exact product s | fd / fwd+bwd | exact / fwd+bwd |",
        "|---|---|---|---|---|",
        f"| {_fmt(t['fwd_bwd_s'], '.4g')} | {_fmt(t['fd_product_s'], '.4g')} | {_fmt(t['exact_product_s'], '.4g')} | "
        f"{_fmt(t['fd_over_fwd_bwd'], '.3g')} | {_fmt(t['exact_over_fwd_bwd'], '.3g')} |",
    ]
    lines += render_host_vectors(a.get("host_vectors"))
    m = r.get("memory")
    if m:
        lines += [
            "",
            f"memory at {r['memory_config']} ({m['params']:,} parameters, bf16, tp=pp=1, micro-batch 1):",
            "",
            "| train step peak GiB | measurement peak GiB | measured extra GiB | estimated extra GiB | extra / param bytes | lambda_max | converged |",
            "|---|---|---|---|---|---|---|",
            f"| {_fmt(m.get('train_step_peak_gib'), '.2f')} | {_fmt(m.get('measurement_peak_gib'), '.2f')} | "
            f"{_fmt(m.get('measured_extra_gib'), '.2f')} | {_fmt(m['estimated_extra_gib'], '.2f')} | "
            f"{_fmt(m.get('measured_extra_x_param_bytes'), '.2f')} | {_fmt(m['measurement']['lambda_max'])} | "
            f"{m['measurement']['converged']} |",
            "",
            "| basis | lambda_max | converged | products | wall s | peak GiB | extra / param bytes |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in ("measurement", "measurement_recompute"):
            e = m.get(key)
            if e:
                lines.append(
                    f"| {e['basis']} | {_fmt(e['lambda_max'])} | {e['converged']} | {_fmt(e['n_matvec'])} | "
                    f"{_fmt(e['wall_s'], '.3g')} | {_fmt(e.get('peak_gib'), '.2f')} | "
                    f"{_fmt(e.get('extra_x_param_bytes'), '.2f')} |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="out/gpu_check.json")
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on CPU (checks the script, no figures)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--config", default=None, help="GPT-3 config for the memory part (default: largest that fits)"
    )
    args = ap.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-smoke to check the script on CPU", file=sys.stderr)
        return 2
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.train.config import load_config
    from lrscale_megatron.train.setup import resolve_impl

    ctx = init_megatron(1, 1, seed=0)
    te_spec = None
    if not args.cpu_smoke and resolve_impl("auto") == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        te_spec = get_gpt_layer_with_transformer_engine_spec
    try:
        if args.cpu_smoke:
            small = _preset("smoke", **SMOKE)
            big_name, big = "cpu-smoke", small
        else:
            small = _preset(
                "check",
                vocab_size=8192,
                seq_length=512,
                hidden_size=512,
                num_layers=4,
                num_heads=8,
                micro_batch_size=4,
            )
            big_name = args.config or pick_config(torch.cuda.get_device_properties(0).total_memory)
            big = None
            if big_name is not None:
                from lrscale_megatron.train.setup import preset_of

                cfg = load_config(os.path.join(ROOT, "configs", "gpt", f"{big_name}.json"))
                big = preset_of(cfg)  # the memory part runs it at micro-batch 1
        result: dict[str, Any] = {
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)",
            "torch": torch.__version__,
            "te": te_spec is not None,
            "accuracy": accuracy_and_time(
                ctx, small, 1 if args.cpu_smoke else args.repeats, te_spec, args.cpu_smoke
            ),
            "memory_config": big_name,
            "memory": memory_check(ctx, big, 3 if args.cpu_smoke else 20) if big is not None else None,
        }
    finally:
        shutdown()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
