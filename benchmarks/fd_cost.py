"""Cost of one finite-difference (and one exact) Hessian-vector product relative to one forward + backward,
at several micro-batch sizes, and where the fd product's extra time goes.

One process, CPU (no GPU needed)::

    python benchmarks/fd_cost.py                              # B = 4, 16, 32 (256, 1024, 2048 tokens)
    python benchmarks/fd_cost.py --batch 4 --repeats 21       # the 256-token micro-batch only
    python benchmarks/fd_cost.py --quick                      # tiny model, smoke run
    python benchmarks/fd_cost.py --clock thread               # CPU time of the one torch thread
    python benchmarks/fd_cost.py --batch 4 --solve 8          # also whole Lanczos solves, anchor vs not

Model: TorchGPT V=256, S=64, H=128, L=4 (834,304 float32 parameters; the model of
``benchmarks/curvature_memory.py``), one micro-batch of ``B x 64`` tokens. For each batch size, fwd+bwd
(``torch.autograd.grad`` of the loss), one fd product (forward scheme, base gradient cached) restored by
subtraction (``fd``: the default ``fd_restore="auto"`` outside a solve that lends the room, and with the
second-pass Lanczos), from the anchor (``fd anchor``: ``"auto"`` inside a host-basis Lanczos solve; the
operator is lent the room as that solver lends it, ``allow_anchor()``, and one anchor serves every round; the
product runs as inside such a solve: the solver's unit-norm hint for ``v`` and the lazy restore, ``theta0``
being copied back when the round's solve scope ends, outside the timed region), from the anchor as before the
lazy restore (``fd anchor eager``: outside a solve, restored after every product, ``||v||`` measured), with
``fd_restore="copy"``, and one exact product (first-gradient graph reused) on a unit vector are timed
**interleaved** in this process, ``--repeats`` rounds; each operator has its own model copy (an fd product
bumps its parameters' versions); the script asserts that no cached gradient or graph is re-taken. Reported:
median and min of each ratio to fwd+bwd, and the median of the per-round ratios (``ratio_paired``: both timed
in the same round). ``--breakdown`` also times the phases of the ``fd``, ``fd anchor`` and ``fd anchor eager``
products (perturb, gradient at the perturbed point, restore, the rest) by wrapping them, over the same rounds.
``--solve N`` also times whole ``k=1`` Lanczos solves (``basis="host"``, ``max_iter=N``, ``tol=0``: N
products) with the default ``fd_restore="auto"`` (the anchor) and with ``"subtract"``, interleaved, and checks
that their Ritz histories are identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections import defaultdict

import torch

from lrscale_megatron.curvature import HessianOperator, lanczos, norm_hint, products
from lrscale_megatron.curvature import perturb as pt
from lrscale_megatron.curvature.anchor import Anchor
from lrscale_megatron.curvature.solve_scope import DIRTY, solve_scope
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

#: the clock every figure is read from: ``time.perf_counter`` (wall) or ``time.thread_time`` (this
#: thread's CPU time: with one torch thread every kernel runs on it, and time spent descheduled by other
#: jobs on a shared machine is not counted)
CLOCK = [time.perf_counter]


def add_common_options(ap: argparse.ArgumentParser) -> None:
    """``--quick``, ``--batch``, ``--repeats``, ``--threads`` and ``--clock wall|thread`` (shared with
    ``exact_cost.py``)."""
    ap.add_argument("--quick", action="store_true", help="tiny model (smoke run)")
    ap.add_argument(
        "--batch", type=int, nargs="+", default=[4, 16, 32], help="micro-batch sizes (x 64 tokens)"
    )
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall time, or this thread's CPU time (needs --threads 1; robust to a loaded machine)",
    )


def use_clock(a: argparse.Namespace, clock: list) -> None:
    """Set the torch threads and the clock ``clock[0]`` from the parsed ``--threads`` / ``--clock``."""
    if a.clock == "thread":
        if a.threads != 1:
            raise SystemExit("--clock thread needs --threads 1 (other torch threads' time is not counted)")
        clock[0] = time.thread_time
    torch.set_num_threads(a.threads)


def loss_fn(m, b):
    return torch_gpt_loss(m, b).float()


def build(quick: bool, bsz: int, dtype: torch.dtype = torch.float32):
    """The benchmarks' TorchGPT (834,304 parameters; ``quick``: a tiny one) in ``dtype`` and one micro-batch
    of ``bsz`` sequences (shared by ``exact_cost.py`` and ``curvature_memory.py``)."""
    cfg = (
        TorchGPTConfig(vocab_size=64, seq_length=16, hidden_size=32, num_layers=2, num_heads=4)
        if quick
        else TorchGPTConfig(vocab_size=256, seq_length=64, hidden_size=128, num_layers=4, num_heads=4)
    )
    model = TorchGPT(cfg)
    model.init_weights(0)
    model = model.to(dtype)
    tok = torch.randint(
        0, cfg.vocab_size, (bsz, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0)
    )
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


class _Phases:
    """Wall time of the fd product's phases, by wrapping ``perturb_``, ``restore_`` and the gradient."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self._orig = (products.perturb_, products.restore_, Anchor.perturb_, Anchor.restore_)

    def wrap(self, name, fn):
        def inner(*a, **k):
            t0 = CLOCK[0]()
            try:
                return fn(*a, **k)
            finally:
                self.t[name] += CLOCK[0]() - t0

        return inner

    def __enter__(self):
        products.perturb_ = self.wrap("perturb", pt.perturb_)  # type: ignore[assignment]
        products.restore_ = self.wrap("restore", pt.restore_)  # type: ignore[assignment]
        Anchor.perturb_ = self.wrap("anchor perturb", self._orig[2])  # type: ignore[method-assign]
        Anchor.restore_ = self.wrap("anchor restore", self._orig[3])  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc):
        products.perturb_, products.restore_, Anchor.perturb_, Anchor.restore_ = self._orig


def measure(quick: bool, bsz: int, repeats: int, breakdown: bool) -> dict:
    model, batch = build(quick, bsz)
    params = list(model.parameters())
    fd = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd")
    fda = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd")
    fde = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd")
    fdc = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd", fd_restore="copy")
    ex = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="exact")
    assert fd.restore_mode == "subtract" and fda.allow_anchor() and fda.restore_mode == "anchor"
    assert fde.allow_anchor() and fde.restore_mode == "anchor"
    v = fd.backend.randn(0)
    nv = fd.backend.norm(v)
    v = [x / nv for x in v]  # a unit vector, as Lanczos hands the operator
    for op in (fd, fda, fde, fdc, ex):
        op.matvec(v)  # caches the base gradient / builds the reused graph / takes the anchor
    anchor = fda._anchor
    phases = {"fd": _Phases(), "fd anchor": _Phases(), "fd anchor eager": _Phases()}
    grad_t: dict[str, list[float]] = {k: [0.0] for k in phases}

    def timed(fn, acc):
        def inner(*a, **k):
            t0 = CLOCK[0]()
            try:
                return fn(*a, **k)
            finally:
                acc[0] += CLOCK[0]() - t0

        return inner

    if breakdown:
        fd._gradient = timed(fd._gradient, grad_t["fd"])  # type: ignore[method-assign]
        fda._gradient = timed(fda._gradient, grad_t["fd anchor"])  # type: ignore[method-assign]
        fde._gradient = timed(fde._gradient, grad_t["fd anchor eager"])  # type: ignore[method-assign]

    def anchored():
        # as inside a host-basis Lanczos solve: the solver remembers that its q is a unit vector, and the
        # product leaves theta0 + h v in place (lazy restore); theta0 is copied back when the solve ends,
        # here when the scope is left, outside the timed region (counted by --solve, once per solve)
        norm_hint.remember(v, 1.0)
        fda.matvec(v)
        assert fda._anchor is not None and fda._anchor.written, "the product did not stay lazy"
        norm_hint.forget()

    names = ("fd", "fd anchor", "fd anchor eager", "fd copy", "exact")
    t: dict[str, list[float]] = {"fwd+bwd": [], **{k: [] for k in names}}
    for _ in range(repeats):
        for name, fn in (
            ("fwd+bwd", lambda: torch.autograd.grad(loss_fn(model, batch), params)),
            ("fd", lambda: fd.matvec(v)),
            ("fd anchor", anchored),
            ("fd anchor eager", lambda: fde.matvec(v)),  # the anchor before the lazy restore (and no hint)
            ("fd copy", lambda: fdc.matvec(v)),
            ("exact", lambda: ex.matvec(v)),
        ):
            scope = solve_scope() if name == "fd anchor" else _Null()
            with scope, phases[name] if breakdown and name in phases else _Null():
                t0 = CLOCK[0]()
                fn()
                t[name].append(CLOCK[0]() - t0)
            assert not DIRTY
    assert all(op.n_grad == 1 + op.n_matvec for op in (fd, fda, fde, fdc)) and ex.n_grad == 1, (
        "a cached gradient was re-taken"
    )
    assert fda._anchor is anchor, "the anchor was re-taken"
    fda.drop_anchor()  # what the solver does when the solve ends
    fde.drop_anchor()
    med = {k: statistics.median(x) for k, x in t.items()}
    low = {k: min(x) for k, x in t.items()}
    out = {
        "batch": bsz,
        "tokens": bsz * batch["tokens"].shape[1],
        "params": sum(p.numel() for p in params),
        "median_ms": {k: 1000 * x for k, x in med.items()},
        "min_ms": {k: 1000 * x for k, x in low.items()},
        "ratio_median": {k: med[k] / med["fwd+bwd"] for k in names},
        "ratio_min": {k: low[k] / low["fwd+bwd"] for k in names},
        # the median over rounds of each round's ratio (both timed in the same round: drift cancels)
        "ratio_paired": {k: statistics.median(a / b for a, b in zip(t[k], t["fwd+bwd"])) for k in names},
    }
    if breakdown:
        for name, ph in phases.items():
            parts = {**ph.t, "gradient": grad_t[name][0]}
            parts["rest"] = sum(t[name]) - sum(parts.values())
            key = name.replace(" ", "_") + "_phases_ms_per_product"
            out[key] = {k: 1000 * x / repeats for k, x in parts.items()}
    return out


def solves(quick: bool, bsz: int, repeats: int, max_iter: int) -> dict:
    """Whole k=1 Lanczos solves on the host basis, fd_restore auto (anchor) vs subtract, interleaved."""
    model, batch = build(quick, bsz)
    t: dict[str, list[float]] = {"auto": [], "subtract": []}
    hist = {}
    for _ in range(repeats):
        for restore in t:
            op = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd", fd_restore=restore)
            t0 = CLOCK[0]()
            r = lanczos(op, k=1, max_iter=max_iter, tol=0.0, basis="host")
            t[restore].append(CLOCK[0]() - t0)
            assert op._anchor is None
            hist.setdefault(restore, r.history)
    assert hist["auto"] == hist["subtract"], "the anchor changed the Ritz values"
    med = {k: statistics.median(x) for k, x in t.items()}
    return {
        "batch": bsz,
        "max_iter": max_iter,
        "median_s": med,
        "min_s": {k: min(x) for k, x in t.items()},
        "auto/subtract (median)": med["auto"] / med["subtract"],
    }


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_options(ap)
    ap.add_argument("--breakdown", action="store_true", help="also time the fd product's phases")
    ap.add_argument(
        "--solve", type=int, default=0, help="also time whole Lanczos solves of this many products"
    )
    a = ap.parse_args()
    use_clock(a, CLOCK)
    res = {"load_before": os.getloadavg(), "threads": a.threads, "repeats": a.repeats, "clock": a.clock}
    res["sizes"] = [measure(a.quick, b, a.repeats, a.breakdown) for b in a.batch]
    if a.solve:
        res["solves"] = [solves(a.quick, b, max(3, a.repeats // 2), a.solve) for b in a.batch]
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    print(
        "\n| tokens | fwd+bwd ms (median) | fd / fwd+bwd median (min) [paired] | fd anchor / fwd+bwd | "
        "fd anchor eager / fwd+bwd | fd copy / fwd+bwd | exact / fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in res["sizes"]:
        m, n, q = r["ratio_median"], r["ratio_min"], r["ratio_paired"]
        keys = ("fd", "fd anchor", "fd anchor eager", "fd copy", "exact")
        cells = " | ".join(f"{m[k]:.3f} ({n[k]:.3f}) [{q[k]:.3f}]" for k in keys)
        print(f"| {r['tokens']} | {r['median_ms']['fwd+bwd']:.1f} | {cells} |")


if __name__ == "__main__":
    main()
