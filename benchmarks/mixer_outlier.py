"""The mixer's outlier curvature reading (issues 9/11): capture every online measurement, then compare fd,
exact and float64-exact on the captured state.

    python benchmarks/mixer_outlier.py capture --out out/spike           # train, save every measurement
    python benchmarks/mixer_outlier.py analyze out/spike/call1.pt         # fd vs exact vs float64 exact

``capture`` trains ``configs/gpt/cpu-mixer-target.json`` (default: 40 steps, peak LR 0.01, online on with
``adapt_every`` 10: the exploratory run of docs/cross-architecture.md) with the trainer's own online
estimator; every call of :func:`lrscale_megatron.measurement.measure_lambda_max` is logged (lambda,
converged, reason, products) and its inputs saved (parameters, Adam's ``v̂`` and ``eps``, the held batch,
the solver settings, the warm-start vector). ``analyze`` rebuilds the model from such a file and measures
the Adam-preconditioned Hessian at that exact state: the production fd product (as the run did), exact
(double backward, float32) and exact on a float64 copy (the reference), plus where ``P^-1/2`` is large.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("mixer_outlier")
CONFIG = ROOT / "configs/gpt/cpu-mixer-target.json"


def _uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()
    except OSError:
        return "?"


def capture(args: argparse.Namespace) -> None:
    from lrscale_megatron import measurement
    from lrscale_megatron.moments import second_moments
    from lrscale_megatron.train.config import load_config
    from lrscale_megatron.train.loop import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    online = {"enabled": True, "adapt_every": args.adapt_every, **json.loads(args.online)}
    overrides = [
        f"training.steps={args.steps}",
        f"training.lr={args.lr}",
        f"training.seed={args.seed}",
        "training.log_every=10",
        f"deepspeed.scheduler.params.online={json.dumps(online)}",
    ]
    cfg = load_config(CONFIG, overrides)
    original = measurement.measure_lambda_max
    calls: list[dict[str, Any]] = []

    def hooked(model: Any, loss_fn: Any, batch: Any, **kw: Any) -> Any:
        i = len(calls)
        params = [p for p in model.parameters() if p.requires_grad]
        warm = kw.get("warm")
        v0 = None if warm is None else warm._vectors.get(warm.key(kw.get("params")))
        saved: dict[str, Any] = {
            "config": str(CONFIG),
            "overrides": overrides,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "batch": batch,
            "kw": {k: kw[k] for k in ("mode", "max_iter", "tol", "seed")},
            "warm_vector": None if v0 is None else [t.clone() for t in v0],
        }
        if kw.get("optimizer") is not None:
            v_hat, eps = second_moments(kw["optimizer"], params)
            saved["v_hat"] = [v.clone() for v in v_hat]
            saved["eps"] = eps
        t0 = time.perf_counter()
        est = original(model, loss_fn, batch, **kw)
        rec = {
            "call": i,
            "lambda_max": est.lambda_max,
            "converged": est.converged,
            "reason": est.reason,
            "n_matvec": est.n_matvec,
            "residual": est.residual,
            "tol": kw.get("tol"),
            "warm_start": v0 is not None,
            "wall_s": time.perf_counter() - t0,
        }
        saved["estimate"] = rec
        torch.save(saved, out / f"call{i}.pt")
        calls.append(rec)
        logger.info("measurement %d: %s", i, rec)
        return est

    measurement.measure_lambda_max = hooked  # type: ignore[assignment]
    try:
        result = train(cfg)
    finally:
        measurement.measure_lambda_max = original  # type: ignore[assignment]
    decisions = [d for d in (result.adaptations or [])]
    for rec, d in zip(calls, decisions):
        rec["step"] = d.get("step")
        rec["action"] = d.get("action")
        rec["lr"] = d.get("lr")
    report = {
        "overrides": overrides,
        "final_val": result.final_val_loss if hasattr(result, "final_val_loss") else None,
        "calls": calls,
        "decisions": decisions,
        "train_loss": [(h.step, h.train_loss, h.lr) for h in result.history],
        "load": _uptime(),
    }
    (out / "capture.json").write_text(json.dumps(report, indent=2, default=str))
    for rec in calls:
        print(
            f"step {rec.get('step')}: lambda {rec['lambda_max']:.4g} converged={rec['converged']} "
            f"n_matvec={rec['n_matvec']} action={rec.get('action')} reason={rec['reason']}"
        )


def _rebuild(saved: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    from lrscale_megatron.models.arch import build_arch_model
    from lrscale_megatron.train.config import load_config

    cfg = load_config(saved["config"], saved["overrides"])
    model = build_arch_model(cfg)
    model.load_state_dict({n: t for n, t in saved["params"].items()}, strict=False)
    return model.to(dtype)


def _measure(
    saved: dict[str, Any], mode: str, dtype: torch.dtype, max_iter: int, tol: float, **op_kw: Any
) -> dict[str, Any]:
    from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos
    from lrscale_megatron.models.gpt import gpt_loss_fn

    model = _rebuild(saved, dtype)
    batch = saved["batch"]
    op = HessianOperator(model, gpt_loss_fn, batch, mode=mode, **op_kw)
    pop = PreconditionedOperator(op, [v.to(dtype) for v in saved["v_hat"]], eps=saved["eps"])
    t0 = time.perf_counter()
    res = lanczos(pop, k=1, max_iter=max_iter, tol=tol, seed=saved["kw"]["seed"], return_vectors=True)
    y = res.eigenvectors[0] if res.eigenvectors else None
    where = {}
    if y is not None:
        names = [n for n, _ in op.named_params]
        mass = {n: float((t.double() ** 2).sum()) for n, t in zip(names, y)}
        tot = sum(mass.values())
        where = {n: round(m / tot, 4) for n, m in sorted(mass.items(), key=lambda kv: -kv[1])[:4]}
    return {
        "mode": mode,
        "dtype": str(dtype),
        "op": {k: str(v) for k, v in op_kw.items()},
        "lambda_max": float(res.eigenvalues[0]),
        "converged": bool(res.converged),
        "reason": res.reason,
        "n_matvec": int(res.n_matvec),
        "residual": float(res.residuals[0]),
        "top_vector_mass": where,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def analyze(args: argparse.Namespace) -> None:
    saved = torch.load(args.file, weights_only=False)
    print("captured:", saved["estimate"], saved["kw"])
    scale = [(torch.sqrt(v.double().clamp_min(0)) + saved["eps"]).rsqrt() for v in saved["v_hat"]]
    names = list(saved["params"])
    flat = torch.cat([s.flatten() for s in scale])
    print(
        f"P^-1/2: median {flat.median():.3g}, max {flat.max():.3g}, "
        f"{int((flat > 1e3).sum())} of {flat.numel()} coordinates above 1e3"
    )
    for n, s in zip(names, scale):
        print(f"  {n:32s} max {float(s.max()):9.3g} median {float(s.median()):9.3g}")
    kw = saved["kw"]
    runs = [
        ("fd", torch.float32, kw["max_iter"], kw["tol"], {}),
        ("exact", torch.float32, kw["max_iter"], kw["tol"], {}),
        ("exact", torch.float64, args.ref_iter, 1e-6, {}),
    ]
    if args.reference_only:
        runs = runs[2:]
    for extra in args.extra:
        runs.append(("fd", torch.float32, kw["max_iter"], kw["tol"], {"fd_scheme": extra}))
    results = []
    for mode, dtype, it, tol, op_kw in runs:
        r = _measure(saved, mode, dtype, it, tol, **op_kw)
        print(json.dumps(r))
        results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps({"captured": saved["estimate"], "runs": results}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--out", default="out/spike")
    c.add_argument("--steps", type=int, default=40)
    c.add_argument("--lr", type=float, default=0.01)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--adapt-every", type=int, default=10)
    c.add_argument("--online", default="{}", help="more online settings (JSON)")
    a = sub.add_parser("analyze")
    a.add_argument("file")
    a.add_argument("--ref-iter", type=int, default=40)
    a.add_argument("--extra", nargs="*", default=[], help="also fd with these fd_scheme values")
    a.add_argument("--json", default=None)
    a.add_argument("--reference-only", action="store_true", help="only the float64 exact reference")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from lrscale_megatron.logutil import setup_logging

    setup_logging("INFO")
    capture(args) if args.cmd == "capture" else analyze(args)


if __name__ == "__main__":
    main()
