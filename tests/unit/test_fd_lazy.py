"""Lazy restore of the fd anchor (``curvature/anchor.py``) and the Lanczos norm hint (``norm_hint.py``).

Inside a solve an fd product leaves the parameters at ``theta0 + h v`` and the next one writes from
``theta0``; ``theta0`` must be back, bit for bit, before anything else evaluates or reads the parameters
(the solver's callback, the operator's own base gradient / loss / ``||theta||``, another operator's
product on the same parameters, the end of the solve, an exception or ``KeyboardInterrupt`` in
``loss_fn``). Each is checked against a reference that never anchors (``fd_restore="subtract"`` on a copy
of the model: same steps, so the same bits).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos, norm_hint
from lrscale_megatron.curvature.anchor import Anchor
from lrscale_megatron.curvature.blocks import BlockOperator, transformer_blocks
from lrscale_megatron.curvature.solve_scope import DIRTY, solve_scope
from tests.unit._tiny_gpt import tiny_gpt as _gpt
from tests.unit._tiny_gpt import tiny_loss as _loss


def _bits(ts):
    return [t.detach().clone().contiguous().view(torch.int32) for t in ts]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def restores(monkeypatch):
    """Counts the anchor's restores (copies of theta0 back into the parameters)."""
    n = [0]
    orig = Anchor.restore_

    def counted(self):
        n[0] += 1
        return orig(self)

    monkeypatch.setattr(Anchor, "restore_", counted)
    return n


def test_a_solve_restores_once_and_equals_the_subtract_solve_bit_for_bit(restores):
    model, batch = _gpt()
    before = _bits(model.parameters())
    op = HessianOperator(model, _loss, batch, mode="fd")
    ref = HessianOperator(copy.deepcopy(model), _loss, batch, mode="fd", fd_restore="subtract")
    r = lanczos(op, k=1, max_iter=6, tol=0.0, basis="host", return_vectors=True)
    r_ref = lanczos(ref, k=1, max_iter=6, tol=0.0, basis="host", return_vectors=True)
    assert r.n_matvec == 6 and restores[0] == 1  # lazy: theta0 copied back once, when the solve ended
    assert r.history == r_ref.history and r.eigenvalues == r_ref.eigenvalues
    assert _same(r.eigenvectors[0], r_ref.eigenvectors[0])
    assert _same(_bits(model.parameters()), before) and op._anchor is None and not DIRTY


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_exception_in_loss_fn_mid_solve_puts_every_bit_back(exc):
    model, batch = _gpt()
    before = _bits(model.parameters())
    calls = [0]

    def loss(m, b):
        calls[0] += 1
        if calls[0] == 4:  # base gradient, 2 products left lazily perturbed, then the 3rd product raises
            raise exc("boom")
        return _loss(m, b)

    op = HessianOperator(model, loss, batch, mode="fd")
    with pytest.raises(exc):
        lanczos(op, k=1, max_iter=6, tol=0.0, basis="host")
    assert calls[0] == 4 and _same(_bits(model.parameters()), before)
    assert op._anchor is None and op.restore_mode == "subtract" and not DIRTY


def test_an_exception_between_products_puts_every_bit_back():
    """Raised by the solver itself between two products (here: the host basis), not by the operator."""
    model, batch = _gpt()
    before = _bits(model.parameters())
    op = HessianOperator(model, _loss, batch, mode="fd")
    seen = []
    orig = op.matvec

    def matvec(v):
        out = orig(v)
        seen.append(_same(_bits(model.parameters()), before))  # False: left at theta0 + h v
        if len(seen) == 3:
            raise KeyboardInterrupt
        return out

    op.matvec = matvec  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        lanczos(op, k=1, max_iter=6, tol=0.0, basis="host")
    assert seen == [False, False, False]  # the products really were left perturbed (lazy)
    assert _same(_bits(model.parameters()), before) and not DIRTY


def test_the_callback_sees_theta0_and_a_parameter_it_moves_is_kept():
    model, batch = _gpt()
    before = _bits(model.parameters())
    op = HessianOperator(model, _loss, batch, mode="fd")
    at_callback = []

    def cb(it, _vals):
        at_callback.append(_same(_bits(model.parameters()), before))
        if it == 3:
            with torch.no_grad():
                model.ln_f.weight.add_(1e-3)  # e.g. a user's step: never reverted
            moved.extend(_bits(model.parameters()))

    moved: list[torch.Tensor] = []
    lanczos(op, k=1, max_iter=5, tol=0.0, basis="host", callback=cb)
    assert at_callback == [True, True, True, False, False]
    assert _same(_bits(model.parameters()), moved)  # the moved weight stayed moved
    seen = []
    lanczos(op, 1, 3, 0.0, 0, "LA", None, False, None, lambda *a: seen.append(_bits(model.parameters())))
    assert len(seen) == 3 and all(_same(s, moved) for s in seen)  # a positional callback is wrapped too
    assert _same(_bits(model.parameters()), moved)

    def own_product(it, _vals):  # a callback that runs a product of the solve's operator itself
        op.matvec(op.backend.randn(it))
        seen.append(_bits(model.parameters()))

    seen.clear()
    lanczos(op, k=1, max_iter=3, tol=0.0, basis="host", callback=own_product)
    assert len(seen) == 3 and all(_same(s, moved) for s in seen)  # restored eagerly inside the callback


def test_loss_base_gradient_and_theta_norm_asked_mid_solve_are_at_theta0():
    from lrscale_megatron.curvature.products import _param_norm

    model, batch = _gpt()
    before = _bits(model.parameters())
    ref = HessianOperator(copy.deepcopy(model), _loss, batch, mode="fd", fd_restore="subtract")
    loss0, g0 = ref.loss_and_grad()
    op = HessianOperator(model, _loss, batch, mode="fd")
    v = op.backend.randn(1)
    with solve_scope():
        assert op.allow_anchor()
        op.matvec(v)
        assert not _same(_bits(model.parameters()), before) and DIRTY  # lazily left at theta0 + h v
        loss, g = op.loss_and_grad()  # settles first
        assert loss == loss0 and _same(g, g0) and _same(_bits(model.parameters()), before)
        op.matvec(v)
        op._base, op._theta_norm = None, None  # forced to recompute while perturbed
        assert _same(op.base_gradient(), g0) and _same(_bits(model.parameters()), before)
        op.matvec(v)
        op._theta_norm = None
        assert _param_norm(op) == _param_norm(ref)
        op.matvec(v)
        n_grad = op.n_grad
        assert _same(op.matvec(v), ref.matvec(v))  # the cached base gradient kept across lazy products
        assert op.n_grad == n_grad + 1
    assert _same(_bits(model.parameters()), before) and not DIRTY  # settled when the scope ended
    op.drop_anchor()


def test_another_operator_on_the_same_parameters_settles_the_anchor_first():
    """Mid-solve, a restricted fd operator and an exact operator on the shared parameters evaluate at
    theta0; the first operator's next product is still right."""
    model, batch = _gpt()
    twin = copy.deepcopy(model)
    ref = HessianOperator(twin, _loss, batch, mode="fd", fd_restore="subtract")
    op = HessianOperator(model, _loss, batch, mode="fd")
    names = [n for n, _ in op.named_params if n.startswith("blocks.0.") or ".0." in n][:4]
    assert names
    sub, sub_ref = op.restrict(names), ref.restrict(names)
    ex = HessianOperator(model, _loss, batch, mode="exact")
    ex_ref = HessianOperator(twin, _loss, batch, mode="exact")
    v, w = op.backend.randn(1), sub.backend.randn(2)
    hv_ref, sub_w, ex_v = ref.matvec(v), sub_ref.matvec(w), ex_ref.matvec(v)
    with solve_scope():  # (any operator's product settles every dirty anchor: compute references first)
        op.allow_anchor()
        assert _same(op.matvec(v), hv_ref) and DIRTY
        assert _same(sub.matvec(w), sub_w)  # at theta0, not theta0 + h v
        assert not DIRTY
        assert _same(op.matvec(v), hv_ref) and DIRTY
        assert _same(ex.matvec(v), ex_v)
        assert _same(op.matvec(v), hv_ref)
    op.drop_anchor()
    assert _same(_bits(model.parameters()), _bits(twin.parameters()))


def test_a_nested_solve_on_a_restricted_operator_inside_the_callback():
    model, batch = _gpt()
    before = _bits(model.parameters())
    ref = lanczos(
        HessianOperator(copy.deepcopy(model), _loss, batch, mode="fd", fd_restore="subtract"),
        k=1,
        max_iter=5,
        tol=0.0,
        basis="host",
    )
    op = HessianOperator(model, _loss, batch, mode="fd")
    inner = op.restrict([n for n, _ in op.named_params][:3])
    inner_vals = []

    def cb(it, _vals):
        inner_vals.append(lanczos(inner, k=1, max_iter=3, tol=0.0, basis="host").eigenvalues[0])

    r = lanczos(op, k=1, max_iter=5, tol=0.0, basis="host", callback=cb)
    assert r.history == ref.history  # the outer solve did not see the inner one
    assert len(set(inner_vals)) == 1  # every inner solve measured at theta0
    assert _same(_bits(model.parameters()), before) and not DIRTY


@pytest.mark.parametrize("wrap", ["block", "preconditioned"])
def test_block_and_preconditioned_solves_anchor_lazily_and_equal_subtract(wrap, restores):
    model, batch = _gpt()
    before = _bits(model.parameters())

    def build(m, restore):
        hop = HessianOperator(m, _loss, batch, mode="fd", fd_restore=restore)
        if wrap == "block":
            idx = transformer_blocks(hop.backend)["layers.1"]
            return hop, BlockOperator(hop, idx)
        g = torch.Generator().manual_seed(3)
        return hop, PreconditionedOperator(hop, [torch.rand(p.shape, generator=g) for p in hop.params])

    hop, op = build(model, "auto")
    _, op_ref = build(copy.deepcopy(model), "subtract")
    modes = []
    orig = hop.matvec

    def matvec(v):
        modes.append(hop.restore_mode)
        return orig(v)

    hop.matvec = matvec  # type: ignore[method-assign]
    r = lanczos(op, k=1, max_iter=5, tol=0.0, basis="host")
    r_ref = lanczos(op_ref, k=1, max_iter=5, tol=0.0, basis="host")
    assert set(modes) == {"anchor"} and restores[0] == 1  # forwarded; one restore when the solve ended
    assert r.history == r_ref.history
    assert _same(_bits(model.parameters()), before) and hop._anchor is None and not DIRTY


def test_norm_hint_only_for_the_same_unchanged_tensors():
    model, batch = _gpt()
    op = HessianOperator(model, _loss, batch, mode="fd")
    v = op.backend.randn(0)
    n = op.backend.norm(v)
    v = [x / n for x in v]
    plain = op.matvec(v)
    norm_hint.remember(v, 1.0)
    assert norm_hint.recall(v) == 1.0 and norm_hint.recall(list(v)) == 1.0
    assert _same(op.matvec(v), plain)  # the same power-of-two step: the same bits
    assert norm_hint.recall([x.clone() for x in v]) is None  # other tensors, equal values
    v[0].mul_(2.0)
    assert norm_hint.recall(v) is None  # changed in place since
    v[0].fill_(float("nan"))
    out = op.matvec(v)
    assert all(torch.isnan(x).all() for x in out)  # a NaN vector still gives a NaN product
    norm_hint.remember([1.0, 2.0], 1.0)  # not tensors (JAX arrays have no _version): never remembered
    assert norm_hint.recall([1.0, 2.0]) is None


def test_a_nan_start_vector_is_still_reported():
    model, batch = _gpt()
    op = HessianOperator(model, _loss, batch, mode="fd")
    v0 = op.backend.randn(0)
    v0[0][0] = float("nan")
    r = lanczos(op, k=1, max_iter=4, tol=0.0, basis="host", v0=v0)
    assert not r.converged and "non-finite" in (r.reason or "")


def test_an_interrupted_write_is_restored_whatever_the_key_says(monkeypatch):
    model, _ = _gpt()
    params = list(model.parameters())
    before = _bits(params)
    anchor = Anchor(params)
    v = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    anchor.perturb_(v, 2.0**-3)  # dirty, its key taken after the write
    real, n = torch.add, [0]

    def add(*a, **k):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt  # two tensors rewritten (new versions), the rest still theta0 + h v
        return real(*a, **k)

    monkeypatch.setattr(torch, "add", add)
    with pytest.raises(KeyboardInterrupt):
        anchor.perturb_(v, 2.0**-2)
    monkeypatch.undo()
    assert anchor.written and not anchor.matches(params) and id(anchor) in DIRTY
    anchor.settle()  # the key is the old one, but the write was its own: theta0 back
    assert _same(_bits(params), before) and not anchor.stale and id(anchor) not in DIRTY
