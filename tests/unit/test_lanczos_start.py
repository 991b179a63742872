"""The gradient-informed cold start (``curvature/start.py``): never a wrong value passed as converged when
the gradient hides the top eigenvector, the gradient in the operator's own coordinates, and
``measure_lambda_max`` against a dense reference."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos
from lrscale_megatron.curvature.start import gradient_start, operator_gradient
from lrscale_megatron.measurement import measure_lambda_max
from lrscale_megatron.parallel import ParallelContext
from tests.unit.test_algorithms import DenseOperator


def _spectrum(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric ``A = Q diag(lam) Q^T``: lambda_1 = 10, lambda_2 = 8, the rest in [0, 5]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.concatenate([[10.0, 8.0], 5.0 * rng.random(n - 2)])
    return q @ np.diag(lam) @ q.T, q


class GradOperator(DenseOperator):
    """A dense operator with a chosen "base gradient" (what a fd HessianOperator caches)."""

    def __init__(self, a: np.ndarray, g: np.ndarray) -> None:
        super().__init__(a)
        self.g = self.split(g)

    def split(self, x: np.ndarray) -> list[torch.Tensor]:
        out, o = [], 0
        for s in self.shapes:
            m = int(np.prod(s))
            out.append(torch.from_numpy(x[o : o + m].copy()).reshape(s))
            o += m
        return out

    def base_gradient(self) -> list[torch.Tensor]:
        return self.g


@pytest.mark.parametrize("which", ["second", "interior"])
def test_a_gradient_orthogonal_to_the_top_eigenvector_is_not_passed_as_converged(which):
    n = 200
    a, q = _spectrum(n, seed=0)
    g = q[:, 1] if which == "second" else q[:, 1] + 3.0 * q[:, 7] + q[:, 50]  # q[:, 0] . g == 0
    # the danger the random half guards against: started along g alone, Lanczos "converges" to 8
    alone = lanczos(GradOperator(a, g), k=1, max_iter=60, tol=1e-3, v0=GradOperator(a, g).split(g))
    if which == "second":
        assert alone.converged and alone.eigenvalues[0] == pytest.approx(8.0, rel=1e-9)
    for seed in range(6):
        op = GradOperator(a, g)
        v0, how = gradient_start(op, seed)
        assert v0 is not None and how == "gradient + random"
        res = lanczos(op, k=1, max_iter=60, tol=1e-3, seed=seed, v0=v0)
        assert res.converged, res.reason
        assert res.eigenvalues[0] == pytest.approx(10.0, rel=3e-3)


def test_gradient_start_is_the_normalised_sum_and_refuses_a_zero_gradient():
    n = 40
    a, q = _spectrum(n, seed=1)
    op = GradOperator(a, 5.0 * q[:, 0])
    v0, _ = gradient_start(op, seed=3)
    r = op.backend.randn(3)
    want = q[:, 0] + op.flat(r) / np.linalg.norm(op.flat(r))
    np.testing.assert_allclose(op.flat(v0), want, rtol=1e-12, atol=1e-12)
    assert gradient_start(GradOperator(a, np.zeros(n)), 0)[0] is None  # nothing to start from: random
    assert operator_gradient(DenseOperator(a)) is None


class Quad(torch.nn.Module):
    def __init__(self, x: np.ndarray) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.from_numpy(x.copy()))


def _quad_loss(b: np.ndarray, c: np.ndarray):
    bt, ct = torch.from_numpy(b), torch.from_numpy(c)
    return lambda m, batch: 0.5 * m.x @ bt @ m.x - ct @ m.x


def test_fd_base_gradient_and_its_preconditioned_coordinates_match_the_analytic_gradient():
    n = 30
    a, _ = _spectrum(n, seed=2)
    rng = np.random.default_rng(2)
    x, c, v = rng.standard_normal(n), rng.standard_normal(n), rng.random(n) + 0.1
    model = Quad(x)
    op = HessianOperator(model, _quad_loss(a, c), None, mode="fd", parallel=ParallelContext.single())
    np.testing.assert_allclose(operator_gradient(op)[0].numpy(), a @ x - c, rtol=1e-10)
    pre = PreconditionedOperator(op, [torch.from_numpy(v)], eps=1e-8)
    s = 1.0 / np.sqrt(np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(operator_gradient(pre)[0].numpy(), s * (a @ x - c), rtol=1e-10)
    assert operator_gradient(HessianOperator(model, _quad_loss(a, c), None, mode="exact")) is None
    # the first fd product reuses the base gradient the start computed: one gradient, not two
    n_grad = op.n_grad
    op.matvec([torch.ones(n, dtype=torch.float64)])
    assert op.n_grad == n_grad + 1


@pytest.mark.parametrize("precondition", [False, True])
def test_measure_lambda_max_cold_fd_start_matches_the_dense_reference(precondition):
    n = 40
    a, _ = _spectrum(n, seed=3)
    rng = np.random.default_rng(3)
    model = Quad(rng.standard_normal(n))
    kw = {}
    ref_mat = a
    if precondition:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.x.grad = torch.from_numpy(rng.standard_normal(n))
        opt.step()  # one step: a second moment to read
        kw["optimizer"] = opt
        v = opt.state[model.x]["exp_avg_sq"].numpy() / (1 - 0.999)
        s = 1.0 / np.sqrt(np.sqrt(v) + 1e-8)
        ref_mat = s[:, None] * a * s[None, :]
    ref = float(np.linalg.eigvalsh(ref_mat)[-1])
    est = measure_lambda_max(
        model,
        _quad_loss(a, rng.standard_normal(n)),
        None,
        mode="fd",
        max_iter=40,
        tol=1e-6,
        parallel=ParallelContext.single(),
        **kw,
    )
    assert est.converged, est.reason
    assert est.lambda_max == pytest.approx(ref, rel=1e-5)


def _tracked_start():
    """An operator with a known top pair, and a gradient-start recipe that records a weak reference to
    every start vector it makes (to see whether the solver keeps one alive)."""
    a, q = _spectrum(60, seed=4)
    op = GradOperator(a, q[:, 3])
    refs: list[weakref.ref] = []

    def make() -> list[torch.Tensor]:
        v0 = gradient_start(op, 0)[0]
        assert v0 is not None
        refs.append(weakref.ref(v0[0]))
        return v0

    return op, make, refs


@pytest.mark.parametrize("basis,alive", [("host", False), ("keep", False), ("recompute", True)])
def test_the_start_vector_is_not_kept_alive_during_the_solve(basis, alive):
    """measure_lambda_max makes v0 inside the lanczos call; lanczos drops it once normalised unless its
    second pass regenerates from it (then it stays: one vector more, as documented)."""
    op, make, refs = _tracked_start()
    seen: list[bool] = []
    res = lanczos(
        op,
        k=1,
        max_iter=40,
        tol=1e-8,
        v0=make(),
        basis=basis,
        callback=lambda i, t: seen.append(refs[0]() is not None),
    )
    assert res.converged and res.eigenvalues[0] == pytest.approx(10.0, rel=1e-7)
    assert seen and all(s == alive for s in seen)


@pytest.mark.parametrize("basis", ["host", "keep", "recompute"])
def test_a_start_recipe_keeps_no_start_vector_alive_and_gives_the_same_result(basis):
    """v0 as a recipe (what measure_lambda_max passes): made at the start and again by the second pass,
    never alive during the products, for every basis; the same Ritz value and products as the vector."""
    op, make, refs = _tracked_start()
    seen: list[bool] = []
    res = lanczos(
        op,
        k=1,
        max_iter=40,
        tol=1e-8,
        v0=make,
        basis=basis,
        return_vectors=True,
        callback=lambda i, t: seen.append(any(r() is not None for r in refs)),
    )
    base = lanczos(
        op, k=1, max_iter=40, tol=1e-8, v0=gradient_start(op, 0)[0], basis=basis, return_vectors=True
    )
    assert res.converged and seen and not any(seen)
    assert len(refs) == (2 if basis == "recompute" else 1)  # the second pass regenerated it
    assert res.eigenvalues[0] == base.eigenvalues[0] and res.n_matvec == base.n_matvec
    assert all(torch.equal(x, y) for x, y in zip(res.eigenvectors[0], base.eigenvectors[0]))
