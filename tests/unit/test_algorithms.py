"""Curvature algorithms against dense numpy linear algebra on seeded matrices.

The operator is a dense symmetric float64 matrix acting on vectors split into three "parameter"
tensors of different shapes, so every algorithm runs through the same per-parameter
:class:`VectorBackend` it uses on a model. The last tests emulate two tensor-parallel ranks with two
threads and a barrier-based all-reduce.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import scipy.integrate
import torch

from lrscale_megatron.curvature.algorithms import (
    deflated_power_iteration,
    hutchinson_trace,
    lanczos,
    power_iteration,
    slq_density,
)
from lrscale_megatron.curvature.backend import ParamSpec, Vector, VectorBackend


# ---------------------------------------------------------------------------------------------- fixtures
def _shapes_for(n: int) -> list[tuple[int, ...]]:
    """Three parameter shapes (2-D, 1-D, 2-D) whose sizes add up to ``n`` (n >= 4)."""
    q = n // 4
    return [(2, q), (q,), (n - 3 * q, 1)]


class DenseOperator:
    """``v -> A v`` for a dense symmetric matrix, on per-parameter float64 vectors.

    ``poison_call``: on that (1-based) call the product gets ``poison_value`` in one entry.
    """

    def __init__(
        self,
        a: np.ndarray,
        shapes: list[tuple[int, ...]] | None = None,
        names: list[str] | None = None,
        poison_call: int | None = None,
        poison_value: float = math.nan,
    ) -> None:
        n = a.shape[0]
        self.a = torch.from_numpy(np.ascontiguousarray(a))
        self.shapes = shapes if shapes is not None else _shapes_for(n)
        assert sum(math.prod(s) for s in self.shapes) == n  # test-fixture sanity, not user input
        names = names if names is not None else [f"layers.{i}.weight" for i in range(len(self.shapes))]
        self.backend = VectorBackend(
            [ParamSpec(nm, s) for nm, s in zip(names, self.shapes)], dtype=torch.float64
        )
        self.calls = 0
        self.poison_call = poison_call
        self.poison_value = poison_value

    def flat(self, v: Vector) -> np.ndarray:
        return torch.cat([t.reshape(-1) for t in v]).numpy().copy()

    def matvec(self, v: Vector) -> Vector:
        self.calls += 1
        y = self.a @ torch.cat([t.reshape(-1) for t in v])
        if self.calls == self.poison_call:
            y = y.clone()
            y[1] = self.poison_value
        out, o = [], 0
        for s in self.shapes:
            m = math.prod(s)
            out.append(y[o : o + m].reshape(s))
            o += m
        return out


def with_spectrum(eigs: np.ndarray, seed: int) -> np.ndarray:
    """``Q diag(eigs) Q^T`` with a seeded random orthogonal ``Q``."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    a = (q * eigs) @ q.T
    return (a + a.T) / 2


def goe(n: int, seed: int) -> np.ndarray:
    """Seeded random symmetric (GOE) matrix, spectrum ~ semicircle on [-2, 2]."""
    g = np.random.default_rng(seed).standard_normal((n, n))
    return (g + g.T) / math.sqrt(2 * n)


def hessian_like(n: int, seed: int) -> np.ndarray:
    """PSD, a few outliers above a bulk (the shape of a trained network's Hessian spectrum)."""
    bulk = np.random.default_rng(seed).uniform(0.0, 4.0, n - 5)
    return with_spectrum(np.concatenate([[50.0, 30.0, 20.0, 12.0, 8.0], bulk]), seed)


def indefinite(n: int, seed: int) -> np.ndarray:
    bulk = np.random.default_rng(seed).uniform(-5.0, 5.0, n - 7)
    return with_spectrum(np.concatenate([[40.0, 25.0, -30.0, 15.0, 10.0, -18.0, 7.0], bulk]), seed)


def true_eigs(a: np.ndarray) -> np.ndarray:
    return np.linalg.eigvalsh(a)  # ascending


def rel_err(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


# ---------------------------------------------------------------------------------------------- Lanczos
@pytest.mark.parametrize(
    "name,a",
    [
        ("goe", goe(100, seed=1)),
        ("hessian_like", hessian_like(200, seed=3)),
        ("indefinite", indefinite(200, seed=4)),
    ],
)
def test_lanczos_top5_matches_eigvalsh(name, a):
    op = DenseOperator(a)
    r = lanczos(op, k=5, max_iter=120, tol=1e-8, seed=0)
    want = true_eigs(a)[::-1][:5]
    assert r.converged, (name, r.reason, r.residuals)
    assert r.reason is None
    assert rel_err(r.eigenvalues, want) < 1e-6, (name, r.eigenvalues, want)
    assert list(r.eigenvalues) == sorted(r.eigenvalues, reverse=True)
    # the Lanczos iterations plus the true-residual check (one product per Ritz pair; the symmetry probe
    # runs along the stored Lanczos vectors, whose products the recurrence knows: no product)
    assert r.n_matvec == op.calls == len(r.history) + 5
    assert r.history[-1] == r.eigenvalues[0]
    # a Krylov method should not need the whole space for well-separated outliers
    if name != "goe":
        assert r.n_matvec < 40, r.n_matvec


def test_lanczos_nearly_degenerate_top_pair():
    # relative gap 1e-4 between the top two eigenvalues, the rest separated by at least 10%
    eigs = np.concatenate(
        [[10.0, 10.0 * (1 - 1e-4), 7.0, 6.0, 5.0], np.random.default_rng(5).uniform(0, 4, 195)]
    )
    a = with_spectrum(eigs, seed=5)
    want = true_eigs(a)[::-1][:5]
    op = DenseOperator(a)
    r = lanczos(op, k=5, max_iter=60, tol=1e-8)
    assert r.converged, r.reason
    assert rel_err(r.eigenvalues, want) < 1e-6
    # the pair is resolved, not reported twice as one eigenvalue: its gap is right to 1e-6 relative
    assert abs((r.eigenvalues[0] - r.eigenvalues[1]) - (want[0] - want[1])) < 1e-6 * (want[0] - want[1])
    assert r.n_matvec <= 40, r.n_matvec  # measured: 31 at tol=1e-8


def test_lanczos_sa_and_lm():
    a = indefinite(120, seed=7)
    ev = true_eigs(a)
    sa = lanczos(DenseOperator(a), k=3, max_iter=120, tol=1e-8, which="SA")
    assert sa.converged, sa.reason
    assert rel_err(sa.eigenvalues, ev[:3]) < 1e-6  # ascending: -30, -18, ...
    assert sa.eigenvalues[0] < sa.eigenvalues[1] < sa.eigenvalues[2] < 0
    lm = lanczos(DenseOperator(a), k=3, max_iter=120, tol=1e-8, which="LM")
    want_lm = ev[np.argsort(-np.abs(ev))][:3]  # 40, -30, 25
    assert lm.converged, lm.reason
    assert rel_err(lm.eigenvalues, want_lm) < 1e-6
    assert lm.eigenvalues[1] < 0


def test_lanczos_residual_estimates_match_true_residuals():
    a = hessian_like(150, seed=11)
    op = DenseOperator(a)
    # stop early so that the residuals are far from rounding level
    r = lanczos(op, k=4, max_iter=10, tol=1e-12, return_vectors=True)
    assert not r.converged and r.reason == "max_iter"
    assert r.eigenvectors is not None and len(r.eigenvectors) == 4
    ys = np.stack([op.flat(y) for y in r.eigenvectors])
    np.testing.assert_allclose(ys @ ys.T, np.eye(4), atol=1e-10)  # orthonormal Ritz vectors
    for theta, est, y in zip(r.eigenvalues, r.residuals, ys):
        true = np.linalg.norm(a @ y - theta * y)
        assert true > 1e-8  # really not converged, so the comparison means something
        assert est == pytest.approx(true, rel=1e-6)
        assert theta == pytest.approx(y @ a @ y, rel=1e-12)  # Ritz value = Rayleigh quotient


def test_lanczos_converged_flag_means_residual_below_tol():
    a = hessian_like(150, seed=12)
    r = lanczos(DenseOperator(a), k=3, max_iter=100, tol=1e-4, return_vectors=True)
    assert r.converged
    assert max(r.residuals) <= 1e-4 * abs(r.eigenvalues[0])
    # ... and the previous iteration had not converged yet (it stopped as soon as it could)
    r_short = lanczos(DenseOperator(a), k=3, max_iter=len(r.history) - 1, tol=1e-4)
    assert not r_short.converged and r_short.reason == "max_iter"


def test_lanczos_callback_and_history():
    a = hessian_like(80, seed=2)
    seen: list[tuple[int, tuple[float, ...]]] = []
    r = lanczos(DenseOperator(a), k=2, max_iter=30, tol=1e-6, callback=lambda i, th: seen.append((i, th)))
    n_it = r.n_matvec - 2  # the check spends k = 2 products (the symmetry probe needs none: kept basis)
    assert [i for i, _ in seen] == list(range(1, n_it + 1))
    assert [len(th) for _, th in seen] == list(range(1, n_it + 1))
    assert tuple(th[0] for _, th in seen) == r.history
    # Ritz values interlace: the largest one never decreases (Cauchy interlacing)
    assert all(b >= a_ - 1e-12 for a_, b in zip(r.history, r.history[1:]))


def test_lanczos_reorth_none_top1():
    a = hessian_like(150, seed=13)
    r = lanczos(DenseOperator(a), k=1, max_iter=60, tol=1e-8, reorth="none")
    assert r.converged
    assert rel_err(r.eigenvalues, true_eigs(a)[-1:]) < 1e-8


def test_lanczos_max_iter_capped_at_dimension():
    a = goe(12, seed=3)
    op = DenseOperator(a)
    r = lanczos(op, k=12, max_iter=100, tol=1e-10)
    assert r.n_matvec == 12 + 12 == op.calls  # 12 iterations, then the check of 12 Ritz pairs
    assert len(r.history) == 12
    assert r.converged
    np.testing.assert_allclose(r.eigenvalues, true_eigs(a)[::-1], rtol=1e-10, atol=1e-12)


def test_lanczos_breakdown_rank2():
    n = 30
    rng = np.random.default_rng(0)
    u, w = np.linalg.qr(rng.standard_normal((n, 2)))[0].T
    a = 3.0 * np.outer(u, u) + 1.5 * np.outer(w, w)
    op = DenseOperator(a)
    r = lanczos(op, k=2, max_iter=20, tol=0.0)  # tol=0: only the breakdown test can stop it early
    # Krylov space = span(q, u, w): invariant after 3 steps
    assert len(r.history) == 3 and r.n_matvec == 3 + 2, r.n_matvec
    assert r.converged and r.reason is None
    np.testing.assert_allclose(r.eigenvalues, [3.0, 1.5], rtol=1e-12)
    assert max(r.residuals) < 1e-12
    assert all(math.isfinite(x) for x in r.history)


def test_lanczos_breakdown_restarts_when_fewer_than_k_ritz_values():
    n = 30
    rng = np.random.default_rng(1)
    u, w = np.linalg.qr(rng.standard_normal((n, 2)))[0].T
    a = 3.0 * np.outer(u, u) + 1.5 * np.outer(w, w)
    op = DenseOperator(a)
    v0 = [torch.from_numpy(x.copy()) for x in _split(u, op.shapes)]
    # start in an invariant subspace of dimension 1: breakdown after one step, restart finds 1.5
    r = lanczos(op, k=2, max_iter=20, tol=1e-10, v0=v0)
    assert r.converged, r.reason
    np.testing.assert_allclose(r.eigenvalues, [3.0, 1.5], rtol=1e-10)
    assert r.n_matvec > 1


def _split(x: np.ndarray, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    out, o = [], 0
    for s in shapes:
        m = math.prod(s)
        out.append(x[o : o + m].reshape(s))
        o += m
    return out


def test_lanczos_same_seed_same_result_other_seed_other_path():
    a = indefinite(100, seed=21)
    r1 = lanczos(DenseOperator(a), k=3, max_iter=15, tol=1e-12, seed=5)
    r2 = lanczos(DenseOperator(a), k=3, max_iter=15, tol=1e-12, seed=5)
    r3 = lanczos(DenseOperator(a), k=3, max_iter=15, tol=1e-12, seed=6)
    assert r1 == r2  # dataclass equality: eigenvalues, residuals, history, n_matvec, ...
    assert r1.history != r3.history


def test_lanczos_input_validation():
    op = DenseOperator(goe(12, seed=0))
    with pytest.raises(ValueError, match="which"):
        lanczos(op, which="BE")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reorth"):
        lanczos(op, reorth="partial")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim=12"):
        lanczos(op, k=13, max_iter=20)
    with pytest.raises(ValueError, match="max_iter"):
        lanczos(op, k=5, max_iter=3)
    with pytest.raises(ValueError, match="shape"):
        lanczos(op, v0=[torch.zeros(3, dtype=torch.float64)] * 3)
    with pytest.raises(ValueError, match="zero"):
        lanczos(op, v0=op.backend.zeros())
    assert op.calls == 0


# ---------------------------------------------------------------------------------------------- power
def test_power_iteration_matches_eigvalsh():
    a = hessian_like(100, seed=8)  # lambda_2 / lambda_1 = 0.6
    op = DenseOperator(a)
    r = power_iteration(op, max_iter=200, tol=1e-8)
    assert r.converged and r.reason is None
    assert rel_err(r.eigenvalues, true_eigs(a)[-1:]) < 1e-8
    assert r.n_matvec == op.calls == len(r.history) + 2  # + fresh residual and symmetry probe
    assert r.residuals[0] <= 1e-8 * abs(r.eigenvalues[0])
    assert r.eigenvectors is not None
    y = op.flat(r.eigenvectors[0])
    assert np.linalg.norm(a @ y - r.eigenvalues[0] * y) == pytest.approx(r.residuals[0], rel=1e-6, abs=1e-12)
    # the tolerance is relative: scaling the operator changes nothing but the eigenvalue's scale
    small = power_iteration(DenseOperator(1e-6 * a), max_iter=200, tol=1e-8)
    assert small.converged and small.n_matvec == r.n_matvec
    assert small.eigenvalues[0] == pytest.approx(1e-6 * r.eigenvalues[0], rel=1e-10)


def test_power_iteration_dominant_in_magnitude():
    a = indefinite(80, seed=9)  # eigenvalues 40, -30, ...: dominant is 40
    r = power_iteration(DenseOperator(-a), max_iter=300, tol=1e-8)
    assert r.converged
    assert r.eigenvalues[0] == pytest.approx(-40.0, rel=1e-8)


def test_lanczos_needs_fewer_matvecs_than_power_for_small_gap():
    eigs = np.concatenate([[1.0, 0.97], np.random.default_rng(10).uniform(0, 0.9, 98)])
    a = with_spectrum(eigs, seed=10)
    tol = 1e-6
    p = power_iteration(DenseOperator(a), max_iter=3000, tol=tol)
    lz = lanczos(DenseOperator(a), k=1, max_iter=100, tol=tol)
    assert p.converged and lz.converged
    assert p.eigenvalues[0] == pytest.approx(1.0, rel=1e-9)
    assert lz.eigenvalues[0] == pytest.approx(1.0, rel=1e-9)
    assert 5 * lz.n_matvec < p.n_matvec, (lz.n_matvec, p.n_matvec)


def test_deflated_power_iteration_top3():
    eigs = np.concatenate([[20.0, 12.0, 7.0], np.random.default_rng(14).uniform(0, 3.0, 57)])
    a = with_spectrum(eigs, seed=14)
    op = DenseOperator(a)
    r = deflated_power_iteration(op, k=3, max_iter=300, tol=1e-8, seed=0)
    assert r.converged, r.reason
    np.testing.assert_allclose(r.eigenvalues, [20.0, 12.0, 7.0], rtol=1e-8)
    assert r.n_matvec == op.calls
    assert r.eigenvectors is not None
    ys = np.stack([op.flat(y) for y in r.eigenvectors])
    np.testing.assert_allclose(np.abs(ys @ ys.T), np.eye(3), atol=1e-6)
    # the baseline is expensive: Lanczos gets the same three with far fewer products
    lz = lanczos(DenseOperator(a), k=3, max_iter=60, tol=1e-8)
    assert lz.n_matvec < r.n_matvec


# ---------------------------------------------------------------------------------------------- trace
def test_hutchinson_within_three_standard_errors():
    a = indefinite(60, seed=15) + 2.0 * np.eye(60)
    op = DenseOperator(a)
    r = hutchinson_trace(op, n_samples=200, seed=3)
    assert r.converged and r.reason is None
    assert r.n_samples == 200 == r.n_matvec == op.calls
    assert r.stderr > 0
    assert abs(r.estimate - np.trace(a)) <= 3 * r.stderr, (r.estimate, np.trace(a), r.stderr)
    # the reported stderr is the right size: Rademacher variance = 2 * sum_{i != j} a_ij^2
    var = 2.0 * (np.sum(a * a) - np.sum(np.diag(a) ** 2))
    assert r.stderr == pytest.approx(math.sqrt(var / 200), rel=0.3)


def test_hutchinson_exact_on_diagonal_and_early_stop():
    d = np.random.default_rng(16).uniform(1, 2, 40)
    op = DenseOperator(np.diag(d))
    r = hutchinson_trace(op, n_samples=100, seed=0, tol=1e-3)
    # z^T D z = tr(D) for every +-1 probe: zero variance, stops at the minimum of 10 probes
    assert r.converged and r.n_samples == 10 == op.calls
    assert r.estimate == pytest.approx(d.sum(), rel=1e-12)
    assert r.stderr == pytest.approx(0.0, abs=1e-12)


def test_hutchinson_tolerance_not_reached():
    r = hutchinson_trace(DenseOperator(goe(40, seed=17)), n_samples=12, seed=0, tol=1e-6)
    assert not r.converged and r.reason == "max_samples" and r.n_samples == 12


# ---------------------------------------------------------------------------------------------- SLQ
def test_slq_density_normalised_mean_and_quadrature():
    a = hessian_like(120, seed=18)
    n = a.shape[0]
    op = DenseOperator(a)
    n_probes, n_iter = 8, 12
    d = slq_density(op, n_probes=n_probes, n_iter=n_iter, seed=0)
    assert d.converged and d.reason is None
    assert d.n_matvec == n_probes * n_iter == op.calls
    x, rho = np.asarray(d.grid), np.asarray(d.density)
    assert x.size == 512 and np.all(np.diff(x) > 0) and np.all(rho >= 0)
    assert scipy.integrate.trapezoid(rho, x) == pytest.approx(1.0, abs=1e-12)
    for nodes, w in zip(d.nodes, d.weights):
        assert len(nodes) == n_iter
        assert sum(w) == pytest.approx(1.0, abs=1e-12)
    # mean of the density = average Rayleigh quotient of the probes ~ tr(A)/n
    ev = true_eigs(a)
    mean = scipy.integrate.trapezoid(x * rho, x)
    probe_std = math.sqrt(
        2.0 * np.var(ev) / (n + 2) / n_probes
    )  # std of mean of v^T A v, v uniform on sphere
    assert abs(mean - np.trace(a) / n) < 4 * probe_std, (mean, np.trace(a) / n, probe_std)
    # the outliers are resolved: the density near lambda_max = 50 carries about 1/n of the mass
    near_top = (x > 48) & (x < 52)
    mass_top = scipy.integrate.trapezoid(np.where(near_top, rho, 0.0), x)
    assert 0.1 / n < mass_top < 10.0 / n
    assert max(max(nd) for nd in d.nodes) == pytest.approx(50.0, rel=1e-6)


def test_slq_gauss_quadrature_is_exact_for_low_moments():
    a = indefinite(60, seed=19)
    op = DenseOperator(a)
    n_iter = 6
    d = slq_density(op, n_probes=2, n_iter=n_iter, seed=4)
    for p, (nodes, weights) in enumerate(zip(d.nodes, d.weights)):
        v = op.flat(op.backend.randn(4 + p))
        v /= np.linalg.norm(v)
        th, w = np.asarray(nodes), np.asarray(weights)
        for j in range(2 * n_iter):  # Gauss quadrature with m nodes is exact to degree 2m - 1
            exact = v @ np.linalg.matrix_power(a, j) @ v
            assert np.sum(w * th**j) == pytest.approx(exact, rel=1e-8, abs=1e-8 * 40.0**j)


def test_slq_custom_grid_and_sigma():
    a = hessian_like(60, seed=20)
    grid = np.linspace(-10, 60, 701)
    d = slq_density(DenseOperator(a), n_probes=2, n_iter=10, grid=grid.tolist(), sigma=0.5)
    np.testing.assert_array_equal(np.asarray(d.grid), grid)
    assert scipy.integrate.trapezoid(d.density, d.grid) == pytest.approx(1.0, abs=1e-12)
    # default sigma is 1% of the node range; the default grid extends 3 sigma beyond the nodes
    d2 = slq_density(DenseOperator(a), n_probes=2, n_iter=10)
    lo = min(min(nd) for nd in d2.nodes)
    hi = max(max(nd) for nd in d2.nodes)
    assert d2.grid[0] == pytest.approx(lo - 0.03 * (hi - lo))
    assert d2.grid[-1] == pytest.approx(hi + 0.03 * (hi - lo))


def test_slq_breakdown_gives_exact_quadrature():
    # three distinct eigenvalues: every probe breaks down after 3 steps with exact nodes
    eigs = np.array([5.0] * 10 + [2.0] * 10 + [-1.0] * 10)
    a = with_spectrum(eigs, seed=22)
    d = slq_density(DenseOperator(a), n_probes=3, n_iter=20)
    assert d.converged
    assert d.n_matvec == 9
    for nodes in d.nodes:
        np.testing.assert_allclose(sorted(nodes), [-1.0, 2.0, 5.0], atol=1e-10)


# ---------------------------------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_product_is_reported_not_converged(bad):
    a = hessian_like(60, seed=23)

    def op() -> DenseOperator:
        return DenseOperator(a, poison_call=3, poison_value=bad)

    for k in (1, 5):
        r = lanczos(op(), k=k, max_iter=30, tol=1e-8, return_vectors=True)
        assert not r.converged
        assert r.reason is not None and "non-finite Hessian-vector product" in r.reason
        assert "iteration 3" in r.reason
        assert r.n_matvec == 3
        assert r.eigenvectors is None
        # the last finite Ritz values (2 of them after 2 iterations), NaN where there are none
        assert all(math.isfinite(x) for x in r.eigenvalues[: min(k, 2)])
        assert all(math.isnan(x) for x in r.eigenvalues[2:])
        assert len(r.eigenvalues) == k

    p = power_iteration(op(), max_iter=50, tol=1e-8)
    assert not p.converged and p.n_matvec == 3
    assert "non-finite Hessian-vector product" in (p.reason or "") and "iteration 3" in (p.reason or "")
    assert math.isfinite(p.eigenvalues[0])  # the last finite Rayleigh quotient, flagged not converged

    dp = deflated_power_iteration(op(), k=3, max_iter=50, tol=1e-8)
    assert not dp.converged and "non-finite" in (dp.reason or "")
    assert all(math.isnan(x) for x in dp.eigenvalues)  # the first pair never finished

    h = hutchinson_trace(op(), n_samples=20)
    assert not h.converged and "probe 3" in (h.reason or "")
    assert h.n_samples == 2 and h.n_matvec == 3 and math.isfinite(h.estimate)

    s = slq_density(op(), n_probes=2, n_iter=5)
    assert not s.converged and "non-finite" in (s.reason or "")
    assert s.nodes == () and s.density == ()


def test_non_finite_on_first_product_gives_nan():
    op = DenseOperator(hessian_like(40, seed=24), poison_call=1)
    r = lanczos(op, k=2, max_iter=10)
    assert not r.converged and r.n_matvec == 1
    assert all(math.isnan(x) for x in r.eigenvalues + r.residuals)
    p = power_iteration(DenseOperator(hessian_like(40, seed=24), poison_call=1))
    assert not p.converged and math.isnan(p.eigenvalues[0])
    h = hutchinson_trace(DenseOperator(hessian_like(40, seed=24), poison_call=1), n_samples=5)
    assert not h.converged and math.isnan(h.estimate)


def test_non_finite_start_vector():
    op = DenseOperator(hessian_like(40, seed=25))
    v0 = op.backend.randn(0)
    v0[1][0] = math.nan
    r = lanczos(op, k=1, v0=v0)
    assert not r.converged and "start vector" in (r.reason or "") and r.n_matvec == 0
    assert math.isnan(r.eigenvalues[0])
    p = power_iteration(op, v0=v0)
    assert not p.converged and math.isnan(p.eigenvalues[0])


def test_slq_failure_in_second_probe_keeps_first():
    op = DenseOperator(hessian_like(40, seed=26), poison_call=7)
    d = slq_density(op, n_probes=3, n_iter=5)
    assert not d.converged and "probe 1" in (d.reason or "")
    assert len(d.nodes) == 1  # probe 0 completed, probe 1 discarded
    assert scipy.integrate.trapezoid(d.density, d.grid) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- sharding
class _ThreadGroup:
    """Collectives for ``size`` threads standing in for tensor-parallel ranks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[object] = [None] * size

    def exchange(self, rank: int, obj: object) -> list:
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_reduce(self, rank: int):
        def fn(t: torch.Tensor) -> None:
            parts = self.exchange(rank, t.clone())
            total = parts[0].clone()
            for x in parts[1:]:
                total += x
            t.copy_(total)

        return fn


# global layout: "w" (6, 4) split on dim 0, "b" (5,) replicated, "c" (3, 4) split on dim 1
_FULL = [("w", (6, 4), 0), ("b", (5,), None), ("c", (3, 4), 1)]


class ShardedDenseOperator:
    """The dense operator with its vector sharded over 2 emulated tensor-parallel ranks."""

    def __init__(self, a: np.ndarray, group: _ThreadGroup, rank: int) -> None:
        self.a = torch.from_numpy(a)
        self.group, self.rank = group, rank
        specs = []
        for name, shape, dim in _FULL:
            if dim is None:
                specs.append(ParamSpec(name, shape, owned=rank == 0))
            else:
                local = list(shape)
                local[dim] //= group.size
                specs.append(
                    ParamSpec(name, tuple(local), partition_dim=dim, tp_size=group.size, tp_rank=rank)
                )
        self.backend = VectorBackend(specs, dtype=torch.float64, all_reduce=group.all_reduce(rank))

    def matvec(self, v: Vector) -> Vector:
        parts = self.group.exchange(self.rank, [t.clone() for t in v])
        full = []
        for i, (_, _, dim) in enumerate(_FULL):
            full.append(v[i] if dim is None else torch.cat([p[i] for p in parts], dim=dim))
        y = self.a @ torch.cat([t.reshape(-1) for t in full])
        out, o = [], 0
        for spec, (_, shape, _) in zip(self.backend.specs, _FULL):
            m = math.prod(shape)
            out.append(spec.shard(y[o : o + m].reshape(shape)))
            o += m
        return out


def _run_on_ranks(fn, size: int = 2) -> list:
    group = _ThreadGroup(size)
    results: list = [None] * size
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            results[rank] = fn(group, rank)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads)
    return results


def test_sharded_backend_reproduces_unsharded_run():
    n = sum(math.prod(s) for _, s, _ in _FULL)  # 41
    a = indefinite(n, seed=27)
    single = DenseOperator(a, shapes=[s for _, s, _ in _FULL], names=[nm for nm, _, _ in _FULL])
    ref = lanczos(single, k=3, max_iter=30, tol=1e-8, seed=2)
    ref_tr = hutchinson_trace(
        DenseOperator(a, shapes=[s for _, s, _ in _FULL], names=[nm for nm, _, _ in _FULL]), n_samples=20
    )

    def job(group, rank):
        op = ShardedDenseOperator(a, group, rank)
        assert op.backend.dim == n
        return lanczos(op, k=3, max_iter=30, tol=1e-8, seed=2), hutchinson_trace(op, n_samples=20)

    results = _run_on_ranks(job)
    assert ref.converged
    np.testing.assert_allclose(ref.eigenvalues, true_eigs(a)[::-1][:3], rtol=1e-8)
    for r, tr in results:
        # same random start (drawn at the full shape, then sliced): same Krylov iterates
        assert r.converged and r.n_matvec == ref.n_matvec
        np.testing.assert_allclose(r.history, ref.history, rtol=1e-10)
        np.testing.assert_allclose(r.eigenvalues, ref.eigenvalues, rtol=1e-10)
        assert tr.estimate == pytest.approx(ref_tr.estimate, rel=1e-10)
    # every rank reports the same numbers (all control flow follows globally reduced scalars)
    assert results[0][0].eigenvalues == results[1][0].eigenvalues
