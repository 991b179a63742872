"""HessianOperator._accumulate: the first micro-batch's gradients are adopted without a copy only when
that is safe (fresh, contiguous, each tensor once, in the vector dtype), copied otherwise."""

from __future__ import annotations

import torch

from lrscale_megatron.curvature import HessianOperator


def _op(dtype=torch.float32, n_mb=1):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)
    batch = [torch.randn(5, 4, dtype=dtype) for _ in range(n_mb)]
    op = HessianOperator(model, lambda m, b: m(b).pow(2).mean(), batch if n_mb > 1 else batch[0], mode="fd")
    return op, batch


def test_fresh_gradients_adopted_without_copy():
    op, (x,) = _op()
    g = list(torch.autograd.grad(op.loss_fn(op.model, x), op.params))
    ref = [t.clone() for t in g]
    out = op._accumulate(None, g, 1)
    assert [t.data_ptr() for t in out] == [t.data_ptr() for t in g]
    assert all(not t.requires_grad and t.dtype == torch.float32 for t in out)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_one_tensor_twice_is_copied_once():
    op, _ = _op()
    shared = torch.ones(3, 4)
    # the same tensor for two inputs (autograd does this for both sides of an add)
    ts = [shared, shared, torch.ones(2, 3), torch.ones(2)]
    out = op._accumulate(None, ts, 1)
    assert out[0].data_ptr() == shared.data_ptr()
    ptrs = [t.data_ptr() for t in out]
    assert len(set(ptrs)) == len(ptrs), "two vector entries share storage"
    out[0].mul_(3.0)
    assert all(torch.equal(t, torch.ones_like(t)) for t in out[1:])


def test_not_fresh_noncontiguous_and_other_dtype_are_copied():
    op, _ = _op()
    bufs = [torch.randn(p.shape) for p in op.params]
    out = op._accumulate(None, bufs, 1, fresh=False)  # e.g. a grad_fn's own .grad buffers
    assert all(a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in zip(out, bufs))
    w = op.params[0]
    nc = torch.randn(w.shape[1], w.shape[0]).t()  # non-contiguous
    ts = [nc] + [torch.randn(p.shape, dtype=torch.float64) for p in op.params[1:]]
    out = op._accumulate(None, ts, 1)
    assert out[0].is_contiguous() and out[0].data_ptr() != nc.data_ptr() and torch.equal(out[0], nc)
    assert all(a.dtype == torch.float32 and torch.equal(a, b.float()) for a, b in zip(out[1:], ts[1:]))


def test_requires_grad_output_is_detached_same_storage():
    op, (x,) = _op()
    g = list(torch.autograd.grad(op.loss_fn(op.model, x), op.params, create_graph=True))
    assert all(t.requires_grad for t in g)
    out = op._accumulate(None, g, 1)
    assert all(not t.requires_grad for t in out)
    assert [t.data_ptr() for t in out] == [t.data_ptr() for t in g]


def test_micro_batch_mean_matches_float64_reference():
    op, batch = _op(n_mb=3)
    _, g = op.loss_and_grad()
    m64 = [p.detach().double().requires_grad_(True) for p in op.params]

    def loss64(b):
        h = torch.tanh(b.double() @ m64[0].T + m64[1])
        return (h @ m64[2].T + m64[3]).pow(2).mean()

    ref = [sum(gs) / 3 for gs in zip(*[torch.autograd.grad(loss64(b), m64) for b in batch])]
    for a, r in zip(g, ref):
        torch.testing.assert_close(a.double(), r, rtol=1e-6, atol=1e-7)
