"""ParallelContext: the one place that learns the tensor/pipeline/data-parallel layout.

Everything else in lrscale-megatron receives a :class:`ParallelContext` explicitly. It is built from
megatron-core ``parallel_state`` (:meth:`ParallelContext.from_megatron`), a DeepSpeed engine or mpu
(:meth:`ParallelContext.from_deepspeed`), a plain DDP process group (:meth:`ParallelContext.from_ddp`),
or is single-process (:meth:`ParallelContext.single`).

What it provides:

* the sizes and ranks of the TP, PP and DP groups, validated (``tp * pp * dp == world_size``);
* :meth:`param_specs`: which parameters are TP-sharded (and along which dim), which copies a rank
  owns for inner products (TP-replicated parameters on tp_rank 0 only; the last pipeline stage's copy
  of a tied embedding never), and a global, layout-independent name per parameter;
* the reductions: one all-reduce over the model-parallel (TP x PP) group for inner products, the
  data-parallel mean for Hessian-vector products (the same averaging DDP applies to gradients), and
  the sum over the embedding group for tied embeddings split over pipeline stages;
* point-to-point helpers between adjacent pipeline stages;
* :attr:`device`: where every tensor handed to ``torch.distributed`` lives (the current CUDA device
  under NCCL, the CPU under gloo). Every collective in the package goes through a method of this class,
  which moves its tensors there (NCCL rejects CPU tensors);
* :meth:`autodiff_patch`: the context manager that makes the model's layers twice differentiable for
  exact Hessian-vector products (megatron-core TP layers), so that the curvature core never imports a
  host-framework integration.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lrscale_megatron.curvature.backend import ParamSpec, VectorBackend
from lrscale_megatron.megatron_state import layer_offset, megatron_initialized
from lrscale_megatron.p2p import default_device as _default_device
from lrscale_megatron.p2p import recv_tensor as _recv
from lrscale_megatron.p2p import send_tensor as _send

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass
class ParallelContext:
    """Sizes, ranks and process groups of a (possibly) model-parallel job.

    Attributes:
        tp_size, tp_rank: tensor-parallel group size and this rank's index in it.
        pp_size, pp_rank: pipeline-parallel group size and this rank's stage.
        dp_size, dp_rank: data-parallel group size and this rank's index in it.
        tp_group, pp_group, dp_group, mp_group: ``torch.distributed`` groups (``None`` when the size is
            1 or the job is single-process). ``mp_group`` is the model-parallel (TP x PP) group.
        embedding_group: group of the first and last pipeline stage that share a tied embedding.
        pp_prev_rank, pp_next_rank: global ranks of the adjacent pipeline stages.
        layer_offset: global index of this stage's first transformer layer (for global names).
        world_size: total processes.
        device: device of every tensor handed to ``torch.distributed`` (default: the current CUDA
            device when the default process group uses NCCL, else the CPU).
        double_backward_patch: ``() -> context manager`` making the model's tensor-parallel layers
            twice differentiable (set by :meth:`from_megatron`); see :meth:`autodiff_patch`.
    """

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None
    embedding_group: Any = None
    pp_prev_rank: int | None = None
    pp_next_rank: int | None = None
    layer_offset: int = 0
    world_size: int = 1
    source: str = "single"
    device: torch.device = field(default_factory=lambda: _default_device())
    double_backward_patch: Callable[[], contextlib.AbstractContextManager] | None = None
    _specs_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("tp_size", "pp_size", "dp_size", "world_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelContext.{name}={v!r} must be a positive integer")
        if self.tp_size * self.pp_size * self.dp_size != self.world_size:
            raise ValueError(
                f"tp({self.tp_size}) * pp({self.pp_size}) * dp({self.dp_size}) = "
                f"{self.tp_size * self.pp_size * self.dp_size} != world_size({self.world_size}); "
                "choose sizes whose product is the number of processes"
            )
        for r, s, name in (
            (self.tp_rank, self.tp_size, "tp"),
            (self.pp_rank, self.pp_size, "pp"),
            (self.dp_rank, self.dp_size, "dp"),
        ):
            if not 0 <= r < s:
                raise ValueError(f"ParallelContext.{name}_rank={r} is outside [0, {name}_size={s})")
        self.device = torch.device(self.device)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls) -> ParallelContext:
        """One process, nothing sharded."""
        return cls()

    @classmethod
    def from_megatron(cls, model: torch.nn.Module | None = None) -> ParallelContext:
        """From megatron-core ``parallel_state`` (``initialize_model_parallel`` must have run).

        ``model`` (this stage's module) is used to find the global index of its first layer.
        """
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "megatron parallel_state is not initialised: call "
                "megatron.core.parallel_state.initialize_model_parallel(...) before "
                "ParallelContext.from_megatron()"
            )
        import torch.distributed as dist

        from lrscale_megatron.integrations import megatron_tp

        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        dp = ps.get_data_parallel_world_size()
        emb = None
        if pp > 1 and ps.is_rank_in_embedding_group(ignore_virtual=True):
            emb = ps.get_embedding_group()
        return cls(
            tp_size=tp,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=pp,
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            dp_size=dp,
            dp_rank=ps.get_data_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group() if tp > 1 else None,
            pp_group=ps.get_pipeline_model_parallel_group() if pp > 1 else None,
            dp_group=ps.get_data_parallel_group() if dp > 1 else None,
            mp_group=ps.get_model_parallel_group() if tp * pp > 1 else None,
            embedding_group=emb,
            pp_prev_rank=ps.get_pipeline_model_parallel_prev_rank() if pp > 1 else None,
            pp_next_rank=ps.get_pipeline_model_parallel_next_rank() if pp > 1 else None,
            layer_offset=layer_offset(model) if model is not None else 0,
            world_size=dist.get_world_size(),
            source="megatron",
            double_backward_patch=megatron_tp.twice_differentiable_tp,
        )

    @classmethod
    def from_deepspeed(cls, engine_or_mpu: Any, model: torch.nn.Module | None = None) -> ParallelContext:
        """From a DeepSpeed engine (``engine.mpu`` when model-parallel, else its DP group) or an mpu.

        Under ZeRO stage 3 parameters are partitioned across ranks; Hessian-vector products need whole
        parameters, so that stage is refused here with the reason and the alternative.
        """
        import torch.distributed as dist

        engine = engine_or_mpu if hasattr(engine_or_mpu, "zero_optimization_stage") else None
        if engine is not None and engine.zero_optimization_stage() >= 3:
            raise ValueError(
                "DeepSpeed ZeRO stage 3 partitions parameters across data-parallel ranks, so a "
                "Hessian-vector product would see only shards of unknown layout: "
                "zero_optimization.stage=3 is not supported for curvature estimates; use stage 0, 1 or 2 "
                "(or measure on a ZeRO<=2 proxy run)"
            )
        mpu = engine.mpu if engine is not None else engine_or_mpu
        if mpu is None:
            group = engine.data_parallel_group if engine is not None else None
            return cls.from_ddp(group)
        if hasattr(mpu, "get_tensor_model_parallel_world_size") and megatron_initialized():
            ctx = cls.from_megatron(model)
            ctx.source = "deepspeed+megatron"
            return ctx
        tp = mpu.get_model_parallel_world_size()
        tp_rank = mpu.get_model_parallel_rank()
        dp = mpu.get_data_parallel_world_size()
        pp = dist.get_world_size() // (tp * dp)
        if pp != 1:
            raise ValueError(
                f"DeepSpeed mpu reports tp={tp}, dp={dp} for world_size={dist.get_world_size()}; "
                "pipeline parallelism through a bare mpu is not supported: build the context with "
                "ParallelContext.from_megatron() instead"
            )
        return cls(
            tp_size=tp,
            tp_rank=tp_rank,
            dp_size=dp,
            dp_rank=mpu.get_data_parallel_rank(),
            tp_group=mpu.get_model_parallel_group() if tp > 1 else None,
            mp_group=mpu.get_model_parallel_group() if tp > 1 else None,
            dp_group=mpu.get_data_parallel_group() if dp > 1 else None,
            world_size=dist.get_world_size(),
            source="deepspeed",
        )

    @classmethod
    def from_ddp(cls, group: Any = None) -> ParallelContext:
        """Pure data parallelism over ``group`` (default: the whole world)."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            return cls.single()
        size = dist.get_world_size(group)
        return (
            cls(
                dp_size=size,
                dp_rank=dist.get_rank(group),
                dp_group=group if group is not None else dist.group.WORLD,
                world_size=size,
                source="ddp",
            )
            if size > 1
            else cls.single()
        )

    # ------------------------------------------------------------------ layout queries
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def model_parallel(self) -> bool:
        return self.tp_size * self.pp_size > 1

    def global_name(self, name: str, param: torch.Tensor | None = None) -> str:
        """Layout-independent name: stage-local layer indices made global; the last stage's copy of a
        tied embedding named after the word embedding it mirrors."""
        if (
            param is not None
            and getattr(param, "shared", False)
            and getattr(param, "shared_embedding", False)
        ):
            return "embedding.word_embeddings.weight"
        if self.layer_offset:
            return _LAYER_RE.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + self.layer_offset}.", name)
        return name

    def param_specs(self, named_params: Sequence[tuple[str, torch.Tensor]]) -> list[ParamSpec]:
        """One :class:`ParamSpec` per parameter (see module docstring for the ownership rule)."""
        specs = []
        for name, p in named_params:
            sharded = bool(getattr(p, "tensor_model_parallel", False)) and self.tp_size > 1
            if sharded and getattr(p, "partition_stride", 1) != 1:
                raise ValueError(
                    f"parameter {name!r} has partition_stride={getattr(p, 'partition_stride', None)}; strided TP "
                    "partitions are not supported by the curvature backend"
                )
            is_tied_copy = bool(getattr(p, "shared", False)) and self.pp_size > 1 and not self.is_first_stage
            owned = (sharded or self.tp_rank == 0) and not is_tied_copy
            specs.append(
                ParamSpec(
                    name=self.global_name(name, p),
                    shape=tuple(p.shape),
                    owned=owned,
                    partition_dim=int(getattr(p, "partition_dim", 0)) if sharded else None,
                    tp_size=self.tp_size if sharded else 1,
                    tp_rank=self.tp_rank if sharded else 0,
                )
            )
        return specs

    def tied_embedding_indices(self, named_params: Sequence[tuple[str, torch.Tensor]]) -> list[int]:
        """Indices of parameters that are one half of an embedding tied across pipeline stages."""
        if self.pp_size == 1 or self.embedding_group is None:
            return []
        return [i for i, (_, p) in enumerate(named_params) if getattr(p, "shared_embedding", False)]

    def backend(
        self,
        named_params: Sequence[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> VectorBackend:
        """A :class:`VectorBackend` whose inner products reduce over this context's model-parallel group
        (and whose ``agree`` reduces over every rank, so that all choose the same Lanczos basis mode)."""
        be = VectorBackend(
            self.param_specs(named_params),
            dtype=dtype,
            device=device,
            all_reduce=self.all_reduce_model_parallel if self.model_parallel else None,
        )
        be.agree = self.all_reduce_every_rank
        return be

    # ------------------------------------------------------------------ autodiff
    def autodiff_patch(
        self, model: torch.nn.Module
    ) -> Callable[[], contextlib.AbstractContextManager] | None:
        """The context manager factory that makes ``model`` twice differentiable, or ``None`` when it
        needs none. Megatron-core tensor-parallel layers need one (their autograd Functions communicate
        outside autograd): :attr:`double_backward_patch` when set, else the megatron-core patch."""
        from lrscale_megatron.integrations import megatron_tp

        if not megatron_tp.model_has_megatron_tp_layers(model):
            return None
        return self.double_backward_patch or megatron_tp.twice_differentiable_tp

    # ------------------------------------------------------------------ collectives
    def _on_device(self, t: torch.Tensor, group: Any, op: str = "all_reduce") -> None:
        """In-place ``op`` of ``t`` over ``group`` on :attr:`device` (copied there and back if needed)."""
        import torch.distributed as dist

        x = t if t.device == self.device else t.to(self.device)
        getattr(dist, op)(x, group=group)
        if x is not t:
            t.copy_(x)

    def all_reduce_model_parallel(self, t: torch.Tensor) -> None:
        """In-place sum over the model-parallel (TP x PP) group: the one reduction of inner products."""
        if self.mp_group is not None:
            self._on_device(t, self.mp_group)

    def all_reduce_every_rank(self, t: torch.Tensor) -> None:
        """In-place sum over every rank of the job (model-parallel group, then data-parallel group)."""
        self.all_reduce_model_parallel(t)
        if self.dp_group is not None:
            self._on_device(t, self.dp_group)

    def average_data_parallel(self, tensors: list[torch.Tensor]) -> None:
        """In-place mean over data-parallel replicas, one coalesced all-reduce per dtype (as DDP averages
        gradients), in the tensors' own dtype: no float64 model-sized buffer."""
        if self.dp_group is None or self.dp_size == 1 or not tensors:
            return
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1).to(self.device) for t in group])
            self._on_device(flat, self.dp_group)
            flat /= self.dp_size
            off = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[off : off + n].view_as(t))
                off += n
            del flat

    def sum_tied_embeddings(self, tensors: list[torch.Tensor], indices: Sequence[int]) -> None:
        """In-place sum over the embedding group of the tensors at ``indices`` (tied embedding halves)."""
        if not indices or self.embedding_group is None:
            return
        for i in indices:
            self._on_device(tensors[i], self.embedding_group)

    def reduce_loss(self, loss: float) -> float:
        """The job's loss from a per-rank value: taken from the last pipeline stage, averaged over DP."""
        if not self.model_parallel and self.dp_size == 1:
            return loss
        t = torch.tensor([loss if self.is_last_stage else 0.0], dtype=torch.float64, device=self.device)
        if self.pp_group is not None:
            self._on_device(t, self.pp_group)
        if self.dp_group is not None:
            self._on_device(t, self.dp_group)
            t /= self.dp_size
        return float(t.item())

    # ------------------------------------------------------------------ pipeline p2p
    def send_next(self, t: torch.Tensor) -> None:
        _send(t, self.pp_next_rank, self.device)

    def recv_prev(self) -> torch.Tensor:
        return _recv(self.pp_prev_rank, self.device)

    def send_prev(self, t: torch.Tensor) -> None:
        _send(t, self.pp_prev_rank, self.device)

    def recv_next(self) -> torch.Tensor:
        return _recv(self.pp_next_rank, self.device)

    def describe(self) -> str:
        return (
            f"tp={self.tp_size} pp={self.pp_size} dp={self.dp_size} "
            f"(rank tp{self.tp_rank}/pp{self.pp_rank}/dp{self.dp_rank}, from {self.source})"
        )


def resolve_context(model: torch.nn.Module | None = None) -> ParallelContext:
    """The context of the running job: megatron ``parallel_state`` when it is initialised, else data
    parallelism over the whole world when ``torch.distributed`` is, else a single process."""
    if megatron_initialized():
        return ParallelContext.from_megatron(model)
    return ParallelContext.from_ddp()
