"""Detect a backward pass that autograd cannot differentiate a second time, and refuse.

Exact Hessian-vector products differentiate the gradient (double backward). A custom
``torch.autograd.Function`` whose ``backward`` is computed outside autograd (under ``no_grad``, on
``.detach()``-ed tensors, in a fused CUDA kernel: Transformer Engine, flash attention, megatron's fused
cross entropy) returns a gradient that autograd sees as a constant, so its contribution to ``H v`` is
silently dropped: the product is wrong, and nothing raises. A ``once_differentiable`` backward raises
only a generic error during the second backward.

:func:`refuse_untracked_backward` hooks every custom-Function node of the loss's graph before the first
backward (run with ``create_graph=True``). A node that had differentiable inputs but returns gradients
that do not require grad is an untracked backward: the hook records it and the context raises a
``ValueError`` naming the Function and pointing to ``mode="fd"`` (finite differences need first
derivatives only). A Function that saved no tensors and received a constant gradient (a linear map
next to the loss, such as megatron's TP Copy/Reduce) may legitimately return a constant and is not
flagged; one that saved tensors is (conservative: a custom Function saving only constants is refused
too). Not caught: an untracked path that leaves a tracked gradient behind it (partial drops).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

REFUSAL = (
    "HessianOperator(mode='exact') needs a backward pass autograd can differentiate again, but "
    "{what} computes its backward outside autograd (a fused kernel, a no_grad or once_differentiable "
    "backward: Transformer Engine, flash attention, fused cross entropy...), so exact Hessian-vector "
    "products would silently drop that path. Use HessianOperator(mode='fd') (finite differences of "
    "gradients need no double backward), or switch the fused kernel off for the measurement."
)


def _custom_nodes(roots: list[torch.Tensor]) -> list[torch.autograd.graph.Node]:
    seen: set[torch.autograd.graph.Node] = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    out: list[torch.autograd.graph.Node] = []
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if isinstance(n, torch.autograd.function.BackwardCFunction):
            out.append(n)
        stack.extend(nx for nx, _ in n.next_functions if nx is not None)
    return out


@contextlib.contextmanager
def refuse_untracked_backward(roots: list[torch.Tensor]) -> Iterator[None]:
    """Around the first (``create_graph=True``) backward from ``roots``: raise if a custom Function's
    backward is untracked (module docstring). Also turns the ``once_differentiable`` error into the
    same refusal."""
    bad: list[str] = []
    handles = []
    for node in _custom_nodes(roots):
        if not any(nx is not None for nx, _ in node.next_functions):
            continue  # no differentiable input: nothing to track
        try:
            saves = len(node.saved_tensors) > 0  # type: ignore[attr-defined]
        except RuntimeError:
            saves = True

        name = type(node).__name__

        def hook(grad_inputs, grad_outputs, name=name, saves=saves):
            got = [g for g in grad_inputs if g is not None]
            # a linear Function (megatron's TP Copy/Reduce: saves nothing) fed a constant gradient
            # legitimately returns a constant; one that saved tensors or got a tracked gradient must not
            tracked_in = any(g is not None and g.requires_grad for g in grad_outputs)
            untracked = got and not any(g.requires_grad for g in got) and (saves or tracked_in)
            # once_differentiable wraps its outputs in a DelayedError node ("Error"), which does not always
            # raise (measured: torch 2.13 returned a product of 1e-17 through it instead of an error)
            delayed = any(type(g.grad_fn).__name__ in ("Error", "DelayedError") for g in got)
            if untracked or delayed:
                bad.append(name.removesuffix("Backward"))

        handles.append(node.register_hook(hook))
    try:
        yield
    except RuntimeError as e:
        if "once_differentiable" in str(e):
            raise ValueError(REFUSAL.format(what="a once_differentiable autograd.Function")) from e
        raise
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise ValueError(REFUSAL.format(what=f"autograd.Function {sorted(set(bad))}"))


def second_backward(outputs, inputs, grad_outputs, retain_graph: bool = False):
    """``torch.autograd.grad`` for the second backward, with a ``once_differentiable`` error turned into
    the refusal. ``None`` (no dependence) is returned as is."""
    try:
        return torch.autograd.grad(
            outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
        )
    except RuntimeError as e:
        if "once_differentiable" in str(e):
            raise ValueError(REFUSAL.format(what="a once_differentiable autograd.Function")) from e
        raise
