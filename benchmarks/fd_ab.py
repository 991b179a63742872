"""Same-process A/B of the fd product: another checkout's ``lrscale_megatron`` against this one's.

On a shared 2-core machine two runs of ``fd_cost.py`` (one per checkout) differ by ±0.03 in the ratio to
fwd+bwd, more than a change of a few hundred microseconds moves it. This script imports the other
checkout's package under another name (a copy in a temporary folder with its imports renamed), builds the
same operator from both on their own copies of ``fd_cost.py``'s TorchGPT, and times, interleaved (order
reversed every other round), a bare fwd+bwd and one anchored product of each as inside a host-basis
Lanczos solve (the unit-norm hint, the lazy restore: ``theta0`` copied back outside the timed region),
on this thread's CPU clock::

    python benchmarks/fd_ab.py --other ../main-checkout --repeats 61             # 256 tokens
    python benchmarks/fd_ab.py --other ../main-checkout --repeats 301 --quick    # tiny model: the Python
    python benchmarks/fd_ab.py --other ../main-checkout --pieces                 # + the Python pieces, timeit

``--pieces`` also times, for both, the per-product Python pieces alone (``timeit``, min of 5 x N calls,
us): the operator's evaluation context, the autocast guard's enter/exit and one module call under it.
Reported: the medians, each product's median and paired (per-round) ratio to fwd+bwd, and the median of
the per-round difference ``this - other`` in ms. Both products are checked to give the same bits.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fd_cost import build, loss_fn  # noqa: E402  (the same model and loss)

import lrscale_megatron.curvature as this  # noqa: E402
from lrscale_megatron.curvature import norm_hint  # noqa: E402
from lrscale_megatron.curvature.solve_scope import solve_scope  # noqa: E402

OTHER = "lrscale_megatron_other"


def import_other(checkout: str, tmp: str):
    """The other checkout's ``lrscale_megatron`` package as ``lrscale_megatron_other``."""
    dst = os.path.join(tmp, OTHER)
    shutil.copytree(
        os.path.join(checkout, "lrscale_megatron"), dst, ignore=shutil.ignore_patterns("__pycache__")
    )
    for root, _, files in os.walk(dst):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(root, f)
                with open(p) as fh:
                    s = fh.read()
                with open(p, "w") as fh:
                    fh.write(
                        s.replace("lrscale_megatron.", OTHER + ".").replace("lrscale_megatron ", OTHER + " ")
                    )
    sys.path.insert(0, tmp)
    return (
        importlib.import_module(OTHER + ".curvature"),
        importlib.import_module(OTHER + ".curvature.norm_hint"),
        importlib.import_module(OTHER + ".curvature.solve_scope").solve_scope,
    )


def pieces(ops: dict, mods: dict) -> dict:
    """us per call of the per-product Python pieces, for each package (``timeit``, min of 5 x N)."""
    import timeit

    def us(fn, number: int) -> float:
        return round(
            1e6 * min(timeit.repeat(fn, number=number, repeat=5, timer=time.thread_time)) / number, 2
        )

    def enter(cm_fn):
        def f():
            with cm_fn():
                pass

        return f

    ident, x = torch.nn.Identity(), torch.randn(2)
    out = {}
    for name, op in ops.items():
        guard = importlib.import_module(
            mods[name] + ".curvature.autocast_guard"
        ).refuse_low_precision_autocast
        with guard():
            hooked = us(lambda: ident(x), 20000)
        out[name] = {
            "evaluation context enter/exit": us(enter(lambda op=op: op._evaluation(None)), 2000),
            "autocast guard enter/exit": us(enter(guard), 5000),
            "a module call under the guard": hooked,
            "a module call without it": us(lambda: ident(x), 20000),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", required=True, help="path of the other checkout (e.g. a worktree of main)")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size (x 64 tokens)")
    ap.add_argument("--repeats", type=int, default=61)
    ap.add_argument("--quick", action="store_true", help="tiny model: the per-product Python dominates")
    ap.add_argument("--pieces", action="store_true", help="also time the per-product Python pieces")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        other, other_hint, other_scope = import_other(a.other, tmp)
        model, batch = build(a.quick, a.batch)
        params = list(model.parameters())
        ops = {}
        for name, mod in (("other", other), ("this", this)):
            op = mod.HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd")
            assert op.allow_anchor()
            ops[name] = op
        v = ops["this"].backend.randn(0)
        nv = ops["this"].backend.norm(v)
        v = [x / nv for x in v]

        def product(op, hint, scope):
            def f():
                with scope():
                    hint.remember(v, 1.0)
                    t0 = time.thread_time()
                    out = op.matvec(v)
                    dt = time.thread_time() - t0
                    hint.forget()
                return dt, out

            return f

        def bare():
            t0 = time.thread_time()
            torch.autograd.grad(loss_fn(model, batch), params)
            return time.thread_time() - t0, None

        fns = {
            "fwd+bwd": bare,
            "other": product(ops["other"], other_hint, other_scope),
            "this": product(ops["this"], norm_hint, solve_scope),
        }
        first = {k: f()[1] for k, f in fns.items()}
        assert all(torch.equal(x, y) for x, y in zip(first["other"], first["this"])), "the products differ"
        t: dict[str, list[float]] = {k: [] for k in fns}
        load0 = os.getloadavg()
        for i in range(a.repeats):
            for k in list(fns) if i % 2 == 0 else list(fns)[::-1]:
                t[k].append(fns[k]()[0])
        extra = pieces(ops, {"other": OTHER, "this": "lrscale_megatron"}) if a.pieces else None
    med = {k: statistics.median(x) for k, x in t.items()}
    res: dict = {
        "tokens": a.batch * batch["tokens"].shape[1],
        "repeats": a.repeats,
        "load": [load0, os.getloadavg()],
        "median_ms": {k: round(1e3 * x, 3) for k, x in med.items()},
        # the mean sits above the median on a loaded machine (a right tail): phases reported as means
        # (``fd_cost.py --breakdown``) are not comparable with a median fwd+bwd
        "mean_ms": {k: round(1e3 * statistics.fmean(x), 3) for k, x in t.items()},
    }
    for k in ("other", "this"):
        res[f"{k} / fwd+bwd median"] = round(med[k] / med["fwd+bwd"], 4)
        res[f"{k} / fwd+bwd paired"] = round(statistics.median(x / y for x, y in zip(t[k], t["fwd+bwd"])), 4)
    res["this - other, paired ms"] = round(
        1e3 * statistics.median(x - y for x, y in zip(t["this"], t["other"])), 3
    )
    if extra is not None:
        res["pieces_us"] = extra
    print(json.dumps(res))


if __name__ == "__main__":
    main()
