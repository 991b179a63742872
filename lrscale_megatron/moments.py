"""Adam's bias-corrected second moment ``v̂`` for each model parameter, wherever the optimizer keeps it.

The Adam-preconditioned Hessian ``P^-1/2 H P^-1/2`` (``P = sqrt(v̂) + eps``, Cohen et al. 2022) needs
``v̂`` laid out like the model's parameters. Training frameworks keep it elsewhere:

* torch ``Adam`` / ``AdamW`` (and DeepSpeed's ``FusedAdam`` / ``DeepSpeedCPUAdam``, apex/TE fused Adam):
  per parameter, ``state[p]["exp_avg_sq"]``; the step count in the state or in the param group;
* DeepSpeed ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: fp32 flat partitions, one per
  param group and data-parallel rank. DeepSpeed links each model parameter to its fragment of the local
  partition (``param._hp_mapping``: where in the parameter, where in the partition); each rank copies
  its fragments into a zero buffer laid out like the parameters and one all-reduce (sum) over the
  partition's data-parallel group gives every rank every parameter's ``v̂`` (the fragments are disjoint);
* DeepSpeed ``FP16_Optimizer`` (bf16/fp16 without ZeRO): one fp32 flat copy per group, the parameters in
  order; ``FP16_UnfusedOptimizer``: one fp32 copy per parameter;
* megatron-core ``DistributedOptimizer``: fp32 main-param shards; ``_get_model_param_range_map(p)
  ["param"]`` is the range of the flattened parameter this data-parallel rank owns and
  ``model_param_group_index_map[p]`` where its main shard sits in the inner optimizer; the same
  buffer + all-reduce over ``data_parallel_group``. ``Float16OptimizerWithFloat16Params``: the fp32 main
  copies, parameter for parameter.

Every reader returns fp32 tensors shaped like the parameters (``v̂ = exp_avg_sq / (1 - beta2^step)``,
``max_exp_avg_sq`` under ``amsgrad``) and Adam's ``eps``; it raises :class:`MomentsUnavailable` naming the
optimizer and the fix when it cannot (no Adam, no step taken yet, ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

SECOND_MOMENT = "exp_avg_sq"


class MomentsUnavailable(ValueError):
    """The optimizer does not hold a usable Adam second moment for the parameters; says why and the fix."""


def second_moments(optimizer: Any, params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """``(v̂ per parameter, in params' order, fp32; Adam's eps)`` from ``optimizer``.

    ``optimizer`` is a torch optimizer, a DeepSpeed engine or its optimizer wrapper, or a megatron-core
    optimizer. Collective under DeepSpeed ZeRO-1/2 / ``BF16_Optimizer`` and megatron's distributed
    optimizer: every data-parallel rank must call it together.
    """
    params = list(params)
    opt = getattr(optimizer, "optimizer", None) if _is_deepspeed_engine(optimizer) else optimizer
    if opt is None:
        raise MomentsUnavailable("the DeepSpeed engine has no optimizer: pass one in its config")
    if any(hasattr(p, "ds_id") for p in params):
        raise MomentsUnavailable(
            "ZeRO stage 3 partitions the parameters themselves; the curvature core needs whole parameters. "
            "Fix: use ZeRO stage 0, 1 or 2 with online adaptation"
        )
    if any(hasattr(p, "_hp_mapping") for p in params):
        return _deepspeed_linked(opt, params)
    name = type(opt).__name__
    if hasattr(opt, "chained_optimizers"):  # megatron ChainedOptimizer (what get_megatron_optimizer returns)
        return _chained(opt, params)
    if hasattr(opt, "model_param_group_index_map") and hasattr(opt, "_get_model_param_range_map"):
        vs, eps, covered = _megatron_distributed([opt], params)
        if not all(covered):
            raise MomentsUnavailable(f"{sum(not c for c in covered)} parameters are not trained by {name}")
        return vs, eps
    if hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups"):
        return _flat_copies(opt, params, opt.fp16_groups, opt.fp32_groups_flat)
    if hasattr(opt, "fp32_from_float16_groups") and hasattr(opt, "float16_groups"):
        return _main_copies(opt, params, opt.float16_groups, opt.fp32_from_float16_groups)
    if hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
        return _main_copies(opt, params, opt.fp16_groups, opt.fp32_groups)
    if name in ("BF16_Optimizer", "DeepSpeedZeroOptimizer"):
        raise MomentsUnavailable(
            f"{name} has not linked the model parameters to its flat partitions (no _hp_mapping): "
            "measure after deepspeed.initialize returned"
        )
    inner = getattr(opt, "optimizer", None)
    if not hasattr(opt, "state") and inner is not None:  # megatron FP32Optimizer and other thin wrappers
        opt = inner
    return _torch_adam(opt, params)


# ----------------------------------------------------------------------------------------- helpers
def _is_deepspeed_engine(obj: Any) -> bool:
    return hasattr(obj, "zero_optimization_stage") and hasattr(obj, "module")


def _adam_group(opt: Any, group: dict[str, Any]) -> tuple[float, bool]:
    """``(beta2, bias_correction)`` of an Adam-type param group, or refuse."""
    if "betas" not in group:
        raise MomentsUnavailable(
            f"optimizer {type(opt).__name__} has no 'betas': only Adam-type optimizers keep the second moment "
            "needed for preconditioning. Fix: use Adam/AdamW, or online.precondition=false with "
            "online.rule='inverse'"
        )
    return float(group["betas"][1]), bool(group.get("bias_correction", True))


def _corrected(opt: Any, hp: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """``v̂`` of the optimizer-side tensor ``hp`` (fp32, bias-corrected), or refuse."""
    beta2, bias_correction = _adam_group(opt, group)
    st = opt.state.get(hp, {}) if hasattr(opt, "state") else {}
    key = "max_exp_avg_sq" if group.get("amsgrad") and "max_exp_avg_sq" in st else SECOND_MOMENT
    if key not in st:
        raise MomentsUnavailable(
            f"optimizer {type(opt).__name__} has no {SECOND_MOMENT} yet: take at least one optimizer step "
            "before measuring the preconditioned spectrum"
        )
    step = float(st["step"]) if "step" in st else float(group.get("step", 0))
    if step <= 0:
        raise MomentsUnavailable(
            f"optimizer {type(opt).__name__} reports step={step}: take at least one optimizer step first"
        )
    v = st[key].detach().to(torch.float32)
    return v / (1.0 - beta2**step) if bias_correction else v.clone()


def _eps(groups: Sequence[dict[str, Any]]) -> float:
    eps = {float(g.get("eps", 1e-8)) for g in groups}
    if len(eps) > 1:
        raise MomentsUnavailable(
            f"param groups use different Adam eps {sorted(eps)}; preconditioning needs one. Fix: use one eps"
        )
    return eps.pop() if eps else 1e-8


def _torch_adam(opt: Any, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    if not hasattr(opt, "param_groups") or not hasattr(opt, "state"):
        raise MomentsUnavailable(f"{type(opt).__name__} is not an optimizer with param_groups and state")
    where = {id(q): g for g in opt.param_groups for q in g["params"]}
    out, groups = [], []
    for p in params:
        g = where.get(id(p))
        if g is None:
            raise MomentsUnavailable(
                f"a parameter of shape {tuple(p.shape)} is not in {type(opt).__name__}.param_groups: "
                "pass the optimizer that trains the measured model"
            )
        out.append(_corrected(opt, p, g).reshape(p.shape))
        groups.append(g)
    return out, _eps(groups)


def _all_reduce(buf: torch.Tensor, group: Any) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1:
        dist.all_reduce(buf, group=group)


def _offsets(params: list[torch.Tensor]) -> list[int]:
    out, n = [], 0
    for p in params:
        out.append(n)
        n += p.numel()
    return out + [n]


def _split(buf: torch.Tensor, params: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    return [buf[offsets[i] : offsets[i + 1]].view(p.shape) for i, p in enumerate(params)]


def _deepspeed_linked(wrapper: Any, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """ZeRO-1/2 and ``BF16_Optimizer``: fragments of the fp32 flat partitions, one all-reduce per DP group."""
    # the DeepSpeed wrapper, or the torch optimizer inside it (what a DeepSpeed scheduler is given)
    inner = getattr(wrapper, "optimizer", None)
    if inner is None or not hasattr(inner, "param_groups"):
        inner = wrapper
    if not hasattr(inner, "param_groups") or not hasattr(inner, "state"):
        raise MomentsUnavailable(f"{type(wrapper).__name__} has no inner torch optimizer")
    offsets = _offsets(params)
    device = params[
        0
    ].device  # the model's device: the DP group's device under NCCL (offload keeps CPU state)
    buf = torch.zeros(offsets[-1], dtype=torch.float32, device=device)
    groups: dict[int, Any] = {}
    used_groups = set()
    partitions: dict[int, torch.Tensor] = {}
    for i, p in enumerate(params):
        mapping = getattr(p, "_hp_mapping", None)
        dp_group = getattr(p, "_dp_group", None)
        groups[id(dp_group)] = dp_group
        if mapping is None:  # this rank owns no fragment of p
            continue
        gi = int(mapping.param_group_index)
        used_groups.add(gi)
        group = inner.param_groups[gi]
        hp = group["params"][0]
        # the fragment's slice of the flat partition's state (DeepSpeed links optim_fragment lazily)
        if gi not in partitions:
            partitions[gi] = _corrected(inner, hp, group).reshape(-1)
        v = partitions[gi]
        ha = mapping.hp_fragment_address
        frag = v.narrow(0, int(ha.start), int(ha.numel)).to(device)
        lp = mapping.lp_fragment_address
        start = offsets[i] + int(lp.start)
        buf[start : start + int(lp.numel)].copy_(frag)
    if len(groups) > 1:
        raise MomentsUnavailable(
            "parameters are partitioned over different data-parallel groups (expert parallelism): not "
            "supported. Fix: no MoE layers with online adaptation"
        )
    _all_reduce(buf, next(iter(groups.values())))
    eps = _eps([inner.param_groups[g] for g in sorted(used_groups)] or inner.param_groups)
    return _split(buf, params, offsets), eps


def _flat_copies(
    opt: Any,
    params: list[torch.Tensor],
    lp_groups: Sequence[Sequence[torch.Tensor]],
    hp_flat: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], float]:
    """DeepSpeed ``FP16_Optimizer``: the fp32 flat copy of group i holds group i's parameters in order."""
    inner = opt.optimizer
    where: dict[int, torch.Tensor] = {}
    groups = []
    for gi, lps in enumerate(lp_groups):
        group = next(g for g in inner.param_groups if any(q is hp_flat[gi] for q in g["params"]))
        v = _corrected(inner, hp_flat[gi], group)
        groups.append(group)
        n = 0
        for p in lps:
            where[id(p)] = v[n : n + p.numel()].view(p.shape)
            n += p.numel()
    return [_lookup(where, p, opt) for p in params], _eps(groups)


def _lookup(where: dict[int, torch.Tensor], p: torch.Tensor, opt: Any) -> torch.Tensor:
    v = where.get(id(p))
    if v is None:
        raise MomentsUnavailable(
            f"a parameter of shape {tuple(p.shape)} is not trained by {type(opt).__name__}: pass the "
            "optimizer of the measured model"
        )
    return v


def _main_copies(
    opt: Any,
    params: list[torch.Tensor],
    lp_groups: Sequence[Sequence[torch.Tensor]],
    hp_groups: Sequence[Sequence[torch.Tensor]],
) -> tuple[list[torch.Tensor], float]:
    """One fp32 main copy per bf16/fp16 parameter: megatron ``Float16OptimizerWithFloat16Params``,
    DeepSpeed ``FP16_UnfusedOptimizer``."""
    inner = opt.optimizer
    main_of: dict[int, torch.Tensor] = {}
    for lp_group, hp_group in zip(lp_groups, hp_groups):
        for lp, hp in zip(lp_group, hp_group):
            main_of[id(lp)] = hp
    where = {id(q): g for g in inner.param_groups for q in g["params"]}
    out, groups = [], []
    for p in params:
        hp = main_of.get(id(p), p)  # fp32 parameters are their own main params
        g = where.get(id(hp))
        if g is None:
            raise MomentsUnavailable(
                f"a parameter of shape {tuple(p.shape)} has no main param in the optimizer"
            )
        out.append(_corrected(inner, hp, g).reshape(p.shape))
        groups.append(g)
    return out, _eps(groups)


def _covers(opt: Any, p: torch.Tensor) -> bool:
    groups = getattr(opt, "float16_groups", None) or getattr(opt, "param_groups", [])
    flat = (q for g in groups for q in (g["params"] if isinstance(g, dict) else g))
    return any(q is p for q in flat)


def _chained(opt: Any, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """megatron ``ChainedOptimizer``: its distributed sub-optimizers fill one shared buffer (one
    all-reduce); the others give their parameters directly."""
    subs = list(opt.chained_optimizers)
    distributed = [s for s in subs if hasattr(s, "model_param_group_index_map")]
    out: list[torch.Tensor | None] = [None] * len(params)
    eps_seen: set[float] = set()
    if distributed:
        vs, eps, covered = _megatron_distributed(distributed, params)
        eps_seen.add(eps)
        for i, v in enumerate(vs):
            if covered[i]:
                out[i] = v
    for sub in subs:
        if sub in distributed:
            continue
        idx = [i for i, p in enumerate(params) if out[i] is None and _covers(sub, p)]
        if idx:
            vs, eps = second_moments(sub, [params[i] for i in idx])
            eps_seen.add(eps)
            for i, v in zip(idx, vs):
                out[i] = v
    missing = [tuple(params[i].shape) for i, v in enumerate(out) if v is None]
    if missing:
        raise MomentsUnavailable(f"parameters of shapes {missing[:3]} are in none of the chained optimizers")
    if len(eps_seen) > 1:
        raise MomentsUnavailable(f"chained optimizers use different eps {sorted(eps_seen)}. Fix: use one eps")
    return [v for v in out if v is not None], eps_seen.pop()


def _megatron_distributed(
    opts: Sequence[Any], params: list[torch.Tensor]
) -> tuple[list[torch.Tensor], float, list[bool]]:
    """megatron ``DistributedOptimizer`` (one or several sharing a data-parallel group): each rank copies
    its main-param shards' ``v̂`` into a buffer laid out like ``params`` (plus one coverage flag per
    parameter), one all-reduce over DP. Returns ``(v̂, eps, covered)``."""
    dp_groups = {id(o.data_parallel_group): o.data_parallel_group for o in opts}
    if len(dp_groups) > 1:
        raise MomentsUnavailable(
            "distributed optimizers over different data-parallel groups (expert parallelism): not "
            "supported. Fix: no MoE layers with online adaptation"
        )
    offsets = _offsets(params)
    n = offsets[-1]
    buf = torch.zeros(n + len(params), dtype=torch.float32, device=params[0].device)
    groups = []
    for opt in opts:
        inner = opt.optimizer
        for i, p in enumerate(params):
            if p not in opt.model_param_group_index_map:
                continue  # another data-parallel rank (or another optimizer) owns all of p
            gi, order = opt.model_param_group_index_map[p]
            group = inner.param_groups[gi]
            shard = opt._get_model_param_range_map(p)["param"]
            v = _corrected(inner, group["params"][order], group).reshape(-1)
            if v.numel() != shard.size:
                raise MomentsUnavailable(
                    f"megatron main shard has {v.numel()} elements, its range says {shard.size}: unsupported "
                    "distributed-optimizer layout (precision-aware optimizer?). Fix: online.precondition=false"
                )
            buf[offsets[i] + shard.start : offsets[i] + shard.end].copy_(v)
            buf[n + i] = 1.0
            groups.append(group)
    _all_reduce(buf, next(iter(dp_groups.values())))
    covered = (buf[n:] > 0).tolist()
    eps = _eps(groups or [g for o in opts for g in o.optimizer.param_groups])
    return _split(buf[:n], params, offsets), eps, covered
