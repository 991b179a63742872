"""Worker for test_model_parallel_hvp.py: one tiny float64 megatron GPT under a TP x PP x DP layout.

Writes, per rank, its shards of H v (exact; finite differences through autograd; finite differences
through megatron's pipeline schedule), lambda_max from Lanczos, and the loss, keyed by global name.
    torchrun --nproc_per_node N hvp_worker.py --tp T --pp P --out DIR [--no-patch]
"""

import argparse
import os

import torch

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.curvature.solve_scope import solve_scope
from lrscale_megatron.integrations.megatron_schedule import schedule_grad_fn
from lrscale_megatron.launch import init_megatron, shutdown
from lrscale_megatron.megatron_state import layer_offset
from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
from lrscale_megatron.models.text import byte_batch

ap = argparse.ArgumentParser()
ap.add_argument("--tp", type=int, default=1)
ap.add_argument("--pp", type=int, default=1)
ap.add_argument("--out", required=True)
ap.add_argument("--no-patch", action="store_true")
ap.add_argument("--micro-batches", type=int, default=2)
a = ap.parse_args()

ctx = init_megatron(a.tp, a.pp, seed=0)
preset = get_preset("tiny")
model = build_gpt(preset, ctx, dtype=torch.float64, seed=0)
ctx.layer_offset = layer_offset(model)
gb = 8
full = byte_batch(gb, preset.seq_length, seed=0)
per = gb // ctx.dp_size
mbs = per // a.micro_batches
rows = {k: v[ctx.dp_rank * per : (ctx.dp_rank + 1) * per] for k, v in full.items()}
micro = [{k: v[i * mbs : (i + 1) * mbs] for k, v in rows.items()} for i in range(a.micro_batches)]

# record the device of every tensor handed to torch.distributed on every curvature code path (isend/irecv
# are left alone: megatron's P2POp checks their identity; lrscale's own pipeline uses send/recv)
import torch.distributed as dist  # noqa: E402

devices: list[tuple[str, str]] = []
_COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "send",
    "recv",
    "all_gather",
    "reduce_scatter",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
)


def _recording(name, fn):
    def wrapped(*args, **kwargs):
        for x in list(args) + list(kwargs.values()):
            for t in x if isinstance(x, (list, tuple)) else [x]:
                if isinstance(t, torch.Tensor):
                    devices.append((name, str(t.device)))
        return fn(*args, **kwargs)

    return wrapped


for _n in _COLLECTIVES:
    if hasattr(dist, _n):
        setattr(dist, _n, _recording(_n, getattr(dist, _n)))

op = HessianOperator(model, gpt_loss_fn, micro, mode="exact", parallel=ctx, megatron_tp_patch=not a.no_patch)
v = op.backend.randn(123)
out = {"ctx": (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank), "shards": {}, "ctx_device": str(ctx.device)}
try:
    hv = op.matvec(v)
except ValueError as e:  # exact mode refuses a backward it cannot differentiate twice
    out["refused"] = str(e)
    hv = [torch.full_like(x, float("nan")) for x in v]
if "refused" not in out:
    vhv = op.backend.dot(v, hv)
    res = lanczos(op, k=1, max_iter=25, tol=1e-10, seed=0)
    out.update(
        lambda_max=res.eigenvalues[0], converged=res.converged, vHv=vhv, loss=ctx.reduce_loss(op.last_loss)
    )
fd = HessianOperator(model, gpt_loss_fn, micro, mode="fd", fd_scheme="central", parallel=ctx).matvec(v)
grad_fn = schedule_grad_fn(model, gpt_loss_fn, micro, seq_length=preset.seq_length, micro_batch_size=mbs)
sched = HessianOperator(
    model, gpt_loss_fn, micro, mode="fd", fd_scheme="central", parallel=ctx, grad_fn=grad_fn
).matvec(v)
# the same products with the fd anchor a host-basis solve lends (one copy per solve, restored by a copy)
anchored = HessianOperator(
    model, gpt_loss_fn, micro, mode="fd", fd_scheme="central", parallel=ctx, grad_fn=grad_fn
)
before = [p.detach().clone() for p in anchored.params]
with solve_scope():  # as inside a host-basis solve: theta0 + h v left in place between products (lazy)
    assert anchored.allow_anchor()
    anchored.matvec(v)
    sched_anchor = anchored.matvec(v)  # written over the first product's theta0 + h v, from theta0
anchored.drop_anchor()
assert all(torch.equal(p, b) for p, b in zip(anchored.params, before))  # theta0 back when the scope ended
for spec, h, f, s, sa in zip(op.backend.specs, hv, fd, sched, sched_anchor):
    out["shards"][spec.name] = {
        "exact": h,
        "fd": f,
        "sched": s,
        "sched_anchor": sa,
        "partition_dim": spec.partition_dim,
        "tp_rank": spec.tp_rank,
        "tp_size": spec.tp_size,
    }
out["devices"] = devices
torch.save(out, os.path.join(a.out, f"rank{dist.get_rank()}.pt"))
shutdown()
