"""Cheaper double backward for GELU, LayerNorm and softmax, used by exact Hessian-vector products.

An exact product differentiates the first gradient (taken with ``create_graph=True``) once more. For a
linear layer that second backward costs two matmuls per matmul of a forward + backward, which is the
least reverse-over-reverse can do; the elementwise layers cost far more. PyTorch's double-backward
formulas for ``gelu_backward``, ``native_layer_norm_backward`` and ``_softmax_backward_data`` are generic
compositions of ~10 (GELU), ~40 (LayerNorm) and ~8 (softmax) full-size kernels, each allocating a new
tensor: on the 834k-parameter TorchGPT at 2048 tokens they were ~40 % of an exact product (profile in
docs/benchmarks.md, "exact product cost").

:func:`cheap_double_backward` is a ``TorchFunctionMode`` active while the operator runs the forward whose
gradient it will differentiate (exact mode only). It routes ``F.gelu`` (``approximate="none"``),
``F.layer_norm`` / ``torch.layer_norm`` and ``softmax`` (``F.softmax``, ``torch.softmax``,
``Tensor.softmax``, without ``dtype``) of plain float tensors to autograd Functions whose forward and first
backward call **the same ATen kernels** as PyTorch (the loss and the first gradient are bit for bit the
same) and whose backward-of-backward is written out in closed form with few passes:

* GELU: ``d/dx [g gelu'(x)] = g phi(x) (2 - x^2)``, ``d/dg = gelu'(x)`` (``gelu_backward`` again).
* softmax ``y``: the backward ``dz = y (dy - <dy, y>)``; its vjp with ``a`` is ``softmax_backward(a, y)``
  for ``dy`` and ``a dy - <dy, y> a - <a, y> dy`` for ``y`` (then through the forward's own node).
* LayerNorm: with ``xh = (x - mean) rstd``, ``gh = dy w`` and cotangents ``a`` (on ``dx``), ``cw``,
  ``cb``: ``d/d dy`` is the layer norm's JVP ``w xh' + xh cw + cb`` with
  ``xh' = rstd (a - mean(a) - xh mean(a xh))``; ``d/dw = sum_rows dy xh'``; ``d/dx`` is the second
  derivative through ``xh`` and ``rstd`` (derivation in the function's comments).

Anything else (tensor subclasses, ``approximate="tanh"``, a softmax ``dtype``, no grad mode, autocast,
inside a custom Function's forward) goes to PyTorch unchanged. Third derivatives are not provided (the inner
backwards are ``once_differentiable``); exact products need second derivatives only. Checked against
PyTorch's own double backward in float64 (``tests/unit/test_doublegrad.py``) and by every exact-mode
test against dense ``eigvalsh``.
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
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch._C._nn.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a plain backward (or the second one): no node to record
            return torch.ops.aten.gelu_backward(g, x)
        return _GeluGrad.apply(g, x)


class _GeluGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x):
        ctx.save_for_backward(g, x)
        return torch.ops.aten.gelu_backward(g, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        g, x = ctx.saved_tensors
        dg = torch.ops.aten.gelu_backward(a, x) if ctx.needs_input_grad[0] else None
        dx = None
        if ctx.needs_input_grad[1]:
            # gelu''(x) = phi(x) (2 - x^2), phi the standard normal density
            dx = x.square()
            dx.mul_(-0.5).exp_().mul_(_INV_SQRT_2PI)
            dx.mul_(torch.addcmul(torch.tensor(2.0, dtype=x.dtype, device=x.device), x, x, value=-1.0))
            dx.mul_(a).mul_(g)
        return dg, dx


# ------------------------------------------------------------------------------------------- softmax
class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, dim):
        y = torch._softmax(z, dim, False)
        ctx.save_for_backward(y)
        ctx.dim = dim
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return torch._softmax_backward_data(dy, y, ctx.dim, y.dtype), None
        return _SoftmaxGrad.apply(dy, y, ctx.dim), None


class _SoftmaxGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, y, dim):
        ctx.save_for_backward(dy, y)
        ctx.dim = dim
        return torch._softmax_backward_data(dy, y, dim, y.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        dy, y = ctx.saved_tensors
        d = ctx.dim
        ddy = torch._softmax_backward_data(a, y, d, y.dtype) if ctx.needs_input_grad[0] else None
        dyy = None
        if ctx.needs_input_grad[1]:
            # d/dy <a, y (dy - <dy, y>)> = a (dy - <dy, y>) - <a, y> dy
            s_dy = (dy * y).sum(d, keepdim=True)
            s_a = (a * y).sum(d, keepdim=True)
            dyy = dy - s_dy
            dyy.mul_(a).addcmul_(dy, s_a, value=-1.0)
        return ddy, dyy, None


# ----------------------------------------------------------------------------------------- LayerNorm
class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shape, w, b, eps):
        y, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = (need[0], need[2], need[3])
        if not torch.is_grad_enabled():
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                dy, x, ctx.shape, mean, rstd, w, b, list(mask)
            )
        else:
            dx, dw, db = _LayerNormGrad.apply(dy, x, w, b, mean, rstd, ctx.shape, mask)
        return dx, None, dw, db, None


class _LayerNormGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dy, x, w, b, mean, rstd, shape, mask):
        ctx.save_for_backward(dy, x, w, mean, rstd)
        ctx.shape = shape
        ctx.set_materialize_grads(False)
        return torch.ops.aten.native_layer_norm_backward(dy, x, shape, mean, rstd, w, b, list(mask))

    @staticmethod
    @once_differentiable
    def backward(ctx, a, cw, cb):
        dy, x, w, mean, rstd = ctx.saved_tensors
        n = math.prod(ctx.shape)
        rows = x.numel() // n
        x2, dy2 = x.reshape(rows, n), dy.reshape(rows, n)
        r = rstd.reshape(rows, 1)
        w1 = None if w is None else w.reshape(n)
        xh = (x2 - mean.reshape(rows, 1)).mul_(r)  # the normalised input
        gh = dy2 * w1 if w1 is not None else dy2  # the gradient arriving at xh
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        ddy = dx = dw = None
        if a is not None:
            a2 = a.reshape(rows, n)
            ma = a2.mean(1, keepdim=True)
            m_ax = (a2 * xh).mean(1, keepdim=True)
            # xh' = rstd (a - mean(a) - xh mean(a xh)): the JVP of xh in direction a
            xhd = (a2 - ma).addcmul_(xh, m_ax, value=-1.0).mul_(r)
            if need_dy:
                ddy = xhd * w1 if w1 is not None else xhd.clone()
            if need_w:
                dw = (dy2 * xhd).sum(0)
            if need_x:
                # T = <gh, xh'(a)> as a function of x (through xh and rstd):
                # dT/dx = -r^2 [m_ga xh + m_ax (gh - mean(gh)) + m_gx (a - mean(a))] + 3 r^2 m_gx m_ax xh,
                # m_ga = mean(gh (a - mean(a))), m_gx = mean(gh xh)
                mg = gh.mean(1, keepdim=True)
                m_gx = (gh * xh).mean(1, keepdim=True)
                m_ga = (gh * a2).mean(1, keepdim=True) - mg * ma
                r2 = r * r
                dx = xh * (r2 * (3.0 * m_gx * m_ax - m_ga))
                dx.addcmul_(gh, r2 * m_ax, value=-1.0).addcmul_(a2, r2 * m_gx, value=-1.0)
                dx.add_(r2 * (m_ax * mg + m_gx * ma))
            del xhd
        if cw is not None:
            cw1 = cw.reshape(n)
            if need_dy:
                t = xh * cw1
                ddy = t if ddy is None else ddy.add_(t)
            if need_x:
                # <dy cw, xh> through xh: rstd (h - mean(h) - xh mean(h xh)), h = dy cw
                h = dy2 * cw1
                t = (h - h.mean(1, keepdim=True)).addcmul_(xh, (h * xh).mean(1, keepdim=True), value=-1.0)
                t.mul_(r)
                dx = t if dx is None else dx.add_(t)
        if cb is not None and need_dy:
            cb1 = cb.reshape(n)
            ddy = cb1.expand(rows, n).clone() if ddy is None else ddy.add_(cb1)
        out_dy = None if ddy is None else ddy.reshape(dy.shape)
        out_x = None if dx is None else dx.reshape(x.shape)
        out_w = None if dw is None or w is None else dw.reshape(w.shape)
        return out_dy, out_x, out_w, None, None, None, None, None


# ------------------------------------------------------------------------------------------ dispatch
def _gelu(x, approximate="none"):
    if approximate != "none" or not _plain(x):
        return NotImplemented
    return _Gelu.apply(x)


def _softmax(z, dim=None, *rest, dtype=None, _stacklevel=3):
    # F.softmax(input, dim, _stacklevel, dtype); torch.softmax / Tensor.softmax (input, dim, dtype)
    if rest:
        if len(rest) == 1 and not isinstance(rest[0], int):  # torch.softmax(input, dim, dtype)
            dtype = rest[0]
        elif len(rest) == 2:  # F.softmax(input, dim, _stacklevel, dtype)
            dtype = rest[1]
    if dtype is not None or not isinstance(dim, int) or not _plain(z):
        return NotImplemented
    return _Softmax.apply(z, dim)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, *rest):
    if not _plain(x, weight, bias):
        return NotImplemented
    return _LayerNorm.apply(x, list(normalized_shape), weight, bias, eps)


_ROUTES: dict[Any, Callable[..., Any]] = {
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
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and torch.is_grad_enabled() and not _autocast():
            out = route(*args, **kwargs)
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
