"""The fd anchor (``curvature/anchor.py``): one copy of the parameters per solve, restored by a copy.

Checked against the other restore mode (subtraction, same step: the products must be bit-identical),
bit for bit on the parameters after every product and after an exception mid-product, its lifetime (gone
after every solve, never written back over parameters changed between solves, also by ``p.data.copy_``,
which does not bump ``_version``), which mode ``fd_restore="auto"`` picks, and its counted memory.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, hostbasis, lanczos
from lrscale_megatron.curvature.memtrack import HostDeviceBytes
from lrscale_megatron.preflight import measurement_memory
from tests.unit._tiny_gpt import tiny_gpt as _gpt
from tests.unit._tiny_gpt import tiny_loss as _loss


class _Odd(torch.nn.Module):
    """Awkward parameters: -0.0, subnormals, a transposed (non-contiguous) weight, a float64 bias."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        w = torch.randn(6, 5, generator=g)
        w[0, 0], w[0, 1], w[1, 0] = -0.0, 1e-40, -3e-39  # -0.0 and float32 subnormals
        self.w = torch.nn.Parameter(w)
        self.u = torch.nn.Parameter(torch.randn(5, 6, generator=g).t())  # non-contiguous
        self.b = torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))

    def forward(self, x):
        y = torch.tanh(x @ self.w.t()) @ self.u
        return (y.double() + self.b).pow(2).sum()


def _bits(ts):
    return [
        t.detach().clone().contiguous().view(torch.int64 if t.dtype == torch.float64 else torch.int32)
        for t in ts
    ]


def _same_bits(a, b):
    return all(torch.equal(x, y) for x, y in zip(_bits(a), _bits(b)))


@pytest.mark.parametrize("which", ["gpt32", "gpt32-central", "gpt64", "odd"])
def test_anchor_products_equal_subtract_products_bit_for_bit(which):
    if which == "odd":
        model = _Odd()
        assert not model.u.is_contiguous()
        batch, loss = torch.randn(3, 5, generator=torch.Generator().manual_seed(2)), lambda m, x: m(x)
    else:
        model, batch = _gpt(torch.float64 if which == "gpt64" else torch.float32)
        loss = _loss
    scheme = "central" if which.endswith("central") else "forward"
    a = HessianOperator(copy.deepcopy(model), loss, batch, mode="fd", fd_scheme=scheme)  # fd_restore="auto"
    s = HessianOperator(copy.deepcopy(model), loss, batch, mode="fd", fd_scheme=scheme, fd_restore="subtract")
    assert a.fd_restore == "auto" and a.restore_mode == "subtract"  # no solver has lent the room
    assert a.allow_anchor() and a.restore_mode == "anchor"
    before = _bits(a.params)
    for seed in range(3):
        v = a.backend.randn(seed)
        v = [x * (0.5 + seed) for x in v]  # not unit: another step h each time
        ha, hs = a.matvec(v), s.matvec(v)
        assert all(torch.equal(x, y) for x, y in zip(ha, hs)), seed  # same h: the same bits
        assert all(torch.equal(x, y) for x, y in zip(_bits(a.params), before)), seed  # restored bit for bit
    # one anchor for every product; forward: one base gradient for all, central: two gradients each
    assert a._anchor is not None and a.n_grad == s.n_grad == (6 if scheme == "central" else 4)
    a.release()
    assert a._anchor is None and a.restore_mode == "subtract"


def test_an_exception_inside_a_product_still_restores_every_bit():
    model, batch = _gpt()
    boom = {"on": False}

    def loss(m, b):
        if boom["on"]:
            raise RuntimeError("boom")
        return _loss(m, b)

    op = HessianOperator(model, loss, batch, mode="fd")
    op.allow_anchor()
    v = op.backend.randn(0)
    op.matvec(v)  # base gradient and anchor taken
    before = _bits(op.params)
    boom["on"] = True
    with pytest.raises(RuntimeError, match="boom"):
        op.matvec(v)
    assert all(torch.equal(x, y) for x, y in zip(_bits(op.params), before))
    boom["on"] = False
    ref = HessianOperator(copy.deepcopy(model), _loss, batch, mode="fd", fd_restore="subtract")
    assert all(torch.equal(x, y) for x, y in zip(op.matvec(v), ref.matvec(v)))  # and products go on right


def _modes_seen(op):
    seen: list[str] = []
    inner = op.op if isinstance(op, PreconditionedOperator) else op
    orig = inner.matvec

    def matvec(v):
        seen.append(inner.restore_mode)
        return orig(v)

    inner.matvec = matvec
    return seen


@pytest.mark.parametrize("precondition", [False, True])
def test_auto_anchors_only_inside_a_host_basis_solve(precondition, monkeypatch):
    model, batch = _gpt()
    before = _bits(model.parameters())
    hop = HessianOperator(model, _loss, batch, mode="fd")
    op = PreconditionedOperator(hop, [torch.rand(p.shape) for p in hop.params]) if precondition else hop
    seen = _modes_seen(op)
    r = lanczos(op, k=1, max_iter=5, tol=0.0, basis="auto", return_vectors=True)
    assert r.n_matvec == len(seen) == 5 and set(seen) == {"anchor"}, seen  # the host basis has room here
    assert hop._anchor is None and hop.restore_mode == "subtract"  # dropped when the solve ended
    for basis in ("recompute", "keep"):
        seen.clear()
        lanczos(op, k=1, max_iter=5, tol=0.0, basis=basis)
        assert set(seen) == {"subtract"}, (basis, seen)  # the second pass / a kept basis: no room lent
    monkeypatch.setattr(hostbasis, "host_budget", lambda: (1000, "a test budget of 1000 bytes"))
    seen.clear()
    lanczos(op, k=1, max_iter=5, tol=0.0, basis="auto")  # falls back to the second pass
    assert set(seen) == {"subtract"}, seen
    assert hop._anchor is None and _same_bits(model.parameters(), before)


def test_the_anchor_is_dropped_when_a_solve_raises():
    model, batch = _gpt()
    op = HessianOperator(model, _loss, batch, mode="fd")
    before = _bits(op.params)

    def stop(it, _vals):
        assert op._anchor is not None  # taken by the first product of this host-basis solve
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lanczos(op, k=1, max_iter=5, tol=0.0, basis="host", callback=stop)
    assert op._anchor is None and op.restore_mode == "subtract"
    assert all(torch.equal(x, y) for x, y in zip(_bits(op.params), before))


def test_bf16_and_explicit_modes_never_anchor():
    model, batch = _gpt(torch.bfloat16)
    assert not HessianOperator(model, _loss, batch, mode="fd").allow_anchor()  # fp32 substitutes instead
    m32, b32 = _gpt()
    for restore in ("subtract", "copy"):
        op = HessianOperator(m32, _loss, b32, mode="fd", fd_restore=restore)
        assert not op.allow_anchor() and op.restore_mode == restore
    assert not HessianOperator(m32, _loss, b32, mode="exact").allow_anchor()
    with pytest.raises(ValueError, match="fd_restore='anchor'"):
        HessianOperator(m32, _loss, b32, mode="fd", fd_restore="anchor")


@pytest.mark.parametrize("how", ["copy_", "add_"])
def test_parameters_changed_between_solves_are_never_reverted(how):
    """An optimizer step between two solves (``p.data.copy_``: no ``_version`` bump; or in place): the
    second solve measures the new parameters and leaves them as they are."""
    model, batch = _gpt()
    op = HessianOperator(model, _loss, batch, mode="fd")
    r1 = lanczos(op, k=1, max_iter=4, tol=0.0, basis="host")
    assert op._anchor is None
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            step = 1e-2 * torch.randn(p.shape, generator=g)
            if how == "copy_":
                p.data.copy_(p.data + step)
            else:
                p.add_(step)
    stepped = _bits(model.parameters())
    op._base = None  # the cached base gradient is keyed on _version, which a .data write does not bump
    r2 = lanczos(op, k=1, max_iter=4, tol=0.0, basis="host")
    assert all(torch.equal(x, y) for x, y in zip(_bits(model.parameters()), stepped))
    fresh = HessianOperator(copy.deepcopy(model), _loss, batch, mode="fd", fd_restore="subtract")
    r3 = lanczos(fresh, k=1, max_iter=4, tol=0.0, basis="recompute")
    assert r2.history == r3.history and r2.history != r1.history


def test_a_parameter_moved_within_a_solve_makes_the_anchor_stale():
    """Between two products of one solve (not something a solver does, but a callback could): a change in
    place, or a parameter re-allocated, is seen by the anchor's key; the new values are kept."""
    model, batch = _gpt()
    op = HessianOperator(model, _loss, batch, mode="fd")
    op.allow_anchor()
    v = op.backend.randn(0)
    op.matvec(v)
    first = op._anchor
    with torch.no_grad():
        op.params[0].add_(1.0)
    kept = _bits(op.params)
    op.matvec(v)
    assert op._anchor is not first and all(torch.equal(x, y) for x, y in zip(_bits(op.params), kept))
    second = op._anchor
    p = op.params[1]
    p.data = p.data.clone() + 1.0  # a new storage (data_ptr), no version bump on the old one
    kept = _bits(op.params)
    op.matvec(v)
    assert op._anchor is not second and all(torch.equal(x, y) for x, y in zip(_bits(op.params), kept))
    op.drop_anchor()


def test_anchor_memory_is_one_parameter_vector_counted():
    """Device peak of a host-basis fd measurement with the anchor (auto) minus without (subtract): one
    vector of parameter bytes, as ``measurement_memory`` counts it."""
    model, batch = _gpt()
    n = sum(p.numel() for p in model.parameters())
    peaks = {}
    for restore in ("auto", "subtract"):
        op = HessianOperator(model, _loss, batch, mode="fd", fd_restore=restore)
        with HostDeviceBytes() as mem:
            r = lanczos(op, k=1, max_iter=4, tol=0.0, basis="host", return_vectors=True)
            op.release()
            del r
        peaks[restore] = mem.peak
    est = {
        r: measurement_memory(n, mode="fd", param_bytes=4, precondition=False, basis="host", fd_restore=r)
        for r in ("auto", "subtract")
    }
    assert est["auto"].total_bytes - est["subtract"].total_bytes == 4 * n
    assert peaks["auto"] - peaks["subtract"] == pytest.approx(4 * n, rel=0.03), (peaks, 4 * n)
    recompute = measurement_memory(n, mode="fd", param_bytes=4, precondition=False)
    assert est["auto"].total_bytes < recompute.total_bytes  # 3 vectors, under the fallback's 4


def test_anchor_refuses_a_step_that_is_not_a_power_of_two_before_writing():
    from lrscale_megatron.curvature.anchor import Anchor

    model = _Odd()
    params = list(model.parameters())
    before = _bits(params)
    anchor = Anchor(params)
    v = [torch.randn(p.shape, dtype=torch.float32) for p in params]
    with pytest.raises(ValueError, match="not a normal power of two"):
        anchor.perturb_(v, 0.3)
    assert all(torch.equal(x, y) for x, y in zip(_bits(params), before))
    anchor.restore_()
    anchor.perturb_(v, 2.0**-3)
    anchor.perturb_(v, 2.0**-2)  # over the last write (lazy restore): from theta0, not compounded
    with torch.no_grad():
        want = [torch.add(t0, vi.to(t0.dtype), alpha=2.0**-2) for t0, vi in zip(anchor.theta0, v)]
    assert _same_bits(params, want) and anchor.matches(params)  # its own write
    anchor.restore_()
    assert anchor.matches(params) and all(torch.equal(x, y) for x, y in zip(_bits(params), before))
    anchor.perturb_(v, 2.0**-3)
    with torch.no_grad():
        params[0].add_(1.0)  # moved while perturbed: kept, never overwritten by theta0
    moved = _bits(params)
    anchor.settle()
    assert anchor.stale and not anchor.written
    assert all(torch.equal(x, y) for x, y in zip(_bits(params), moved))
    with pytest.raises(RuntimeError, match="stale"):
        anchor.perturb_(v, 2.0**-3)
