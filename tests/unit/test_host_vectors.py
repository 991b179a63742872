"""HessianOperator(vectors="host") and batch_split: the solver's vectors in host memory and the batch in
smaller parts, for the float32 fd evaluation of a bf16 model. Checked against the device-vector operator
(the same products bit for bit), a float64 copy of the model (exact products), and the memory counted
on the device and the host (memtrack.HostDeviceBytes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos
from lrscale_megatron.curvature import hostvectors as hv
from lrscale_megatron.curvature.batchsplit import split_batch
from lrscale_megatron.curvature.memtrack import HostDeviceBytes, fwd_bwd_peak
from tests.unit._tiny_gpt import tiny_gpt
from tests.unit._tiny_gpt import tiny_loss as gpt_loss

torch.set_num_threads(1)


def gpt(dtype=torch.bfloat16):
    return tiny_gpt(dtype)


def mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4)).to(dtype)
    x = torch.randn(64, 6).to(dtype)
    y = torch.randint(0, 4, (64,))
    return model, (lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]).float()), (x, y)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("basis", ["host", "recompute"])
def test_host_vectors_give_the_device_vectors_products_and_eigenvalue_bit_for_bit(basis):
    model, batch = gpt()
    dev = HessianOperator(model, gpt_loss, batch, mode="fd")
    host = HessianOperator(model, gpt_loss, batch, mode="fd", vectors="host")
    assert host.backend.host and host.backend.device.type == "cpu" and not dev.backend.host
    v = dev.backend.randn(3)
    pd, ph = dev.matvec(v), host.matvec(host.backend.as_vector(v, "v"))
    assert all(torch.equal(a, b) for a, b in zip(pd, ph))
    assert all(torch.equal(a, b) for a, b in zip(dev.base_gradient(), host.base_gradient()))
    rd = lanczos(dev, k=1, max_iter=40, tol=1e-2, seed=0, basis=basis)
    rh = lanczos(host, k=1, max_iter=40, tol=1e-2, seed=0, basis=basis)
    assert rh.converged and rd.converged, (rh.reason, rd.reason)
    assert rh.eigenvalues[0] == rd.eigenvalues[0] and rh.history == rd.history
    assert rh.n_matvec == rd.n_matvec
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("split", [1, 4])
@pytest.mark.parametrize("precondition", [False, True])
def test_host_vectors_and_split_match_a_float64_copy(split, precondition):
    m16, loss_fn, (x, y) = mlp(torch.bfloat16)
    m64 = copy.deepcopy(m16).double()  # the same (bf16-representable) weights in float64
    gen = torch.Generator().manual_seed(1)
    v_hat = [torch.rand(p.shape, generator=gen) for p in m16.parameters()]

    def solve(op, tol):
        a = PreconditionedOperator(op, v_hat, eps=1e-3) if precondition else op
        r = lanczos(a, k=1, max_iter=60, tol=tol, seed=0)
        assert r.converged, r.reason
        return r.eigenvalues[0]

    ref = solve(HessianOperator(m64, loss_fn, (x.double(), y), mode="exact"), 1e-8)
    op = HessianOperator(m16, loss_fn, (x, y), mode="fd", vectors="host", batch_split=split)
    assert len(op.microbatches) == split
    got = solve(op, 1e-3)
    assert rel(got, ref) < 2e-3, (got, ref)


def test_batch_split_measures_the_same_hessian_and_refuses_what_it_cannot_split():
    model, loss_fn, (x, y) = mlp(torch.float64)
    mask = torch.ones(6)  # a leaf of another leading size goes unchanged to every part
    whole = HessianOperator(model, lambda m, b: loss_fn(m, b[:2]), (x, y, mask), mode="exact")
    parts = HessianOperator(model, lambda m, b: loss_fn(m, b[:2]), (x, y, mask), mode="exact", batch_split=8)
    assert [p[0].shape[0] for p in parts.microbatches] == [8] * 8
    assert all(p[2] is mask for p in parts.microbatches)
    v = whole.backend.randn(1)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(whole.matvec(v), parts.matvec(v)))
    with pytest.raises(ValueError, match=r"batch_split=5 does not divide the batch size 64"):
        split_batch((x, y), 5)
    with pytest.raises(ValueError, match=r"no tensor with a batch dimension"):
        split_batch({"a": 1.0}, 2)
    with pytest.raises(ValueError, match=r"batch_split=0 must be an integer >= 1"):
        split_batch((x, y), 0)
    with pytest.raises(ValueError, match=r"batch_split=2 with a grad_fn"):
        HessianOperator(model, loss_fn, (x, y), mode="fd", grad_fn=lambda: (0.0, []), batch_split=2)


def test_host_vectors_refused_where_they_do_not_apply():
    m16, loss_fn, batch = mlp(torch.bfloat16)
    with pytest.raises(ValueError, match=r"vectors='host'\) supports mode='fd' only.*mode='exact'"):
        HessianOperator(m16, loss_fn, batch, mode="exact", vectors="host")
    m32, loss_fn, batch = mlp(torch.float32)
    with pytest.raises(ValueError, match=r"vectors='host'\) is for bfloat16/float16.*use vectors='device'"):
        HessianOperator(m32, loss_fn, batch, mode="fd", vectors="host")
    with pytest.raises(ValueError, match=r"vectors='gpu' is not one of"):
        HessianOperator(m32, loss_fn, batch, mode="fd", vectors="gpu")


def _measure(model, batch, max_iter, **kw):
    op = HessianOperator(model, gpt_loss, batch, mode="fd", **kw)
    with HostDeviceBytes() as mem:
        r = lanczos(op, k=1, max_iter=max_iter, tol=0.0, seed=0, return_vectors=True, basis="host")
        op.release()
        del r
    return mem


def test_host_vectors_device_memory_is_independent_of_max_iter_and_below_the_device_vectors():
    model, batch = gpt()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    train = fwd_bwd_peak(model, gpt_loss, batch)
    dev6 = _measure(model, batch, 6)
    h6, h12 = _measure(model, batch, 6, vectors="host"), _measure(model, batch, 12, vectors="host")
    s6 = _measure(model, batch, 6, vectors="host", batch_split=4)
    assert h6.peak == h12.peak  # nothing on the device grows with max_iter
    assert h12.host_peak - h6.host_peak == 6 * 4 * n  # the host basis: 6 more float32 rows
    # the float32 leaves and the float32 gradient are on the device at the end of each backward
    assert h6.peak >= 8 * n
    # the vectors alive at the device peak (q and the base gradient: 2 float32 vectors) left the device
    assert dev6.peak - h6.peak >= 2 * 4 * n
    assert h6.host_peak >= 6 * 4 * n + 3 * 4 * n
    assert s6.peak < h6.peak and (s6.peak - train) / (2 * n) < 4.0  # within 4 x bf16 parameter bytes


def test_host_accounting_counts_a_device_tensor_left_alive_as_device(monkeypatch):
    """The split is honest: a device gradient that to_host failed to free stays counted on the device."""
    model, batch = gpt()
    n = sum(p.numel() for p in model.parameters())
    kept: list[torch.Tensor] = []
    real = hv.to_host

    def leaky(be, g):
        kept.extend(g)  # a reference the copy should have dropped
        return real(be, g)

    honest = _measure(model, batch, 4, vectors="host")
    monkeypatch.setattr(hv, "to_host", leaky)
    with HostDeviceBytes() as mem:
        op = HessianOperator(model, gpt_loss, batch, mode="fd", vectors="host")
        lanczos(op, k=1, max_iter=4, tol=0.0, seed=0, basis="host")
        op.release()
        assert mem.live >= len(kept) // len(op.params) * 4 * n  # every leaked float32 gradient, on the device
    assert mem.peak >= honest.peak
    assert mem.host_peak <= honest.host_peak + 4 * n


def test_online_measurement_with_host_vectors_matches_device_vectors():
    """measure_lambda_max as the scheduler runs it (Adam-preconditioned, gradient-informed start, warm
    start store): host vectors give the device vectors' estimate and warm-start vector bit for bit; in two
    parts, the same eigenvalue within the tolerance."""
    from lrscale_megatron.measurement import WarmStart, measure_lambda_max

    model, batch = gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gpt_loss(model, batch).backward()
    opt.step()
    est, ys = {}, {}
    for vectors in ("device", "host"):
        warm = WarmStart()
        est[vectors] = measure_lambda_max(
            model, gpt_loss, batch, mode="fd", tol=3e-2, optimizer=opt, warm=warm, vectors=vectors
        )
        assert est[vectors].converged, est[vectors].reason
        (y,) = warm._vectors.values()
        ys[vectors] = y
    assert est["host"].lambda_max == est["device"].lambda_max
    assert est["host"].n_matvec == est["device"].n_matvec
    assert all(torch.equal(a, b) for a, b in zip(ys["host"], ys["device"]))
    split = measure_lambda_max(
        model, gpt_loss, batch, mode="fd", tol=3e-2, optimizer=opt, vectors="host", batch_split=2
    )
    assert split.converged and rel(split.lambda_max, est["device"].lambda_max) < 3e-2


def test_a_block_of_a_host_vector_operator_keeps_host_vectors_and_its_eigenvalue():
    from lrscale_megatron.curvature import BlockOperator, transformer_blocks

    model, batch = gpt()
    dev = HessianOperator(model, gpt_loss, batch, mode="fd")
    host = HessianOperator(model, gpt_loss, batch, mode="fd", vectors="host")
    idx = transformer_blocks(host.backend)["layers.1"]
    bd, bh = BlockOperator(dev, idx), BlockOperator(host, idx)
    assert bh.backend.host and not bd.backend.host
    rd = lanczos(bd, k=1, max_iter=40, tol=1e-2, seed=0)
    rh = lanczos(bh, k=1, max_iter=40, tol=1e-2, seed=0)
    assert rh.converged and rh.eigenvalues[0] == rd.eigenvalues[0]
    restricted = host.restrict([n for n, _ in host.named_params][:3])
    assert restricted.backend.host
