"""Worker for test_host_vectors_dp.py: fd lambda_max of a bf16 MLP under DP=2 (gloo), with the solver's
vectors on the device and in host memory, at the whole local batch and in 2 parts; records the device of
every tensor handed to torch.distributed."""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.parallel import ParallelContext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g).to(torch.bfloat16), torch.randint(0, 4, (64,), generator=g)
    part = slice(rank * 64 // world, (rank + 1) * 64 // world)
    batch = (x[part], y[part])

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1]).float()

    devices: list[str] = []
    real = dist.all_reduce

    def recording(t, *args, **kwargs):
        devices.append(str(t.device))
        return real(t, *args, **kwargs)

    dist.all_reduce = recording  # type: ignore[assignment]
    ctx = ParallelContext.from_ddp()
    out = {"rank": rank, "ctx_device": str(ctx.device)}
    for vectors in ("device", "host"):
        for split in (1, 2):
            op = HessianOperator(
                model, loss_fn, batch, mode="fd", parallel=ctx, vectors=vectors, batch_split=split
            )
            r = lanczos(op, k=1, max_iter=60, tol=1e-3, seed=0)
            out[f"{vectors},{split}"] = (r.eigenvalues[0], bool(r.converged), r.n_matvec)
    dist.all_reduce = real  # type: ignore[assignment]
    out["devices"] = sorted(set(devices))
    torch.save(out, os.path.join(a.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
