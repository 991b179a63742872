"""Extra memory of an online curvature measurement (Lanczos k=1 on fd products) versus max_iter, in
units of parameter bytes; and the cost of one product relative to one forward + backward.

One process, CPU (no GPU needed; counts tensor storages, not the allocator)::

    python benchmarks/curvature_memory.py                # TorchGPT ~0.9M params, float32 and bf16
    python benchmarks/curvature_memory.py --quick        # tiny model: smoke run
    python benchmarks/curvature_memory.py --max-iter 10 20 40
    python benchmarks/curvature_memory.py --max-iter 10 20 --threads 1 --no-cost --host-cost --clock thread

Memory: :class:`lrscale_megatron.curvature.memtrack.LiveTensorBytes` records the bytes of every tensor
storage allocated inside a block and alive at once (activations, gradients, Krylov vectors, autograd
buffers). ``train`` is one forward + backward (``torch.autograd.grad``); a measurement is
``lanczos(HessianOperator(mode="fd"), k=1, max_iter=m, tol=0, return_vectors=True)`` (tol=0 runs all
``m`` iterations and the second pass: the worst case), with the default ``fd_restore="auto"`` (the fd
anchor, one parameter copy for the solve, with ``basis="host"``; subtraction, no copy, with the second
pass), ``"subtract"`` with the host basis (no anchor) and, float32, ``"copy"``; ``basis="recompute"``
(second pass) and ``basis="host"`` (Lanczos vectors in host memory). Reported: the excess of the
measurement's *device* peak over the training step's (what the measurement adds), and the host basis's
bytes, apart
(:class:`~lrscale_megatron.curvature.memtrack.HostDeviceBytes`; on this CPU both are the same RAM), in
bytes and in units of parameter bytes.

bf16 also with ``vectors="host"`` (the solver's vectors in host memory, :mod:`lrscale_megatron.curvature.hostvectors`)
at the training's micro-batch (``split=1``) and with ``batch_split`` 2 and 4 (the held batch evaluated in
parts).

``--host-cost``: one bf16 fd product with device vectors, with host vectors, and with host vectors and
``batch_split=2``, timed interleaved (``--repeats`` rounds, ``--clock``); on this CPU a host copy is a memory
copy, a GPU adds two PCIe transfers a product (not measured here).

Cost: fwd+bwd, one fd product (base gradient cached; ``subtract`` and ``copy`` restore), one exact
product (first-gradient graph reused) on a unit vector, and the host basis's per-step traffic (store a
vector, read one back; on this CPU a memory copy, on a GPU a PCIe transfer each way) are timed
interleaved in this process,
``--repeats`` rounds; medians and minima, and their ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.curvature.memtrack import HostDeviceBytes, fwd_bwd_peak

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fd_cost import build as _build  # noqa: E402  (the same model and loss)
from fd_cost import loss_fn  # noqa: E402


def build(quick: bool, dtype: torch.dtype):
    """The benchmark model in ``dtype`` and one micro-batch of 4 sequences."""
    return _build(quick, 4, dtype)


def memory(quick: bool, dtype: torch.dtype, iters: list[int]) -> dict:
    model, batch = build(quick, dtype)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    train = fwd_bwd_peak(model, loss_fn, batch)
    out = {"dtype": str(dtype).removeprefix("torch."), "params": sum(p.numel() for p in model.parameters())}
    out["param_bytes"], out["train_peak_x"] = pbytes, train / pbytes
    runs: list[tuple[str, str, str, int]] = [
        ("auto", "recompute", "device", 1),
        ("auto", "host", "device", 1),
        ("subtract", "host", "device", 1),
    ]
    if dtype == torch.float32:
        runs.append(("copy", "recompute", "device", 1))
    else:
        runs += [("auto", basis, "host", s) for s in (1, 2, 4) for basis in ("host", "recompute")]
    for restore, basis, vectors, split in runs:
        for m in iters:
            op = HessianOperator(
                model, loss_fn, batch, mode="fd", fd_restore=restore, vectors=vectors, batch_split=split
            )
            with HostDeviceBytes() as mem:
                r = lanczos(op, k=1, max_iter=m, tol=0.0, seed=0, return_vectors=True, basis=basis)  # type: ignore[arg-type]
                op.release()
                del r
            key = f"{restore}, basis={basis}" + (
                f", vectors=host, split={split}" if vectors == "host" else ""
            )
            out[f"{key}: device extra_over_train_x@{m}"] = (mem.peak - train) / pbytes
            out[f"{key}: device extra_over_train_bytes@{m}"] = mem.peak - train
            out[f"{key}: host_x@{m}"] = mem.host_peak / pbytes
            out[f"{key}: host_bytes@{m}"] = mem.host_peak
    return out


def cost(quick: bool, repeats: int) -> dict:
    model, batch = build(quick, torch.float32)
    params = list(model.parameters())
    # one model copy per operator: an fd product perturbs and restores its model in place, which bumps
    # the parameters' versions and would make the other operators re-take their cached base gradient
    # or first-gradient graph (the first version of this benchmark timed exact products that way)
    fd = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd")
    fdc = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="fd", fd_restore="copy")
    ex = HessianOperator(copy.deepcopy(model), loss_fn, batch, mode="exact")
    v = fd.backend.randn(0)
    nv = fd.backend.norm(v)
    v = [x / nv for x in v]  # a unit vector, as Lanczos hands the operator
    for op in (fd, fdc, ex):
        op.matvec(v)  # caches the base gradient / builds the reused graph
    t: dict[str, list[float]] = {"fwd+bwd": [], "fd": [], "fd copy": [], "exact": [], "host step": []}
    w = fd.backend.clone(v)

    def host_step() -> None:
        """What basis="host" adds to one Lanczos step: store q, read q_prev back (w += a q_prev)."""
        hb = fd.backend.host_basis(2)[0]
        assert hb is not None
        hb.append(v)
        hb.append(v)
        hb.axpy_(1e-3, 0, w)
        hb.release()

    for _ in range(repeats):
        for name, fn in (
            ("fwd+bwd", lambda: torch.autograd.grad(loss_fn(model, batch), params)),
            ("fd", lambda: fd.matvec(v)),
            ("fd copy", lambda: fdc.matvec(v)),
            ("exact", lambda: ex.matvec(v)),
            ("host step", host_step),
        ):
            t0 = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - t0)
    assert fd.n_grad == 1 + fd.n_matvec and ex.n_grad == 1, "a cached gradient was re-taken"
    med = {k: statistics.median(x) for k, x in t.items()}
    low = {k: min(x) for k, x in t.items()}
    return {
        "median_s": med,
        "min_s": low,
        **{f"{k}/fwd+bwd (median)": med[k] / med["fwd+bwd"] for k in ("fd", "fd copy", "exact")},
        **{f"{k}/fwd+bwd (min)": low[k] / low["fwd+bwd"] for k in ("fd", "fd copy", "exact")},
        "host step (2 stores + 1 read-back; one step stores 1 and reads 1)/fd (median)": med["host step"]
        / med["fd"],
    }


def host_cost(quick: bool, repeats: int, clock) -> dict:
    """One bf16 fd product with device vectors, host vectors, host vectors + batch_split=2 (interleaved)."""
    model, batch = build(quick, torch.bfloat16)
    ops = {
        "device": HessianOperator(model, loss_fn, batch, mode="fd"),
        "host": HessianOperator(model, loss_fn, batch, mode="fd", vectors="host"),
        "host split=2": HessianOperator(model, loss_fn, batch, mode="fd", vectors="host", batch_split=2),
    }
    v = ops["device"].backend.randn(0)
    nv = ops["device"].backend.norm(v)
    v = [x / nv for x in v]
    vs = {k: op.backend.as_vector(v, "v") for k, op in ops.items()}
    for k, op in ops.items():
        op.matvec(vs[k])  # caches the base gradient
    t: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):
        for k, op in ops.items():
            t0 = clock()
            op.matvec(vs[k])
            t[k].append(clock() - t0)
    med = {k: statistics.median(x) for k, x in t.items()}
    paired = {k: statistics.median(a / b for a, b in zip(t[k], t["device"])) for k in ops}
    return {
        "median_ms": {k: 1e3 * x for k, x in med.items()},
        "min_ms": {k: 1e3 * min(x) for k, x in t.items()},
        "over_device_median": {k: med[k] / med["device"] for k in ops},
        "over_device_paired": paired,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-iter", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cost", action="store_true", help="memory only (skip the timed product costs)")
    ap.add_argument("--host-cost", action="store_true", help="time bf16 fd products, host vs device vectors")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.clock == "thread" and a.threads != 1:
        raise SystemExit("--clock thread needs --threads 1 (other torch threads' time is not counted)")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    res: dict = {
        "load": os.getloadavg(),
        "memory": [memory(a.quick, d, a.max_iter) for d in (torch.float32, torch.bfloat16)],
    }
    if not a.no_cost:
        res["cost"] = cost(a.quick, a.repeats)
    if a.host_cost:
        res["host_cost"] = host_cost(a.quick, a.repeats, clock)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
