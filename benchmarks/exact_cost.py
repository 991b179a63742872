"""Cost of one exact Hessian-vector product relative to one forward + backward, and of its alternatives.

One process, CPU (no GPU needed)::

    python benchmarks/exact_cost.py --clock thread                 # B = 4, 16, 32 (256, 1024, 2048 tokens)
    python benchmarks/exact_cost.py --batch 32 --repeats 15 --clock thread
    python benchmarks/exact_cost.py --quick                        # tiny model, smoke run
    python benchmarks/exact_cost.py --profile --batch 4 32         # also a per-op table of one product

Model: TorchGPT V=256, S=64, H=128, L=4 (834,304 float32 parameters; the model of
``benchmarks/fd_cost.py`` and ``benchmarks/curvature_memory.py``), one micro-batch of ``B x 64`` tokens.
Timed **interleaved** in this process, ``--repeats`` rounds, each operator on its own model copy, on one
unit vector:

* ``fwd+bwd``: ``torch.autograd.grad`` of the loss (the reference);
* ``exact``: the default exact product (first-gradient graph reused, the cheaper double backward of
  :mod:`lrscale_megatron.curvature.doublegrad`);
* ``exact stock``: the same with PyTorch's own double-backward formulas (``doublegrad.ENABLED = False``
  while that operator builds its graph): the "before";
* ``exact fresh``: ``reuse_graph=False`` (forward + create-graph backward + double backward per product);
* ``jvp``: forward-over-reverse, ``torch.func.jvp(grad(L))`` (``mode="jvp"``);
* ``linearize`` (``--linearize``, benchmark only, not an operator mode): ``torch.func.linearize(grad(L))``
  traced once (the primal computed once per solve; its cost is reported as ``linearize_trace_ms``), then its
  jvp graph replayed per product.

Reported: median and min of each ratio to fwd+bwd, the medians of the per-round ratios exact / fwd+bwd
and exact / exact stock (paired in the same round, so load swings cancel), how far each product is from the default exact
product (max relative difference, float32), and the median number of fresh pages each call faults in
(``minor_faults_median``, Linux). ``--profile`` prints torch.profiler op counts and self times
per op type for one fwd+bwd, one stock and one default exact product. The script asserts that no reused
graph is re-taken.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

from lrscale_megatron.curvature import HessianOperator, doublegrad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fd_cost import add_common_options, build, loss_fn, use_clock  # noqa: E402  (the same model, loss, clock)

CLOCK = [time.perf_counter]
OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mul", "aten::add", "aten::add_", "aten::sum")


def _minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):  # not Linux: not reported
        return 0


def _ops(fn, n: int = 3) -> dict[str, tuple[float, float]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            fn()
    return {e.key: (e.count / n, e.self_cpu_time_total / n / 1000) for e in p.key_averages()}


def _stock(fn):
    def inner():
        old = doublegrad.ENABLED
        doublegrad.ENABLED = False
        try:
            return fn()
        finally:
            doublegrad.ENABLED = old

    return inner


def _linearized(model, batch, v):
    """(per-product function, tracing seconds) of ``torch.func.linearize`` of the gradient at the model's
    parameters, on the script's clock."""
    from torch.func import functional_call, grad, linearize

    names = [n for n, _ in model.named_parameters()]
    primals = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(pd):
        logits = functional_call(model, pd, (batch["tokens"],))
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        )

    t0 = CLOCK[0]()
    _, jvp_fn = linearize(grad(loss_of), primals)
    traced = CLOCK[0]() - t0
    tangents = dict(zip(names, v))

    def product():
        hv = jvp_fn(tangents)
        return [hv[n] for n in names]

    return product, traced


def measure(quick: bool, bsz: int, repeats: int, profile: bool, lin: bool = False) -> dict:
    model, batch = build(quick, bsz)
    params = list(model.parameters())
    ex = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="exact")
    st = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="exact")
    fr = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="exact", reuse_graph=False)
    jv = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="jvp")
    v = ex.backend.randn(0)
    nv = ex.backend.norm(v)
    v = [x / nv for x in v]
    fns = {
        "fwd+bwd": lambda: torch.autograd.grad(loss_fn(model, batch), params),
        "exact": lambda: ex.matvec(v),
        "exact stock": _stock(lambda: st.matvec(v)),
        "exact fresh": lambda: fr.matvec(v),
        "jvp": lambda: jv.matvec(v),
    }
    traced = None
    if lin:
        fns["linearize"], traced = _linearized(copy.deepcopy(model), batch, v)
    ref = ex.matvec(v)  # builds the reused graph
    diffs = {}
    for name in [k for k in fns if k not in ("fwd+bwd", "exact")]:
        hv = fns[name]()
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(hv, ref)) / max(
            float(a.abs().max()) for a in ref
        )
    t: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[int]] = defaultdict(list)
    for _ in range(repeats):
        for name, fn in fns.items():
            f0 = _minor_faults()
            t0 = CLOCK[0]()
            fn()
            t[name].append(CLOCK[0]() - t0)
            faults[name].append(_minor_faults() - f0)
    assert ex.n_grad == 1 and st.n_grad == 1, "a reused graph was re-taken"
    med = {k: statistics.median(x) for k, x in t.items()}
    low = {k: min(x) for k, x in t.items()}
    others = [k for k in fns if k != "fwd+bwd"]
    out: dict = {
        "batch": bsz,
        "tokens": bsz * batch["tokens"].shape[1],
        "params": sum(p.numel() for p in params),
        "median_ms": {k: 1000 * x for k, x in med.items()},
        "min_ms": {k: 1000 * x for k, x in low.items()},
        "ratio_median": {k: med[k] / med["fwd+bwd"] for k in others},
        "ratio_min": {k: low[k] / low["fwd+bwd"] for k in others},
        "max_rel_diff_to_exact": diffs,
        # fresh pages faulted in per call (this thread; Linux), median: the allocator's cost beyond the ops
        "minor_faults_median": {k: statistics.median(x) for k, x in faults.items()},
        # per-round exact / exact stock (the same round: load swings cancel), median
        "exact_over_stock_paired": statistics.median(a / b for a, b in zip(t["exact"], t["exact stock"])),
        # per-round exact / fwd+bwd (timed back to back in the same round), median
        "exact_over_fwd_bwd_paired": statistics.median(a / b for a, b in zip(t["exact"], t["fwd+bwd"])),
    }
    if traced is not None:
        out["linearize_trace_ms"] = 1000 * traced
        out["linearize_trace_over_fwd_bwd"] = traced / med["fwd+bwd"]
    if profile:
        tables = {k: _ops(fns[k]) for k in ("fwd+bwd", "exact stock", "exact")}
        keys = sorted(
            set().union(*tables.values()),
            key=lambda k: -max(tb.get(k, (0, 0))[1] for tb in tables.values()),
        )
        out["profile"] = {
            k: {name: tables[name].get(k, (0, 0.0)) for name in tables}
            for k in keys[:25]
            if k.startswith("aten::") or k in OPS
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_options(ap)
    ap.add_argument("--profile", action="store_true", help="also a per-op table (torch.profiler)")
    ap.add_argument(
        "--linearize",
        action="store_true",
        help="also torch.func.linearize of the gradient (traced per solve)",
    )
    a = ap.parse_args()
    use_clock(a, CLOCK)
    res = {"load_before": os.getloadavg(), "threads": a.threads, "repeats": a.repeats, "clock": a.clock}
    res["sizes"] = [measure(a.quick, b, a.repeats, a.profile, a.linearize) for b in a.batch]
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    names = list(res["sizes"][0]["ratio_median"])
    print(
        "\n| tokens | fwd+bwd ms (median) | "
        + " | ".join(f"{n} / fwd+bwd median (min)" for n in names)
        + " | exact / fwd+bwd (paired) | exact / stock (paired) |"
    )
    print("|---|---|" + "---|" * (len(names) + 2))
    for r in res["sizes"]:
        m, n = r["ratio_median"], r["ratio_min"]
        cells = " | ".join(f"{m[k]:.3f} ({n[k]:.3f})" for k in names)
        print(
            f"| {r['tokens']} | {r['median_ms']['fwd+bwd']:.1f} | {cells} | "
            f"{r['exact_over_fwd_bwd_paired']:.3f} | {r['exact_over_stock_paired']:.3f} |"
        )
    for r in res["sizes"]:
        pages = ", ".join(f"{k} {v:.0f}" for k, v in r["minor_faults_median"].items())
        print(f"fresh pages per call at {r['tokens']} tokens (median): {pages}")
    for r in res["sizes"]:
        if "linearize_trace_ms" in r:
            print(
                f"linearize at {r['tokens']} tokens: tracing {r['linearize_trace_ms']:.0f} ms per solve "
                f"= {r['linearize_trace_over_fwd_bwd']:.1f} fwd+bwd"
            )
    if a.profile:
        for r in res["sizes"]:
            print(f"\nper-op (count, self ms) at {r['tokens']} tokens: fwd+bwd | exact stock | exact")
            for k, row in r["profile"].items():
                cells = " | ".join(f"{c:.0f}, {ms:.2f}" for c, ms in row.values())
                print(f"| {k} | {cells} |")


if __name__ == "__main__":
    main()
