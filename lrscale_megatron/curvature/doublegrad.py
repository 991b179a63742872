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
from lrscale_megatron.curvature.doublegrad_linear import _as, _Linear

#: switch for the whole module (tests and ``benchmarks/exact_cost.py`` compare against PyTorch's own
#: double backward by setting it to ``False``); read when an exact operator runs its forward
ENABLED = True

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(*ts: Any) -> bool:
    return all(t is None or (type(t) in _PLAIN and t.dtype in _FLOATS) for t in ts)


_ONCE = (
    "doublegrad: the {what} route's graph was already differentiated with create_graph=True; a second "
    "create-graph backward through it (or a third derivative) is not provided: set doublegrad.ENABLED = False"
)


def _input(ctx: Any, what: str) -> torch.Tensor:
    """The input kept on ``ctx``, with autograd's own in-place check (saved_tensors does it for saved ones)."""
    x = ctx.x
    if x._version != ctx.version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: the input of {what} is at version {x._version}; expected version {ctx.version}"
        )
    return x


# ---------------------------------------------------------------------------------------------- GELU
class _Gelu(torch.autograd.Function):
    # x is kept on ctx (not saved_tensors) so that the create-graph backward can swap it for gelu'(x):
    # the second backward needs only that, and the graph then holds no more than PyTorch's would
    @staticmethod
    def forward(ctx, x):
        ctx.x, ctx.version = x, x._version
        return torch._C._nn.gelu(x)

    @staticmethod
    def backward(ctx, g):
        gp = getattr(ctx, "gp", None)
        # after the create-graph backward: a second backward (grad off) through the forward node
        if gp is not None:
            if torch.is_grad_enabled():
                raise RuntimeError(_ONCE.format(what="gelu"))
            return g * gp
        x = _input(ctx, "gelu")
        if not torch.is_grad_enabled():  # a plain backward: no node to record
            return torch.ops.aten.gelu_backward(g, x)
        held: list[torch.Tensor] = []
        out = _GeluGrad.apply(g, x, held)
        ctx.gp = held[0]
        del ctx.x
        return out


class _GeluGrad(torch.autograd.Function):
    # the backward of GELU, g gelu'(x), is bilinear in (g, x -> gelu'(x)): its vjp needs gelu'(x) and
    # g gelu''(x), both fixed for the whole solve, so they are computed here once and each product is two
    # multiplications
    @staticmethod
    def forward(ctx, g, x, held):
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
        dg = a * gp if ctx.needs_input_grad[0] else None
        dx = a * s if ctx.needs_input_grad[1] else None
        return dg, dx, None


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
    # backward dz = y (dy - c), c = <dy, y>; q = dy - c is fixed for the solve and kept instead of dy
    @staticmethod
    def forward(ctx, dy, y, dim):
        out = torch._softmax_backward_data(dy, y, dim, y.dtype)
        ctx.save_for_backward(dy - (dy * y).sum(dim, keepdim=True), y)
        ctx.dim = dim
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, a):
        q, y = ctx.saved_tensors
        t = a - (a * y).sum(ctx.dim, keepdim=True)
        # d/d dy: y (a - <a, y>). d/dy <a, y (dy - <dy, y>)> = a (dy - c) - <a, y> dy = (a - <a, y>) q - <a, y> c;
        # the last term is constant along dim, and y's only path is the softmax's own backward, which maps
        # constants along dim to zero: it is left out
        ddy = t * y if ctx.needs_input_grad[0] else None
        dyy = t.mul_(q) if ctx.needs_input_grad[1] else None
        return ddy, dyy, None


# ----------------------------------------------------------------------------------------- LayerNorm
class _LayerNorm(torch.autograd.Function):
    # like _Gelu: x is swapped for the normalised input xh after the create-graph backward (the second
    # backward through this node needs only xh and rstd), so the graph holds no more than PyTorch's
    @staticmethod
    def forward(ctx, x, shape, w, b, eps):
        y, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)
        ctx.save_for_backward(w, b, mean, rstd)
        ctx.x, ctx.version = x, x._version
        ctx.shape = shape
        return y

    @staticmethod
    def backward(ctx, dy):
        w, b, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[2], need[3]]
        xh = getattr(ctx, "xh", None)
        if xh is not None:  # after the create-graph backward: the same kernel at mean 0, rstd 1, then x rstd
            if torch.is_grad_enabled():
                raise RuntimeError(_ONCE.format(what="layer_norm"))
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                dy, xh, ctx.shape, torch.zeros_like(mean), torch.ones_like(rstd), w, b, mask
            )
            if dx is not None:
                dx.mul_(rstd)
        elif not torch.is_grad_enabled():
            x = _input(ctx, "layer_norm")
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(dy, x, ctx.shape, mean, rstd, w, b, mask)
        else:
            held: list[torch.Tensor] = []
            x = _input(ctx, "layer_norm")
            dx, dw, db = _LayerNormGrad.apply(dy, x, w, b, mean, rstd, ctx.shape, tuple(mask), held)
            ctx.xh = held[0].reshape(x.shape)
            del ctx.x
        return dx, None, dw, db, None


class _LayerNormGrad(torch.autograd.Function):
    # what the second derivative needs that does not depend on the product's cotangents is computed here,
    # once per solve: the normalised input xh (kept instead of x) and row means of gh = dy w
    @staticmethod
    def forward(ctx, dy, x, w, b, mean, rstd, shape, mask, held):
        out = torch.ops.aten.native_layer_norm_backward(dy, x, shape, mean, rstd, w, b, list(mask))
        n = math.prod(shape)
        rows = x.numel() // n
        r = rstd.reshape(rows, 1)
        xh = (x.reshape(rows, n) - mean.reshape(rows, 1)).mul_(r)  # the normalised input
        dy2 = dy.reshape(rows, n)
        w1 = None if w is None else w.reshape(n)
        gh = dy2 if w1 is None else dy2 * w1  # the gradient arriving at xh
        mg = gh.mean(1, keepdim=True)
        m_gx = (gh * xh).mean(1, keepdim=True)
        del gh
        ctx.save_for_backward(dy2, xh, w1, r, mg, m_gx)
        held.append(xh)
        ctx.shape, ctx.n, ctx.rows, ctx.xshape, ctx.dyshape = shape, n, rows, x.shape, dy.shape
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, a, cw, cb):
        dy2, xh, w1, r, mg, m_gx = ctx.saved_tensors
        n, rows = ctx.n, ctx.rows
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        ddy = dx = dw = None
        # dx = xh c_xh + dy M - a c_a + c_1 with M = r cw - c_gh w (c_* per row; derivation below); the row
        # means of products are matrix-vector products or reuse one scratch buffer, so a product allocates
        # three full-size tensors (the old formulas: eight)
        c_xh = c_1 = c_gh = c_a = None
        t1 = None  # scratch, rows x n
        if a is not None:
            a2 = a.reshape(rows, n)
            ma = a2.mean(1, keepdim=True)
            t1 = a2 * xh
            m_ax = t1.mean(1, keepdim=True)
            # xh' = rstd (a - mean(a) - xh mean(a xh)) = rstd x0: the JVP of xh in direction a
            x0 = (a2 - ma).addcmul_(xh, m_ax, value=-1.0)
            m_gx0 = None
            if need_w or need_x:
                p0 = dy2 * x0
                if need_w:
                    dw = r.reshape(1, rows).mm(p0).reshape(n)  # sum_rows dy xh'
                if need_x:  # mean(gh x0), gh = dy w
                    m_gx0 = (p0.sum(1, keepdim=True) if w1 is None else p0.mv(w1).unsqueeze(1)).div_(n)
                t1 = p0  # the larger scratch is free again
            if need_dy:
                ddy = x0.mul_(r) if w1 is None else x0.mul_(r).mul_(w1)
            del x0
            if need_x:
                # T = <gh, xh'(a)> as a function of x (through xh and rstd):
                # dT/dx = -r^2 [m_ga xh + m_ax (gh - mean(gh)) + m_gx (a - mean(a))] + 3 r^2 m_gx m_ax xh,
                # m_ga = mean(gh (a - mean(a))) = mean(gh x0) + m_gx m_ax, m_gx = mean(gh xh)
                r2 = r * r
                c_xh = r2 * (2.0 * m_gx * m_ax - m_gx0)
                c_gh, c_a = r2 * m_ax, r2 * m_gx
                c_1 = r2 * (m_ax * mg + m_gx * ma)
        rcw = None
        if cw is not None:
            cw1 = cw.reshape(n)
            if need_dy:
                ddy = xh * cw1 if ddy is None else ddy.addcmul_(xh, cw1)
            if need_x:
                # <dy cw, xh> through xh: rstd (h - mean(h) - xh mean(h xh)), h = dy cw
                t1 = torch.mul(xh, cw1, out=t1) if t1 is not None else xh * cw1
                rm_hx = t1.mul_(dy2).mean(1, keepdim=True).mul_(r)
                rm_h = dy2.mv(cw1).unsqueeze(1).div_(n).mul_(r)
                c_xh = -rm_hx if c_xh is None else c_xh.sub_(rm_hx)
                c_1 = -rm_h if c_1 is None else c_1.sub_(rm_h)
                rcw = (r, cw1)
        if need_x and c_xh is not None:
            dx = xh * c_xh
            m = None  # M = r cw - c_gh w: the terms of dy in one pass
            if rcw is not None:
                m = torch.mul(r, cw1, out=t1) if t1 is not None else r * cw1
            if c_gh is not None:
                if m is None:
                    m = -c_gh if w1 is None else c_gh * -w1
                elif w1 is None:
                    m.sub_(c_gh)
                else:
                    m.addcmul_(c_gh, w1, value=-1.0)
            if m is not None:
                dx.addcmul_(dy2, m)
            if c_a is not None:
                dx.addcmul_(a2, c_a, value=-1.0)
            dx.add_(c_1)
        if cb is not None and need_dy:
            cb1 = cb.reshape(n)
            ddy = cb1.expand(rows, n).clone() if ddy is None else ddy.add_(cb1)
        # fresh contiguous results, not recorded as views (the engine then sums into them in place)
        out_dy = None if ddy is None else _as(ddy, ctx.dyshape)
        out_x = None if dx is None else _as(dx, ctx.xshape)
        out_w = None if dw is None or w1 is None else _as(dw, ctx.shape)
        return out_dy, out_x, out_w, None, None, None, None, None, None


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


def _linear(x, weight, bias=None):
    # only where at::linear runs addmm on the flattened input (bias, 2-d or contiguous input): the same
    # kernels, so the loss and the first gradient are PyTorch's bit for bit
    if bias is None or not _plain(x, weight, bias) or x.dim() < 2 or not (x.dim() == 2 or x.is_contiguous()):
        return NotImplemented
    return _Linear.apply(x, weight, bias)


def _matmul(x, y):
    if not _plain(x, y):
        return NotImplemented
    return _bmm_matmul(x, y)


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
