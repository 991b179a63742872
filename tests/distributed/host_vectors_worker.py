"""Worker for test_host_vectors_dp.py.

Default (``--layout dp``): fd lambda_max of a bf16 MLP under DP=2 (gloo), with the solver's vectors on the
device and in host memory, at the whole local batch and in 2 parts; records the device of every tensor
handed to torch.distributed.

``--layout megatron --tp T --pp P``: a tiny bf16 megatron GPT under TP x PP (or one process, the unsharded
reference): the fd product H v on a fixed vector and a short Lanczos run, with device and host vectors at
``batch_split`` 1 and 2 (one micro-batch given: split 1 takes the host path's single micro-batch branch,
split 2 its micro-batch loop through the pipeline), keyed by global parameter name.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.parallel import ParallelContext

SETTINGS = [(vectors, split) for vectors in ("device", "host") for split in (1, 2)]


def record_devices(devices: list[str]) -> None:
    """Record the device of every tensor handed to dist.all_reduce / send / recv / broadcast."""
    for name in ("all_reduce", "send", "recv", "broadcast"):
        real = getattr(dist, name)

        def recording(t, *args, _real=real, **kwargs):
            devices.append(str(t.device))
            return _real(t, *args, **kwargs)

        setattr(dist, name, recording)


def data_parallel(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g).to(torch.bfloat16), torch.randint(0, 4, (64,), generator=g)
    part = slice(rank * 64 // world, (rank + 1) * 64 // world)
    batch = (x[part], y[part])

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1]).float()

    devices: list[str] = []
    record_devices(devices)
    ctx = ParallelContext.from_ddp()
    out = {"rank": rank, "ctx_device": str(ctx.device)}
    for vectors, split in SETTINGS:
        op = HessianOperator(
            model, loss_fn, batch, mode="fd", parallel=ctx, vectors=vectors, batch_split=split
        )
        r = lanczos(op, k=1, max_iter=60, tol=1e-3, seed=0)
        out[f"{vectors},{split}"] = (r.eigenvalues[0], bool(r.converged), r.n_matvec)
    out["devices"] = sorted(set(devices))
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def megatron(out_dir: str, tp: int, pp: int) -> None:
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.megatron_state import layer_offset
    from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
    from lrscale_megatron.models.text import byte_batch

    ctx = init_megatron(tp, pp, seed=0)
    preset = get_preset("tiny")
    model = build_gpt(preset, ctx, dtype=torch.bfloat16, seed=0)
    ctx.layer_offset = layer_offset(model)
    batch = byte_batch(4, preset.seq_length, seed=0)  # one micro-batch (DP=1 in every layout run here)
    devices: list[str] = []
    record_devices(devices)
    out: dict = {"ctx": (ctx.tp_rank, ctx.pp_rank, ctx.dp_rank), "ctx_device": str(ctx.device), "shards": {}}
    for vectors, split in SETTINGS:
        key = f"{vectors},{split}"
        op = HessianOperator(
            model, gpt_loss_fn, batch, mode="fd", parallel=ctx, vectors=vectors, batch_split=split
        )
        v = op.backend.randn(123)
        if vectors == "host":
            v = [t.to("cpu", copy=True) for t in v]
        hv = op.matvec(v)
        for spec, t in zip(op.backend.specs, hv):
            d = out["shards"].setdefault(
                spec.name, {"partition_dim": spec.partition_dim, "tp_rank": spec.tp_rank}
            )
            d[key] = t.detach().to("cpu", torch.float64, copy=True)
        r = lanczos(op, k=1, max_iter=4, tol=0.0, seed=0)
        out[key] = (r.eigenvalues[0], list(r.history))
    out["devices"] = sorted(set(devices))
    torch.save(out, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layout", choices=("dp", "megatron"), default="dp")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.layout == "dp":
        data_parallel(a.out)
    else:
        megatron(a.out, a.tp, a.pp)


if __name__ == "__main__":
    main()
