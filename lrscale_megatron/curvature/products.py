"""The three Hessian-vector product modes of :class:`~lrscale_megatron.curvature.operators.HessianOperator`
(``exact``: double backward with the first gradient's graph reused; ``fd``: finite differences of
gradients at substituted parameters; ``jvp``: forward-over-reverse). See the operators module docstring
for the numerics; these functions read the operator's state and caches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lrscale_megatron.curvature import norm_hint
from lrscale_megatron.curvature.autodiff import refuse_untracked_backward, second_backward
from lrscale_megatron.curvature.backend import Vector
from lrscale_megatron.curvature.doublegrad import cheap_double_backward
from lrscale_megatron.curvature.evaluation import substituted, upcast_rest
from lrscale_megatron.curvature.perturb import perturb_, power_of_two, restore_
from lrscale_megatron.curvature.solve_scope import in_solve

if TYPE_CHECKING:
    from lrscale_megatron.curvature.operators import HessianOperator


def _first_grads(
    op: HessianOperator, out: torch.Tensor, wrt: list[torch.Tensor]
) -> list[torch.Tensor | None]:
    with refuse_untracked_backward([out]):
        return list(torch.autograd.grad(out, wrt, create_graph=True, allow_unused=True))


def _second(
    op: HessianOperator, g: Sequence[torch.Tensor | None], wrt, vp: Sequence[torch.Tensor], retain: bool
):
    # a first gradient that does not require grad is constant in θ (the untracked-backward guard
    # has ruled out a dropped path), so its block of H v is zero
    pairs = [(gi, vi) for gi, vi in zip(g, vp) if gi is not None and gi.requires_grad]
    if not pairs:
        return [None] * len(wrt)
    return second_backward([gi for gi, _ in pairs], wrt, [vi for _, vi in pairs], retain_graph=retain)


def hvp_exact(op: HessianOperator, v: Vector) -> Vector:
    n = len(op.microbatches)
    if op.reuse_graph:
        graph = _exact_graph(op)
        acc = None
        with op._evaluation(None):
            for _loss, g in graph[1]:
                vp = [vi if vi.dtype == w.dtype else vi.to(w.dtype) for vi, w in zip(v, graph[2])]
                acc = op._accumulate(acc, _second(op, g, graph[2], vp, retain=True), n)
        op.last_loss = sum(loss for loss, _ in graph[1]) / n
        assert acc is not None
        return op._finish(acc)
    leaves = op._leaves()
    wrt = op.params if leaves is None else leaves
    vp = [vi.to(w.dtype) for vi, w in zip(v, wrt)]
    acc, total = None, 0.0
    with op._evaluation(leaves):
        for mb in op.microbatches:
            if op.parallel.pp_size > 1:
                from lrscale_megatron.curvature.pipeline import pipeline_hvp

                loss, hv = pipeline_hvp(op.parallel, op._stage_fn, mb, wrt, vp)
            else:
                with cheap_double_backward():
                    out = op._stage_fn(mb, None)
                loss = float(out.detach())
                g = _first_grads(op, out, wrt)
                hv = _second(op, g, wrt, vp, retain=False)
                del out, g
            total += loss / n
            acc = op._accumulate(acc, hv, n)
    op.last_loss = total
    assert acc is not None
    return op._finish(acc)


def _exact_graph(op: HessianOperator):
    """The first gradients with their graphs, one per micro-batch, re-taken when a parameter changed."""
    version = op._params_version()
    if op._graph is None or op._graph[0] != version:
        op._graph = None
        leaves = op._leaves()
        wrt = op.params if leaves is None else leaves
        per_mb = []
        with op._evaluation(leaves):
            for mb in op.microbatches:
                with cheap_double_backward():  # the same loss and gradient, a cheaper second backward
                    out = op._stage_fn(mb, None)
                per_mb.append((float(out.detach()), _first_grads(op, out, wrt)))
                del out
        op.n_grad += 1
        op._graph = (version, per_mb, wrt)
    return op._graph


def hvp_fd(op: HessianOperator, v: Vector) -> Vector:
    vnorm = norm_hint.recall(v)  # a Lanczos vector: unit and finite (the solver checked), no pass
    if vnorm is None:
        vnorm = op.backend.norm_estimate(v)  # h is a step size: float32 accuracy is plenty
    if not math.isfinite(vnorm):
        return [torch.full_like(x, float("nan")) for x in v]
    if vnorm == 0.0:
        return op.backend.zeros()
    version = op._params_version()  # one anchor key for both version-keyed caches below
    raw = op.fd_eps * max(1.0, _param_norm(op, version)) / vnorm
    fin = torch.finfo(op.backend.dtype)
    if not (2 * fin.tiny <= raw <= fin.max / 2):  # infinite parameters, or ||v|| far out of range
        return [torch.full_like(x, float("nan")) for x in v]  # no product: the solver says so
    # a power of two (within sqrt(2) of the chosen step): h*v and the division by h are exact, which the
    # in-place perturbation relies on (:mod:`.perturb`), and 1/h can scale the gradient in its backward
    h = power_of_two(raw)
    if op.fd_scheme == "forward":
        g0 = op.base_gradient(version)  # cached while the parameters are unchanged
        assert g0 is not None
        # (g(θ+hv) - g(θ))/h in one pass: the backward itself returns g(θ+hv)/h (its seed is 1/h, exact),
        # then gp -= g0/h (a power-of-two multiple of g0: exact, fused in the subtraction)
        gp, scaled = _grad_at(op, v, h, 1.0 / h)
        if scaled:
            torch._foreach_sub_(gp, g0, alpha=1.0 / h)
        else:
            torch._foreach_sub_(gp, g0)
            torch._foreach_mul_(gp, 1.0 / h)
        return gp
    gp, scaled = _grad_at(op, v, h, 0.5 / h)
    gm, scaled_m = _grad_at(op, v, -h, 0.5 / h)
    torch._foreach_sub_(gp, gm)
    del gm
    if not (scaled and scaled_m):
        torch._foreach_mul_(gp, 0.5 / h)
    return gp


def _param_norm(op: HessianOperator, version: int | None = None) -> float:
    if version is None:
        version = op._params_version()
    if op._theta_norm is None or op._theta_norm[0] != version:
        op.settle_anchor()  # ||theta0||, not of a product's theta0 + h v (lazy restore)
        version = op._params_version()
        with torch.no_grad():
            sq = op.backend.dot([p.detach() for p in op.params], [p.detach() for p in op.params])
        op._theta_norm = (version, math.sqrt(max(sq, 0.0)))
    return op._theta_norm[1]


def _grad_at(op: HessianOperator, v: Vector, h: float, scale: float) -> tuple[Vector, bool]:
    """The gradient at ``θ + h v``, multiplied by ``scale`` where the backward can do it for free
    (second value ``True``; not through a user ``grad_fn`` or a pipeline schedule)."""
    if op.upcast and op.backend.host:  # host vectors: device leaves from v, the gradient back on the host
        from lrscale_megatron.curvature.hostvectors import host_gradient

        return host_gradient(op, scale, v, h)[1], op.can_scale_grad
    if op.upcast:  # bf16/fp16: evaluate at float32 substitutes so that h*v is not rounded away
        leaves = op._leaves(v, h)
        try:
            return op._gradient(leaves, grad_scale=scale)[1], op.can_scale_grad
        finally:
            del leaves
    # float32/float64 (and any user grad_fn): perturb the parameters in place and restore them bit for bit
    # without a parameter copy (:mod:`.perturb`: the check that subtracting h*v gives them back runs first)
    mode = op.restore_mode
    if mode == "anchor":  # one copy theta0 for the whole solve: write theta0 + h v (:mod:`.anchor`)
        anchor = op._fd_anchor()
        try:
            anchor.perturb_(v, h)
            _, g = op._gradient(grad_scale=scale)
        except BaseException:  # KeyboardInterrupt in loss_fn too: theta0 back before anything else runs
            anchor.restore_()
            raise
        if not in_solve():  # inside a solve theta0 is put back lazily (the anchor's caches stay keyed)
            anchor.restore_()
        return g, op.can_scale_grad
    version = op._params_version()
    if mode == "copy":  # one parameter-sized copy per product, fewer elementwise passes
        copy = [p.detach().clone() for p in op.params]
        try:
            with torch.no_grad():
                torch._foreach_add_(
                    [p.detach() for p in op.params], [vi.to(p.dtype) for vi, p in zip(v, op.params)], alpha=h
                )
            _, g = op._gradient(grad_scale=scale)
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in op.params], copy)
            del copy
    else:
        saved = perturb_(op.params, v, h)
        try:
            _, g = op._gradient(grad_scale=scale)
        finally:
            restore_(op.params, v, h, saved)
            del saved
    after = op._params_version()
    if op._base_version == version:
        op._base_version = after  # the perturbation was undone exactly
    if op._theta_norm is not None and op._theta_norm[0] == version:
        op._theta_norm = (after, op._theta_norm[1])  # likewise: ||theta|| is unchanged
    return g, op.can_scale_grad


def hvp_jvp(op: HessianOperator, v: Vector) -> Vector:
    from torch.func import grad, jvp

    names = [n for n, _ in op.named_params]
    leaves = op._leaves()
    primals = dict(zip(names, [p.detach() for p in (op.params if leaves is None else leaves)]))
    tangents = {n: vi.to(primals[n].dtype) for n, vi in zip(names, v)}
    n_mb = len(op.microbatches)
    acc = None
    with op._evaluation(None):
        rest = upcast_rest(op.model, set(names)) if op.upcast else {}
        for mb in op.microbatches:

            def loss_of(pdict, mb=mb):
                with substituted(op.model, {**rest, **pdict}):
                    return op.loss_fn(op.model, mb)

            hv = jvp(grad(loss_of), (primals,), (tangents,))[1]
            acc = op._accumulate(acc, [hv[n] for n in names], n_mb)
    assert acc is not None
    return op._finish(acc)
