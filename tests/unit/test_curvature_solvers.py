"""Krylov solvers: a converged result is checked with fresh products (true residual, symmetry), and the
k=1 Lanczos variant keeps no basis (memory independent of max_iter). References: numpy eigvalsh."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lrscale_megatron.curvature import lanczos, power_iteration
from lrscale_megatron.curvature.backend import DOT_CHUNK, ParamSpec, Vector, VectorBackend
from lrscale_megatron.curvature.memtrack import LiveTensorBytes
from tests.unit.test_algorithms import DenseOperator, hessian_like, indefinite, with_spectrum


class NoisyOperator(DenseOperator):
    """``A v + noise`` with fresh noise in every product (dropout-like randomness), relative size ``level``."""

    def __init__(self, a: np.ndarray, level: float) -> None:
        super().__init__(a)
        self.level = level
        self.gen = torch.Generator().manual_seed(99)
        self.scale = float(np.max(np.abs(np.linalg.eigvalsh(a))))

    def matvec(self, v: Vector) -> Vector:
        out = super().matvec(v)
        nv = math.sqrt(sum(float((t * t).sum()) for t in v))
        return [
            t + self.level * self.scale * nv * torch.randn(t.shape, generator=self.gen, dtype=t.dtype) / 14
            for t in out
        ]


def nonsymmetric(n: int, seed: int) -> np.ndarray:
    """A symmetric matrix plus a skew part: real dominant eigenvalue, but not a Hessian."""
    a = hessian_like(n, seed)
    g = np.random.default_rng(seed + 100).standard_normal((n, n))
    return a + 2.0 * (g - g.T) / math.sqrt(n)


@pytest.mark.parametrize("basis", ["recompute", "keep"])
def test_symmetric_k1_matches_eigvalsh_and_reports_true_residual(basis):
    for a in (hessian_like(150, seed=31), indefinite(150, seed=32)):
        op = DenseOperator(a)
        r = lanczos(op, k=1, max_iter=100, tol=1e-8, basis=basis, return_vectors=True)
        assert r.converged and r.reason is None, r.reason
        want = np.linalg.eigvalsh(a)[-1]
        assert r.eigenvalues[0] == pytest.approx(want, rel=1e-10)
        y = op.flat(r.eigenvectors[0])  # type: ignore[index]
        true = np.linalg.norm(a @ y - r.eigenvalues[0] * y) / np.linalg.norm(y)
        assert r.residuals[0] == pytest.approx(true, rel=1e-6, abs=1e-13)
        assert r.residuals[0] <= 1e-8 * abs(want)
        n_it = len(r.history)
        # recompute: the second pass regenerates q_2..q_m (m - 1 products); both: + residual + symmetry
        assert r.n_matvec == op.calls == n_it + (n_it - 1 if basis == "recompute" else 0) + 2


def test_k1_default_keeps_no_basis_and_agrees_with_full_reorthogonalisation():
    a = with_spectrum(np.concatenate([[5.0, 4.9], np.random.default_rng(3).uniform(0, 4, 118)]), 3)
    lean = lanczos(DenseOperator(a), k=1, max_iter=80, tol=1e-6)
    full = lanczos(DenseOperator(a), k=1, max_iter=80, tol=1e-6, reorth="full")
    assert lean.converged and full.converged
    assert lean.eigenvalues[0] == pytest.approx(full.eigenvalues[0], rel=1e-9)
    assert lean.eigenvalues[0] == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="k=1 only"):
        lanczos(DenseOperator(a), k=2, basis="recompute")


@pytest.mark.parametrize("basis", ["recompute", "keep"])
def test_nonsymmetric_operator_is_not_converged(basis):
    a = nonsymmetric(120, seed=33)
    r = lanczos(DenseOperator(a), k=1, max_iter=120, tol=1e-6, basis=basis)
    assert not r.converged
    assert r.reason is not None and ("symmetr" in r.reason or "true residual" in r.reason), r.reason
    p = power_iteration(DenseOperator(a), max_iter=2000, tol=1e-6)
    assert not p.converged and p.reason is not None and "symmetr" in p.reason, p.reason


@pytest.mark.parametrize("basis", ["recompute", "keep"])
def test_noisy_operator_is_not_converged(basis):
    a = hessian_like(120, seed=34)
    r = lanczos(NoisyOperator(a, level=1e-3), k=1, max_iter=120, tol=1e-6, basis=basis)
    assert not r.converged and r.reason is not None and r.reason != "max_iter", r.reason
    if basis == "recompute":
        assert "reproducible" in r.reason or "true residual" in r.reason
    # noise far below the tolerance is harmless: converged, and right to the tolerance
    ok = lanczos(NoisyOperator(a, level=1e-12), k=1, max_iter=120, tol=1e-6, basis=basis)
    assert ok.converged, ok.reason
    assert ok.eigenvalues[0] == pytest.approx(np.linalg.eigvalsh(a)[-1], rel=1e-6)


class DiagOperator:
    """``diag(d)`` on one large float32 parameter: products allocate one new vector."""

    returns_new_tensors = True

    def __init__(self, d: torch.Tensor) -> None:
        self.d = d
        self.backend = VectorBackend([ParamSpec("w", tuple(d.shape))], dtype=torch.float32)

    def matvec(self, v: Vector) -> Vector:
        return [v[0] * self.d]


def _peak(max_iter: int, basis: str) -> tuple[int, int]:
    d = torch.linspace(0.0, 1.0, 200_000)
    d[-1] = 1.5  # well separated: converges fast, so use tol=0 to run every iteration
    op = DiagOperator(d)
    with LiveTensorBytes() as mem:
        r = lanczos(op, k=1, max_iter=max_iter, tol=0.0, basis=basis, return_vectors=True)
        del r
    return mem.peak, d.numel() * 4


def test_k1_extra_memory_is_independent_of_max_iter():
    p10, vec = _peak(10, "recompute")
    p40, _ = _peak(40, "recompute")
    assert p40 <= p10 * 1.02 + 4096, (p10, p40)
    # q, q_prev, the product and the Ritz vector, plus chunk-sized float64 temporaries of inner products
    assert p40 <= 4 * vec + 2 * 8 * DOT_CHUNK + 4096, p40 / vec
    k10, _ = _peak(10, "keep")
    k20, _ = _peak(20, "keep")
    assert k20 > k10 + 8 * vec  # the kept basis grows with max_iter: the test can tell them apart
