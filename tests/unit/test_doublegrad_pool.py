"""The routed graph's output buffers (curvature/doublegrad_pool.py): reused across exact products without
ever overwriting a result in use, equal to PyTorch's own double backward, and a product's result stays
valid after the next product."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lrscale_megatron.curvature import HessianOperator, doublegrad, doublegrad_pool
from lrscale_megatron.curvature.doublegrad_pool import Pool, owned, pooled
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss


def test_a_buffer_is_handed_out_only_when_nothing_else_refers_to_it(monkeypatch):
    monkeypatch.setattr(doublegrad_pool, "MIN_NUMEL", 4)
    pool = Pool()
    like = torch.zeros(1, dtype=torch.float64)
    assert pool.take((2, 3), like) is None  # outside pooled(): allocate as usual
    with pooled():
        assert pool.take((3,), like) is None  # too small
        a = pool.take((2, 3), like)
        assert a is not None and a.shape == (2, 3) and a.dtype == torch.float64 and a.is_contiguous()
        assert owned(a) and not owned(torch.zeros(6))
        b = pool.take((3, 2), like)  # a is still referenced: a second buffer
        assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        held = a.reshape(6)[1:]  # a view of a keeps its storage in use
        del a
        c = pool.take((6,), like)
        assert c.untyped_storage().data_ptr() not in (
            held.untyped_storage().data_ptr(),
            b.untyped_storage().data_ptr(),
        )
        ptr = held.untyped_storage().data_ptr()
        del held
        d = pool.take((2, 3), like)  # now free again: reused, by size (not shape)
        assert d.untyped_storage().data_ptr() == ptr
    assert pool.nbytes == 3 * 6 * 8
    ptrs = {t.untyped_storage().data_ptr() for t in (b, c, d)}
    del b, c, d, pool
    assert not ptrs & doublegrad_pool._LIVE  # forgotten with the pool


def _gpt():
    cfg = TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=2, num_heads=2)
    model = TorchGPT(cfg).to(torch.float64)
    model.init_weights(0)
    tok = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


class _ParamMatmul(torch.nn.Module):
    """An attention-like matmul whose second operand is a 3-d parameter: the forward node's ``db`` (a
    pooled result) is that parameter's gradient, passed on unchanged."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w = torch.nn.Parameter(torch.randn(3, 4, 6, dtype=torch.float64, generator=g))
        self.p = torch.nn.Parameter(torch.randn(3, 6, 5, dtype=torch.float64, generator=g) / 3)

    def forward(self, x):
        return F.gelu(torch.tanh(x @ self.w) @ self.p)


def _mm_loss(model, batch):
    return (model(batch["x"]) ** 2).mean()


@pytest.mark.parametrize("case", ["gpt", "param matmul"])
@pytest.mark.parametrize("reuse", [True, False])
def test_pooled_products_equal_stock_and_stay_valid(case, reuse, monkeypatch):
    """Every result of every routed node through the pool (MIN_NUMEL 1): three products with different
    vectors on one graph equal PyTorch's own double backward to 1e-12, and each product's result is
    unchanged after the later products (Lanczos keeps them)."""
    monkeypatch.setattr(doublegrad_pool, "MIN_NUMEL", 1)
    if case == "gpt":
        model, batch, loss = *_gpt(), torch_gpt_loss
    else:
        model, loss = _ParamMatmul(), _mm_loss
        batch = {"x": torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))}
    op = HessianOperator(copy.deepcopy(model), loss, batch, mode="exact", reuse_graph=reuse)
    monkeypatch.setattr(doublegrad, "ENABLED", False)
    stock = HessianOperator(copy.deepcopy(model), loss, batch, mode="exact", reuse_graph=reuse)
    vs = [op.backend.randn(s) for s in range(3)]
    refs = [stock.matvec(v) for v in vs]
    monkeypatch.setattr(doublegrad, "ENABLED", True)
    taken = []
    orig = Pool.take

    def spy(self, shape, like):
        out = orig(self, shape, like)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(Pool, "take", spy)
    outs = [op.matvec(v) for v in vs]
    assert sum(taken) > 0  # the pool was used
    for hv, ref in zip(outs, refs):  # all checked after the last product ran
        assert not any(owned(h) for h in hv)
        for a, b in zip(hv, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_outside_a_product_nothing_is_pooled(monkeypatch):
    """A backward through a routed graph outside ``hvp_exact``'s second backward (the create-graph one, a
    plain one, tests, pipeline stages) allocates as before: its results never live in a pool."""
    monkeypatch.setattr(doublegrad_pool, "MIN_NUMEL", 1)
    model, batch = _gpt()
    params = list(model.parameters())
    with doublegrad.cheap_double_backward(True):
        out = torch_gpt_loss(model, batch)
    g = torch.autograd.grad(out, params, create_graph=True)
    assert not any(owned(x) for x in g)
    hv = torch.autograd.grad(g, params, [torch.ones_like(p) for p in params], allow_unused=True)
    assert not any(owned(h) for h in hv)
