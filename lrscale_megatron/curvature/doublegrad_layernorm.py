"""LayerNorm's double backward for :mod:`.doublegrad` (exact products only): per-solve row statistics,
the normalised input kept instead of the input, three full-size temporaries per product (the formulas
are in :mod:`.doublegrad`'s docstring and in the comments below)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from lrscale_megatron.curvature.doublegrad_linear import _as

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


class _LayerNorm(torch.autograd.Function):
    # like _Gelu: x is swapped for the normalised input xh after the create-graph backward (the second
    # backward through this node needs only xh and rstd), so the graph holds no more than PyTorch's
    @staticmethod
    def forward(ctx, x, shape, w, b, eps, pool):
        y, mean, rstd = torch.native_layer_norm(x, shape, w, b, eps)
        ctx.save_for_backward(w, b, mean, rstd)
        ctx.x, ctx.version = x, x._version
        ctx.shape, ctx.pool = shape, pool
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
            dx, dw, db = _LayerNormGrad.apply(dy, x, w, b, mean, rstd, ctx.shape, tuple(mask), held, ctx.pool)
            ctx.xh = held[0].reshape(x.shape)
            del ctx.x
        return dx, None, dw, db, None, None


class _LayerNormGrad(torch.autograd.Function):
    # what the second derivative needs that does not depend on the product's cotangents is computed here,
    # once per solve: the normalised input xh (kept instead of x) and row means of gh = dy w
    @staticmethod
    def forward(ctx, dy, x, w, b, mean, rstd, shape, mask, held, pool):
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
        ctx.pool = pool
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, a, cw, cb):
        dy2, xh, w1, r, mg, m_gx = ctx.saved_tensors
        n, rows = ctx.n, ctx.rows
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        take = ctx.pool.take  # full-size temporaries and results into the graph's pool inside a product
        ddy = dx = dw = None
        # dx = xh c_xh + dy M - a c_a + c_1 with M = r cw - c_gh w (c_* per row; derivation below); the row
        # means of products are matrix-vector products or reuse one scratch buffer, so a product allocates
        # three full-size tensors (the old formulas: eight)
        c_xh = c_1 = c_gh = c_a = None
        t1 = None  # scratch, rows x n
        if a is not None:
            a2 = a.reshape(rows, n)
            ma = a2.mean(1, keepdim=True)
            t1 = torch.mul(a2, xh, out=take(xh.shape, xh))
            m_ax = t1.mean(1, keepdim=True)
            # xh' = rstd (a - mean(a) - xh mean(a xh)) = rstd x0: the JVP of xh in direction a
            x0 = torch.sub(a2, ma, out=take(xh.shape, xh)).addcmul_(xh, m_ax, value=-1.0)
            m_gx0 = None
            if need_w or need_x:
                p0 = torch.mul(dy2, x0, out=t1)
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
                ddy = torch.mul(xh, cw1, out=take(xh.shape, xh)) if ddy is None else ddy.addcmul_(xh, cw1)
            if need_x:
                # <dy cw, xh> through xh: rstd (h - mean(h) - xh mean(h xh)), h = dy cw
                t1 = torch.mul(xh, cw1, out=t1 if t1 is not None else take(xh.shape, xh))
                rm_hx = t1.mul_(dy2).mean(1, keepdim=True).mul_(r)
                rm_h = dy2.mv(cw1).unsqueeze(1).div_(n).mul_(r)
                c_xh = -rm_hx if c_xh is None else c_xh.sub_(rm_hx)
                c_1 = -rm_h if c_1 is None else c_1.sub_(rm_h)
                rcw = (r, cw1)
        if need_x and c_xh is not None:
            dx = torch.mul(xh, c_xh, out=take(xh.shape, xh))
            m = None  # M = r cw - c_gh w: the terms of dy in one pass
            if rcw is not None:
                m = torch.mul(r, cw1, out=t1 if t1 is not None else take(xh.shape, xh))
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
            assert c_1 is not None  # set with c_xh
            dx.add_(c_1)
        if cb is not None and need_dy:
            cb1 = cb.reshape(n)
            ddy = cb1.expand(rows, n).clone() if ddy is None else ddy.add_(cb1)
        # contiguous results, not recorded as views (the engine then sums into fresh ones in place)
        out_dy = None if ddy is None else _as(ddy, ctx.dyshape)
        out_x = None if dx is None else _as(dx, ctx.xshape)
        out_w = None if dw is None or w1 is None else _as(dw, ctx.shape)
        return out_dy, out_x, out_w, None, None, None, None, None, None, None
