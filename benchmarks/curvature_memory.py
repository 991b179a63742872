"""Extra memory of an online curvature measurement (Lanczos k=1 on fd products) versus max_iter, in
units of parameter bytes; and the cost of one product relative to one forward + backward.

One process, CPU (no GPU needed; counts tensor storages, not the allocator)::

    python benchmarks/curvature_memory.py                # TorchGPT ~0.9M params, float32 and bf16
    python benchmarks/curvature_memory.py --quick        # tiny model: smoke run
    python benchmarks/curvature_memory.py --max-iter 10 20 40

Memory: :class:`lrscale_megatron.curvature.memtrack.LiveTensorBytes` records the bytes of every tensor
storage allocated inside a block and alive at once (activations, gradients, Krylov vectors, autograd
buffers). ``train`` is one forward + backward (``torch.autograd.grad``); a measurement is
``lanczos(HessianOperator(mode="fd"), k=1, max_iter=m, tol=0, return_vectors=True)`` (tol=0 runs all
``m`` iterations and the second pass: the worst case), with the default ``fd_restore="subtract"`` (no
parameter copy) and, float32, ``"copy"``. Reported: peak / parameter bytes, and the excess of the
measurement's peak over the training step's (what the measurement adds).

Cost: fwd+bwd, one fd product (base gradient cached; ``subtract`` and ``copy`` restore) and one exact
product (first-gradient graph reused) on a unit vector are timed interleaved in this process,
``--repeats`` rounds; medians and minima, and their ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.curvature.memtrack import LiveTensorBytes
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss


def build(quick: bool, dtype: torch.dtype):
    cfg = (
        TorchGPTConfig(vocab_size=64, seq_length=16, hidden_size=32, num_layers=2, num_heads=4)
        if quick
        else TorchGPTConfig(vocab_size=256, seq_length=64, hidden_size=128, num_layers=4, num_heads=4)
    )
    model = TorchGPT(cfg)
    model.init_weights(0)
    model = model.to(dtype)
    tok = torch.randint(
        0, cfg.vocab_size, (4, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0)
    )
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def loss_fn(m, b):
    return torch_gpt_loss(m, b).float()


def memory(quick: bool, dtype: torch.dtype, iters: list[int]) -> dict:
    model, batch = build(quick, dtype)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with LiveTensorBytes() as mem:
        g = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
        del g
    train = mem.peak
    out = {"dtype": str(dtype).removeprefix("torch."), "params": sum(p.numel() for p in model.parameters())}
    out["param_bytes"], out["train_peak_x"] = pbytes, train / pbytes
    for restore in ("subtract", "copy") if dtype == torch.float32 else ("subtract",):
        for m in iters:
            op = HessianOperator(model, loss_fn, batch, mode="fd", fd_restore=restore)
            with LiveTensorBytes() as mem:
                r = lanczos(op, k=1, max_iter=m, tol=0.0, seed=0, return_vectors=True)
                op.release()
                del r
            out[f"{restore}: measure_peak_x@{m}"] = mem.peak / pbytes
            out[f"{restore}: extra_over_train_x@{m}"] = (mem.peak - train) / pbytes
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
    t: dict[str, list[float]] = {"fwd+bwd": [], "fd": [], "fd copy": [], "exact": []}
    for _ in range(repeats):
        for name, fn in (
            ("fwd+bwd", lambda: torch.autograd.grad(loss_fn(model, batch), params)),
            ("fd", lambda: fd.matvec(v)),
            ("fd copy", lambda: fdc.matvec(v)),
            ("exact", lambda: ex.matvec(v)),
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
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-iter", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {
        "load": os.getloadavg(),
        "memory": [memory(a.quick, d, a.max_iter) for d in (torch.float32, torch.bfloat16)],
        "cost": cost(a.quick, a.repeats),
    }
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
