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


@pytest.mark.parametrize("basis", ["recompute", "keep", "host"])
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
        # recompute: the second pass regenerates q_2..q_m (m - 1 products), + residual + random-z symmetry
        # probe; keep / host: + residual only (the symmetry probe runs along the stored Lanczos vectors)
        assert r.n_matvec == op.calls == n_it + (n_it - 1 + 2 if basis == "recompute" else 1)


def test_k1_default_keeps_no_basis_and_agrees_with_full_reorthogonalisation():
    a = with_spectrum(np.concatenate([[5.0, 4.9], np.random.default_rng(3).uniform(0, 4, 118)]), 3)
    lean = lanczos(DenseOperator(a), k=1, max_iter=80, tol=1e-6)
    full = lanczos(DenseOperator(a), k=1, max_iter=80, tol=1e-6, reorth="full")
    assert lean.converged and full.converged
    assert lean.eigenvalues[0] == pytest.approx(full.eigenvalues[0], rel=1e-9)
    assert lean.eigenvalues[0] == pytest.approx(5.0, rel=1e-9)
    with pytest.raises(ValueError, match="k=1 only"):
        lanczos(DenseOperator(a), k=2, basis="recompute")


@pytest.mark.parametrize("basis", ["recompute", "keep", "host"])
def test_nonsymmetric_operator_is_not_converged(basis):
    a = nonsymmetric(120, seed=33)
    r = lanczos(DenseOperator(a), k=1, max_iter=120, tol=1e-6, basis=basis)
    assert not r.converged
    assert r.reason is not None and ("symmetr" in r.reason or "true residual" in r.reason), r.reason
    p = power_iteration(DenseOperator(a), max_iter=2000, tol=1e-6)
    assert not p.converged and p.reason is not None and "symmetr" in p.reason, p.reason


@pytest.mark.parametrize("basis", ["recompute", "keep", "host"])
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


def test_krylov_symmetry_probe_catches_what_one_random_probe_misses():
    """A symmetric S minus a rank-1 non-symmetric part ``c u (S v)^T`` (a "dropped path"): the random unit
    z of the two-product check reads 0.7 x its bound (the second-pass path accepts it); the probe along
    the stored Lanczos vectors (no product of its own) refuses it, for a host and a kept basis."""
    from lrscale_megatron.curvature import krylov as kr

    n, tol = 400, 1e-3
    rng = np.random.default_rng(1)
    s = with_spectrum(np.concatenate([[10.0, 9.5], rng.uniform(0.0, 5.0, n - 2)]), 7)
    u, v = (x / np.linalg.norm(x) for x in rng.standard_normal((2, n)))
    a = s - 0.4 * np.outer(u, s @ v)
    old = lanczos(
        DenseOperator(a), k=1, max_iter=100, tol=tol, seed=0, basis="recompute", return_vectors=True
    )
    y = DenseOperator(a).flat(old.eigenvectors[0])  # type: ignore[index]
    z = DenseOperator(a).flat(DenseOperator(a).backend.randn(0 + kr.SYMMETRY_SEED_OFFSET))
    z /= np.linalg.norm(z)
    bound = kr.TRUE_RESIDUAL_SLACK * tol * abs(old.eigenvalues[0])
    z_reading = abs(z @ (a - a.T) @ y) / np.linalg.norm(y)
    assert 0.3 * bound < z_reading < bound  # the random probe is blind to it here
    assert old.converged  # ... so the two-product check passes it
    ky = np.linalg.norm((a - a.T) @ y) / np.linalg.norm(y)
    assert ky > 5 * bound  # while the skew part's action on y is well over the tolerance
    for basis in ("host", "keep"):
        op = DenseOperator(a)
        r = lanczos(op, k=1, max_iter=100, tol=tol, seed=0, basis=basis)
        assert not r.converged and r.reason is not None and "symmetry check failed" in r.reason, r.reason
        assert "Lanczos vectors" in r.reason
        assert op.calls == len(r.history) + 1  # one check product
    # the same S alone passes with one check product
    ok = lanczos(DenseOperator(s), k=1, max_iter=100, tol=tol, seed=0, basis="host")
    assert ok.converged and ok.eigenvalues[0] == pytest.approx(10.0, rel=tol)


def test_host_basis_matches_the_second_pass_and_frees_its_rows():
    """basis="host" forms the same Ritz vector as the second pass (same recurrence, vectors stored instead
    of regenerated), with no product beyond the iterations and one check; auto chooses it here."""
    a = hessian_like(300, seed=41)
    want = np.linalg.eigvalsh(a)[-1]
    rec = lanczos(DenseOperator(a), k=1, max_iter=80, tol=1e-7, basis="recompute", return_vectors=True)
    for basis in ("host", "auto"):
        op = DenseOperator(a)
        r = lanczos(op, k=1, max_iter=80, tol=1e-7, basis=basis, return_vectors=True)  # type: ignore[arg-type]
        assert r.converged and r.eigenvalues[0] == pytest.approx(want, rel=1e-9)
        assert r.history == rec.history
        assert op.calls == r.n_matvec == len(r.history) + 1
        y, y2 = op.flat(r.eigenvectors[0]), op.flat(rec.eigenvectors[0])  # type: ignore[index]
        np.testing.assert_allclose(y, y2, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="k=1 only"):
        lanczos(DenseOperator(a), k=2, basis="host")


def test_host_basis_refused_or_fallen_back_when_the_host_has_no_room(monkeypatch, caplog):
    from lrscale_megatron.curvature import hostbasis

    monkeypatch.setattr(hostbasis, "host_budget", lambda: (1000, "a test budget of 1000 bytes"))
    a = hessian_like(120, seed=42)
    with pytest.raises(ValueError, match="basis='host' is not possible.*1000 bytes"):
        lanczos(DenseOperator(a), k=1, max_iter=40, basis="host")
    op = DenseOperator(a)
    with caplog.at_level("INFO", logger="lrscale_megatron.curvature.lanczos_solver"):
        r = lanczos(op, k=1, max_iter=40, tol=1e-8)
    assert r.converged and "basis='recompute'" in caplog.text and "1000 bytes" in caplog.text
    assert op.calls == 2 * len(r.history) - 1 + 2  # the second pass and the two-product check


def test_host_budget_reads_available_memory_and_divides_by_local_ranks(monkeypatch):
    from lrscale_megatron.curvature import hostbasis

    monkeypatch.setattr(hostbasis, "_meminfo_available", lambda: 64 * 2**30)
    monkeypatch.setattr(hostbasis, "_cgroup_available", lambda: 16 * 2**30)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    budget, how = hostbasis.host_budget()
    assert budget == int(hostbasis.HOST_BUDGET_FRACTION * 16 * 2**30 / 8)
    assert "cgroup" in how and "8 local rank" in how
    assert hostbasis.row_bytes(3, 4, pinned=True) == 16 and hostbasis.row_bytes(3, 4, pinned=False) == 12


def test_host_basis_arithmetic_in_chunks_and_on_non_contiguous_tensors(monkeypatch):
    """HostBasis.append / axpy_ / combine / dots against the same sums done directly on the vectors:
    chunked slices (HOST_CHUNK made small) and a non-contiguous tensor, a parameter not owned (TP copy)."""
    from lrscale_megatron.curvature import hostbasis

    monkeypatch.setattr(hostbasis, "HOST_CHUNK", 7)
    specs = [ParamSpec("a", (5, 6)), ParamSpec("b", (6, 4)), ParamSpec("c", (3,), owned=False)]
    be = VectorBackend(specs, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)

    def vec() -> Vector:
        return [
            torch.randn(5, 6, generator=g, dtype=torch.float64),
            torch.randn(4, 6, generator=g).double().t(),
        ]

    qs = [[*vec(), torch.randn(3, generator=g, dtype=torch.float64)] for _ in range(3)]
    assert not qs[0][1].is_contiguous()
    hb = hostbasis.HostBasis(be, 3)
    for q in qs:
        hb.append(q)
    assert len(hb) == 3 and hb.nbytes == 3 * (30 + 24 + 3) * 8
    y = hb.combine([0.5, -2.0, 3.0])
    want = [0.5 * a - 2.0 * b + 3.0 * c for a, b, c in zip(*qs)]
    assert all(torch.allclose(u, v, rtol=0, atol=1e-12) for u, v in zip(y, want))
    w = [t.clone() for t in qs[0]]
    w[1] = w[1].t().contiguous().t()  # non-contiguous in place target
    hb.axpy_(-1.5, 2, w)
    assert all(torch.allclose(u, a - 1.5 * c, atol=1e-12) for u, a, c in zip(w, qs[0], qs[2]))
    d = hb.dots([y, qs[1]])
    for j in range(3):
        assert d[j][0] == pytest.approx(be.dot(qs[j], y), rel=1e-12)
        assert d[j][1] == pytest.approx(be.dot(qs[j], qs[1]), rel=1e-12)
    hb.release()
    assert len(hb) == 0
