"""Point-to-point tensors between adjacent pipeline stages, for :class:`~lrscale_megatron.parallel.ParallelContext`
(its ``send_next`` / ``recv_prev`` / ... are the only callers; ranks and the device come from the context).

A tensor of any shape and dtype travels as a fixed-size header (dtype, ndim, dims) and then the data,
both on the context's device (NCCL rejects CPU tensors).
"""

from __future__ import annotations

import torch

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def default_device() -> torch.device:
    """The current CUDA device when the default process group uses NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def send_tensor(t: torch.Tensor, dst: int | None, device: torch.device) -> None:
    """Send a tensor of any shape/dtype: a fixed-size header (dtype, ndim, dims) then the data."""
    import torch.distributed as dist

    if dst is None:
        raise RuntimeError("no pipeline neighbour to send to (this is the first/last stage)")
    t = t.detach().to(device).contiguous()
    if t.ndim > 8:
        raise ValueError(f"pipeline activation has {t.ndim} dims; at most 8 are supported")
    dims = [_DTYPES.index(t.dtype), t.ndim, *t.shape] + [-1] * (8 - t.ndim)
    header = torch.tensor(dims, dtype=torch.int64, device=device)
    dist.send(header, dst)
    dist.send(t, dst)


def recv_tensor(src: int | None, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    if src is None:
        raise RuntimeError("no pipeline neighbour to receive from (this is the first/last stage)")
    header = torch.empty((10,), dtype=torch.int64, device=device)
    dist.recv(header, src)
    h = header.tolist()
    dtype = _DTYPES[int(h[0])]
    shape = tuple(int(x) for x in h[2 : 2 + int(h[1])])
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src)
    return out
