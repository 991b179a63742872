"""Process-group start-up and teardown for the runnable jobs (torchrun, the DeepSpeed launcher, or one
plain process), and megatron's model-parallel initialisation on top of it.

Group *discovery* lives in :mod:`lrscale_megatron.parallel`; this module only creates the groups.
"""

from __future__ import annotations

import gc
import logging
import os
import socket

import torch

from lrscale_megatron.parallel import ParallelContext

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_ENV_SET: dict[str, str] = {}
"""Environment variables :func:`init_process_group` set itself (removed again by :func:`shutdown`)."""


def init_process_group(backend: str | None = None) -> None:
    """``torch.distributed.init_process_group`` from torchrun/DeepSpeed env vars, or a 1-process group."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # a one-process group: remember what we set, so shutdown() leaves the environment as it was
        # (a child process started later must not inherit a port this process still listens on)
        mine = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        mine = {k: v for k, v in mine.items() if k not in os.environ}
        mine.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        _ENV_SET.update(mine)
        os.environ.update(mine)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 0, backend: str | None = None) -> ParallelContext:
    """Start the process group, megatron's ``parallel_state`` (tp x pp, dp = the rest), and on a
    machine without CUDA the megatron CPU shims. Returns the :class:`ParallelContext` (layer offset is
    filled in later from the built model)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    init_process_group(backend)
    world = dist.get_world_size()
    if world % (tp * pp) != 0:
        raise ValueError(
            f"tp({tp}) * pp({pp}) = {tp * pp} does not divide world_size({world}); "
            "launch a multiple of tp*pp processes"
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if not torch.cuda.is_available():
        from lrscale_megatron.integrations import megatron_cpu

        megatron_cpu.enable(seed)
    return ParallelContext.from_megatron()


def shutdown() -> None:
    """Clean teardown (a gloo thread aborts ~3 runs in 10 at exit without it; FINDINGS.md)."""
    import torch.distributed as dist

    gc.collect()
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    except ImportError:
        pass
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if not torch.cuda.is_available():
        from lrscale_megatron.integrations import megatron_cpu

        megatron_cpu.disable()  # init_megatron installed them; restore torch.cuda for whatever runs next
    for k, v in list(_ENV_SET.items()):
        if os.environ.get(k) == v:
            del os.environ[k]
    _ENV_SET.clear()
