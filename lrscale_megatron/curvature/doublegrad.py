"""Cheaper double backward for linear layers, GELU, LayerNorm and softmax, used by exact Hessian-vector products.

An exact product differentiates the first gradient (taken with ``create_graph=True``) once more. For a
linear layer that second backward costs two matmuls per matmul of a forward + backward, which is the
least reverse-over-reverse can do; the rest costs far more. PyTorch's double-backward formulas for
``gelu_backward``, ``native_layer_norm_backward`` and ``_softmax_backward_data`` are generic compositions
of ~10 (GELU), ~40 (LayerNorm) and ~8 (softmax) full-size kernels, each allocating a new tensor, and
recompute per product what depends on the parameters only; a linear layer's first backward is three
nodes whose cotangents the autograd engine sums with full-size additions (profiles in docs/benchmarks.md,
"exact product cost" and "exact product, fifth pass").

:func:`cheap_double_backward` is a ``TorchFunctionMode`` active while the operator runs the forward whose
gradient it will differentiate (exact mode; also on pipeline stages). It routes ``F.linear`` (with a bias,
on a 2-d or contiguous input: :mod:`.doublegrad_linear`), ``F.gelu`` (``approximate="none"``),
``F.layer_norm`` / ``torch.layer_norm`` and ``softmax`` (``F.softmax``, ``torch.softmax``,
``Tensor.softmax``, without ``dtype``), ``matmul`` / ``@`` of two tensors with the same batch shape
(:mod:`.doublegrad_bmm`) of plain float tensors to autograd Functions whose forward and first
backward call **the same ATen kernels** as PyTorch (the loss and the first gradient are bit for bit the
same). An exact solve differentiates one graph many times, so the first (create-graph) backward also
computes, once per solve, every factor of the second derivative that does not depend on the product's
vector, and keeps it **in place of** the input it comes from (the retained graph is no larger than with
PyTorch's formulas: tested). Each product is then a few passes:

* GELU: kept ``gelu'(x)`` (the kernel's) and ``s = g phi(x) (2 - x^2)`` instead of ``x`` and ``g``:
  ``d/dg = a gelu'(x)``, ``d/dx = a s``; the forward node's second backward is ``c gelu'(x)``.
* softmax ``y``: the backward ``dz = y (dy - c)``, ``c = <dy, y>``; kept ``q = dy - c`` instead of ``dy``:
  ``d/d dy = y (a - <a, y>)``, ``d/dy = (a - <a, y>) q`` (the dropped ``-<a, y> c`` is constant along
  ``dim`` and ``y``'s only path, the softmax's own backward, maps it to zero).
* LayerNorm: kept ``xh = (x - mean) rstd`` (instead of ``x``, also for the forward node, whose second
  backward is the same kernel at mean 0, rstd 1, times rstd) and the row means of ``gh = dy w`` and
  ``gh xh``. With cotangents ``a`` (on ``dx``), ``cw``, ``cb``: ``d/d dy`` is the layer norm's JVP
  ``w xh' + xh cw + cb`` with ``xh' = rstd (a - mean(a) - xh mean(a xh))``; ``d/dw = sum_rows dy xh'``;
  ``d/dx`` is the second derivative through ``xh`` and ``rstd``, in three full-size temporaries.
* linear / bmm: ``d dy = a W^T + x cW^T + cb`` (``ca b + a cb``) in one matmul and one in place.

Anything else (tensor subclasses, ``approximate="tanh"``, a softmax ``dtype``, a linear layer without bias
or on a strided input, no grad mode, autocast, inside a custom Function's forward) goes to PyTorch
unchanged. The graph may be differentiated with ``create_graph=True`` once (a second create-graph backward
through it, or a third derivative, raises; the inner backwards are ``once_differentiable``); exact products
need second derivatives only. An input changed in place after the forward is caught as autograd would.
Checked against PyTorch's own double backward in float64 (``tests/unit/test_doublegrad.py``) and by every
exact-mode test against dense ``eigvalsh``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from lrscale_megatron.curvature.doublegrad_bmm import matmul as _bmm_matmul
from lrscale_megatron.curvature.doublegrad_layernorm import _ONCE, _input, _LayerNorm
from lrscale_megatron.curvature.doublegrad_linear import _Linear
from lrscale_megatron.curvature.doublegrad_pool import Pool

#: switch for the whole module (tests and ``benchmarks/exact_cost.py`` compare against PyTorch's own
#: double backward by setting it to ``False``); read when an exact operator runs its forward
ENABLED = True

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(*ts: Any) -> bool:
    return all(t is None or (type(t) in _PLAIN and t.dtype in _FLOATS) for t in ts)


# ---------------------------------------------------------------------------------------------- GELU
class _Gelu(torch.autograd.Function):
    # x is kept on ctx (not saved_tensors) so that the create-graph backward can swap it for gelu'(x):
    # the second backward needs only that, and the graph then holds no more than PyTorch's would
    @staticmethod
    def forward(ctx, x, pool):
        ctx.x, ctx.version = x, x._version
        ctx.pool = pool
        return torch._C._nn.gelu(x)

    @staticmethod
    def backward(ctx, g):
        gp = getattr(ctx, "gp", None)
        # after the create-graph backward: a second backward (grad off) through the forward node
        if gp is not None:
            if torch.is_grad_enabled():
                raise RuntimeError(_ONCE.format(what="gelu"))
            return torch.mul(g, gp, out=ctx.pool.take(g.shape, g)), None
        x = _input(ctx, "gelu")
        if not torch.is_grad_enabled():  # a plain backward: no node to record
            return torch.ops.aten.gelu_backward(g, x), None
        held: list[torch.Tensor] = []
        out = _GeluGrad.apply(g, x, held, ctx.pool)
        ctx.gp = held[0]
        del ctx.x
        return out, None


class _GeluGrad(torch.autograd.Function):
    # the backward of GELU, g gelu'(x), is bilinear in (g, x -> gelu'(x)): its vjp needs gelu'(x) and
    # g gelu''(x), both fixed for the whole solve, so they are computed here once and each product is two
    # multiplications
    @staticmethod
    def forward(ctx, g, x, held, pool):
        ctx.pool = pool
        out = torch.ops.aten.gelu_backward(g, x)
        gp = torch.ops.aten.gelu_backward(x.new_ones(()).expand_as(x), x)  # gelu'(x), the same kernel
        # gelu''(x) = phi(x) (2 - x^2), phi the standard normal density; times g
        s = x.square()
        two = torch.addcmul(torch.tensor(2.0, dtype=x.dtype, device=x.device), x, x, value=-1.0)
        s.mul_(-0.5).exp_().mul_(_INV_SQRT_2PI).mul_(two).mul_(g)
        ctx.save_for_backward(gp, s)
        held.append(gp)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        gp, s = ctx.saved_tensors
        take = ctx.pool.take
        dg = torch.mul(a, gp, out=take(gp.shape, gp)) if ctx.needs_input_grad[0] else None
        dx = torch.mul(a, s, out=take(s.shape, s)) if ctx.needs_input_grad[1] else None
        return dg, dx, None, None


# ------------------------------------------------------------------------------------------- softmax
class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, dim, pool):
        y = torch._softmax(z, dim, False)
        ctx.save_for_backward(y)
        ctx.dim, ctx.pool = dim, pool
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            out = ctx.pool.take(y.shape, y)
            if out is None:
                return torch._softmax_backward_data(dy, y, ctx.dim, y.dtype), None, None
            return (
                torch.ops.aten._softmax_backward_data.out(dy, y, ctx.dim, y.dtype, grad_input=out),
                None,
                None,
            )
        return _SoftmaxGrad.apply(dy, y, ctx.dim, ctx.pool), None, None


class _SoftmaxGrad(torch.autograd.Function):
    # backward dz = y (dy - c), c = <dy, y>; q = dy - c is fixed for the solve and kept instead of dy
    @staticmethod
    def forward(ctx, dy, y, dim, pool):
        out = torch._softmax_backward_data(dy, y, dim, y.dtype)
        ctx.save_for_backward(dy - (dy * y).sum(dim, keepdim=True), y)
        ctx.dim, ctx.pool = dim, pool
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        q, y = ctx.saved_tensors
        take = ctx.pool.take
        t = torch.mul(a, y, out=take(y.shape, y)).sum(ctx.dim, keepdim=True)
        t = torch.sub(a, t, out=take(y.shape, y))
        # d/d dy: y (a - <a, y>). d/dy <a, y (dy - <dy, y>)> = a (dy - c) - <a, y> dy = (a - <a, y>) q - <a, y> c;
        # the last term is constant along dim, and y's only path is the softmax's own backward, which maps
        # constants along dim to zero: it is left out
        ddy = torch.mul(t, y, out=take(y.shape, y)) if ctx.needs_input_grad[0] else None
        dyy = t.mul_(q) if ctx.needs_input_grad[1] else None
        return ddy, dyy, None, None


# ------------------------------------------------------------------------------------------ dispatch
def _gelu(pool, x, approximate="none"):
    if approximate != "none" or not _plain(x):
        return NotImplemented
    return _Gelu.apply(x, pool)


def _softmax(pool, z, dim=None, *rest, dtype=None, _stacklevel=3):
    # F.softmax(input, dim, _stacklevel, dtype); torch.softmax / Tensor.softmax (input, dim, dtype)
    if rest:
        if len(rest) == 1 and not isinstance(rest[0], int):  # torch.softmax(input, dim, dtype)
            dtype = rest[0]
        elif len(rest) == 2:  # F.softmax(input, dim, _stacklevel, dtype)
            dtype = rest[1]
    if dtype is not None or not isinstance(dim, int) or not _plain(z):
        return NotImplemented
    return _Softmax.apply(z, dim, pool)


def _layer_norm(pool, x, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    if not _plain(x, weight, bias):
        return NotImplemented
    return _LayerNorm.apply(x, list(normalized_shape), weight, bias, eps, pool)


def _linear(pool, x, weight, bias=None):
    # only where at::linear runs addmm on the flattened input (bias, 2-d or contiguous input): the same
    # kernels, so the loss and the first gradient are PyTorch's bit for bit
    if bias is None or not _plain(x, weight, bias) or x.dim() < 2 or not (x.dim() == 2 or x.is_contiguous()):
        return NotImplemented
    return _Linear.apply(x, weight, bias, pool)


def _matmul(pool, x, y):
    if not _plain(x, y):
        return NotImplemented
    return _bmm_matmul(x, y, pool)


_ROUTES: dict[Any, Callable[..., Any]] = {
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    F.linear: _linear,
    F.gelu: _gelu,
    F.softmax: _softmax,
    torch.softmax: _softmax,
    torch.Tensor.softmax: _softmax,
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
}


def _autocast() -> bool:
    # under autocast PyTorch runs softmax / layer_norm in float32 (its cast lists); the routes call the
    # ATen kernels directly and would not, so they stand aside
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


class _Mode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.pool = Pool()  # the graph's output buffers (:mod:`.doublegrad_pool`), held by its routed nodes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and torch.is_grad_enabled() and not _autocast():
            out = route(self.pool, *args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def cheap_double_backward(enabled: bool | None = None) -> Iterator[None]:
    """Around the forward of an exact product (module docstring); a no-op when ``enabled`` is false
    (default: :data:`ENABLED`)."""
    if not (ENABLED if enabled is None else enabled):
        yield
        return
    with _Mode():
        yield
