"""lrscale_megatron.jax: Hessian spectra of a pytree against dense references.

float64 runs inside ``jax.enable_x64(True)`` contexts, so 64-bit mode does not leak into other tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.flatten_util import ravel_pytree

from lrscale_megatron.curvature import HessianOperator as TorchHessian
from lrscale_megatron.curvature import lanczos as torch_lanczos
from lrscale_megatron.jax import (
    EigenResult,
    HessianOperator,
    PytreeBackend,
    TraceResult,
    hessian_trace,
    lambda_max,
    slq_density,
    top_eigenvalues,
)


def _mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["l1"]["w"].T + p["l1"]["b"])
    out = h @ p["l2"]["w"].T + p["l2"]["b"]
    return jnp.mean((out - y) ** 2)


def _problem(dtype):
    rng = np.random.default_rng(0)
    p = {
        "l1": {"w": rng.normal(size=(6, 4)), "b": rng.normal(size=6) * 0.1},
        "l2": {"w": rng.normal(size=(3, 6)) * 0.5, "b": np.zeros(3)},
    }
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 3))
    as_j = lambda a: jnp.asarray(a, dtype=dtype)  # noqa: E731
    return jax.tree_util.tree_map(as_j, p), as_j(x), as_j(y), p, x, y


def _dense_eigs(params, x, y):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda f: _mlp_loss(unravel(f), x, y))(flat)
    h = np.asarray(h, dtype=np.float64)
    assert np.allclose(h, h.T, atol=1e-12)
    return np.linalg.eigvalsh(h)  # ascending


def test_lanczos_power_hutchinson_match_dense_hessian_float64():
    with jax.enable_x64(True):
        params, x, y, *_ = _problem(jnp.float64)
        ev = _dense_eigs(params, x, y)
        top = top_eigenvalues(_mlp_loss, params, x, y, k=3, max_iter=51, tol=1e-9)
        assert isinstance(top, EigenResult) and top.converged, top.reason
        np.testing.assert_allclose(top.eigenvalues, ev[::-1][:3], rtol=1e-6, atol=0)
        low = top_eigenvalues(_mlp_loss, params, x, y, k=2, which="SA", max_iter=51, tol=1e-9)
        assert low.converged, low.reason
        np.testing.assert_allclose(low.eigenvalues, ev[:2], rtol=1e-6, atol=1e-9)
        lm = lambda_max(_mlp_loss, params, x, y, tol=1e-9, max_iter=51)
        assert lm.converged and abs(lm.lambda_max - ev[-1]) <= 1e-6 * ev[-1]
        pw = lambda_max(_mlp_loss, params, x, y, method="power", tol=1e-5, max_iter=1000)  # error ~ res^2/gap
        lm_mag = ev[np.argmax(np.abs(ev))]
        assert pw.converged, pw.reason
        assert abs(pw.lambda_max - lm_mag) <= 1e-6 * abs(lm_mag)
        tr = hessian_trace(_mlp_loss, params, x, y, n_samples=100, seed=1)
        assert isinstance(tr, TraceResult) and tr.converged and tr.n_samples == 100
        assert abs(tr.estimate - ev.sum()) <= 4 * tr.stderr, (tr, ev.sum())


def test_slq_with_a_full_krylov_space_has_the_dense_eigenvalues_as_nodes():
    with jax.enable_x64(True):
        params, x, y, *_ = _problem(jnp.float64)
        ev = _dense_eigs(params, x, y)
        op = HessianOperator(_mlp_loss, params, x, y)
        dens = slq_density(op, n_probes=1, n_iter=op.backend.dim, seed=0)
    assert dens.converged, dens.reason
    nodes = np.asarray(dens.nodes[0])
    assert len(nodes) >= 40  # breakdown may stop a little short of dim=51 (tiny weights on the rest)
    assert np.max(np.min(np.abs(nodes[:, None] - ev[None, :]), axis=1)) <= 1e-6 * np.max(np.abs(ev))
    assert abs(sum(dens.weights[0]) - 1.0) <= 1e-12


def test_eigenvector_is_a_pytree_and_an_eigenvector():
    with jax.enable_x64(True):
        params, x, y, *_ = _problem(jnp.float64)
        res = lambda_max(_mlp_loss, params, x, y, tol=1e-10, max_iter=51, return_vectors=True)
        assert res.converged and res.eigenvectors is not None
        v = res.eigenvectors[0]
        assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(params)
        op = HessianOperator(_mlp_loss, params, x, y)
        hv = op.apply(v)
        fv, fhv = ravel_pytree(v)[0], ravel_pytree(hv)[0]
        assert float(jnp.linalg.norm(fhv - res.lambda_max * fv)) <= 1e-8 * res.lambda_max * float(
            jnp.linalg.norm(fv)
        )


def test_same_lambda_max_as_the_pytorch_operator_on_identical_weights():
    with jax.enable_x64(True):
        params, x, y, p_np, x_np, y_np = _problem(jnp.float64)
        res_j = lambda_max(_mlp_loss, params, x, y, tol=1e-10, max_iter=51)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    with torch.no_grad():
        for layer, key in ((model[0], "l1"), (model[2], "l2")):
            layer.weight.copy_(torch.from_numpy(p_np[key]["w"]))
            layer.bias.copy_(torch.from_numpy(p_np[key]["b"]))
    batch = (torch.from_numpy(x_np), torch.from_numpy(y_np))

    def loss_fn(m, b):
        return torch.mean((m(b[0]) - b[1]) ** 2)

    op = TorchHessian(model, loss_fn, batch, mode="exact")
    res_t = torch_lanczos(op, k=1, max_iter=51, tol=1e-10, seed=0)
    assert res_j.converged and res_t.converged, (res_j.reason, res_t.reason)
    assert abs(res_j.lambda_max - res_t.lambda_max) <= 1e-9 * abs(res_t.lambda_max)


def test_float32_parameters_give_float32_vectors_near_the_float64_answer():
    with jax.enable_x64(True):
        p64, x64, y64, *_ = _problem(jnp.float64)
        ref = _dense_eigs(p64, x64, y64)[-1]
    params, x, y, *_ = _problem(jnp.float32)
    op = HessianOperator(_mlp_loss, params, x, y)
    assert op.backend.dtype == jnp.float32
    res = lambda_max(_mlp_loss, params, x, y, tol=1e-4, max_iter=51)
    assert res.converged, res.reason
    assert abs(res.lambda_max - ref) <= 1e-4 * ref


def test_bf16_parameters_are_measured_at_float32_copies():
    p32, x, y, *_ = _problem(jnp.float32)
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), p32)
    with jax.enable_x64(True):
        rounded = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), p16)
        ref = _dense_eigs(rounded, jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))[-1]
    res = lambda_max(_mlp_loss, p16, x, y, tol=1e-4, max_iter=51)
    assert res.converged, res.reason
    assert abs(res.lambda_max - ref) <= 1e-4 * ref


def test_non_finite_loss_is_reported_not_converged():
    params, x, y, *_ = _problem(jnp.float32)
    x_bad = x.at[0, 0].set(jnp.nan)
    res = lambda_max(_mlp_loss, params, x_bad, y, tol=1e-3)
    assert not res.converged and "non-finite" in (res.reason or "") and math.isnan(res.lambda_max)


def test_non_symmetric_operator_is_refused_by_the_same_checks():
    """The generic true-residual/symmetry check runs on JAX operators too."""
    from lrscale_megatron.jax import lanczos, power_iteration

    params, x, y, *_ = _problem(jnp.float32)
    op = HessianOperator(_mlp_loss, params, x, y)

    class Skewed:
        backend = op.backend
        returns_new_tensors = True

        def matvec(self, v):
            out = op.matvec(v)
            out[0] = out[0] + 5.0 * jnp.sum(v[1]) * jnp.ones_like(out[0])  # H + 5 u w^T: not symmetric
            return out

    res = lanczos(Skewed(), k=1, max_iter=30, tol=1e-3, basis="keep")
    assert not res.converged and "true residual" in (res.reason or ""), res.reason
    pw = power_iteration(Skewed(), max_iter=300, tol=1e-3)
    assert not pw.converged and "symmetry check failed" in (pw.reason or ""), pw.reason


def test_backend_checks_its_input():
    params, x, y, *_ = _problem(jnp.float32)
    be = PytreeBackend(params)
    assert be.dim == 6 * 4 + 6 + 3 * 6 + 3
    with pytest.raises(ValueError, match=r"\['l1'\]\['w'\].*shape"):
        bad = be.zeros()
        bad[1] = jnp.zeros((4, 6))  # leaves in flattening order: l1.b, l1.w, l2.b, l2.w
        be.as_vector(bad, "v0")
    with pytest.raises(ValueError, match="integer state"):
        PytreeBackend({"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)})
    with pytest.raises(ValueError, match="jax_enable_x64"):
        PytreeBackend(params, dtype=jnp.float64)
    with pytest.raises(ValueError, match="method"):
        lambda_max(_mlp_loss, params, x, y, method="arnoldi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tree structure"):
        be.as_vector({"l1": params["l1"]}, "v0")
    as_tree = be.as_vector(params, "v0")  # a pytree like params is accepted too
    assert [a.shape for a in as_tree] == [a.shape for a in be.zeros()]
    v = be.randn(3)
    w = be.clone(v)
    be.axpy_(2.0, v, w)  # in place on the list, as the algorithms expect
    assert be.dot(w, v) == pytest.approx(3.0 * be.dot(v, v), rel=1e-6)
    assert be.randn(3)[0].tolist() == v[0].tolist() and be.randn(4)[0].tolist() != v[0].tolist()
