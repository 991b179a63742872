"""What an fd product's gradient phase costs beyond a bare ``torch.autograd.grad(loss_fn(model, batch), params)``.

One process, CPU, one torch thread, this thread's CPU time::

    python benchmarks/fd_gradient_overhead.py                  # 256 tokens (B = 4), 61 rounds
    python benchmarks/fd_gradient_overhead.py --batch 4 --repeats 121

The benchmark TorchGPT of ``fd_cost.py`` (834,304 float32 parameters in 52 tensors). Part 1 times each
piece the product's gradient adds, alone (``timeit``, min of 5 x N calls): the autocast guard's forward
pre-hook per module call (against a module call without it), the guard's enter/exit, the deterministic
evaluation (``eval()`` flags and the generators forked and seeded), the math-SDPA context, the operator's
whole evaluation context, ``_accumulate`` of fresh autograd outputs (one micro-batch), and one anchor key
(the lazy restore's identity/version check). Part 2 times, interleaved (order alternating each round),
the bare fwd+bwd, the same under the guard only, and the product's gradient phase (guard +
``HessianOperator._gradient`` with the power-of-two seed), and reports the median of the per-round
differences (all on the operator's model copy): the pieces are tens of microseconds, so under load part 2
only bounds them.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import timeit

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lrscale_megatron.curvature import HessianOperator
from lrscale_megatron.curvature.anchor import _key
from lrscale_megatron.curvature.autocast_guard import refuse_low_precision_autocast
from lrscale_megatron.curvature.evaluation import deterministic_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fd_cost import build, loss_fn  # noqa: E402  (the same model and loss)

CLOCK = time.thread_time


def per_call_us(fn, number: int) -> float:
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=5, timer=CLOCK)) / number


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="micro-batch size (x 64 tokens)")
    ap.add_argument("--repeats", type=int, default=61)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, batch = build(False, a.batch)
    params = list(model.parameters())
    op = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd")
    print(f"load {os.getloadavg()}; {len(params)} parameter tensors; {a.batch * 64} tokens")

    calls = [0]
    h = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, x: calls.__setitem__(0, calls[0] + 1)
    )
    loss_fn(model, batch)
    h.remove()
    ident, x = torch.nn.Identity(), torch.randn(2)
    plain = per_call_us(lambda: ident(x), 20000)
    with refuse_low_precision_autocast():
        hooked = per_call_us(lambda: ident(x), 20000)

    def enter(cm_fn):
        def f():
            with cm_fn():
                pass

        return f

    fresh = list(torch.autograd.grad(loss_fn(op.model, batch), op.params))
    print("part 1, us per call (thread CPU time, min of 5 x N):")
    print(
        f"  module calls per forward: {calls[0]}; a module call {plain:.2f}, with the guard's hook {hooked:.2f}"
    )
    print(f"    -> guard hooks per forward ~{calls[0] * (hooked - plain):.0f} us")
    print(f"  guard enter/exit {per_call_us(enter(refuse_low_precision_autocast), 5000):.1f}")
    print(
        f"  deterministic_loss enter/exit {per_call_us(enter(lambda: deterministic_loss(op.model)), 2000):.1f}"
    )
    print(
        f"  sdpa_kernel(MATH) enter/exit {per_call_us(enter(lambda: sdpa_kernel(SDPBackend.MATH)), 5000):.1f}"
    )
    print(
        f"  operator _evaluation(None) enter/exit {per_call_us(enter(lambda: op._evaluation(None)), 2000):.1f}"
    )
    print(
        f"  _accumulate(fresh outputs, 1 micro-batch) {per_call_us(lambda: op._accumulate(None, fresh, 1), 2000):.1f}"
    )
    print(f"  one anchor key ({len(params)} tensors) {per_call_us(lambda: _key(op.params), 5000):.1f}")

    s = 2.0**13

    def bare():  # on the operator's own model copy (another copy alone moves it by ~0.3 ms here)
        return torch.autograd.grad(loss_fn(op.model, batch), op.params)

    def bare_guard():
        with refuse_low_precision_autocast():
            return bare()

    def gradient():
        with refuse_low_precision_autocast():
            return op._gradient(grad_scale=s)

    fns = {"bare": bare, "bare (control)": bare, "bare + guard": bare_guard, "product gradient": gradient}
    for f in fns.values():
        f()
    t: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(a.repeats):
        for k in keys if i % 2 else keys[::-1]:
            t0 = CLOCK()
            fns[k]()
            t[k].append(CLOCK() - t0)
    print(f"part 2, {a.repeats} interleaved rounds, ms (median; median of per-round difference to bare):")
    for k in keys:
        d = statistics.median(x - y for x, y in zip(t[k], t["bare"]))
        print(f"  {k:17s} {1000 * statistics.median(t[k]):8.3f}  {1000 * d:+.3f}")
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
