"""Parameters sharded with jax.sharding over 4 CPU devices give the unsharded (global) answer.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before jax is imported, so the check
runs in a child process (float64 there via ``JAX_ENABLE_X64``) and reports JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lrscale_megatron.jax import HessianOperator, PytreeBackend, hessian_trace, lambda_max, top_eigenvalues

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("x",))

    def loss(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - y) ** 2)

    rng = np.random.default_rng(0)
    host = {"w1": rng.normal(size=(8, 12)), "b1": rng.normal(size=12) * 0.1, "w2": rng.normal(size=(12, 4)) * 0.3}
    x, y = rng.normal(size=(32, 8)), rng.normal(size=(32, 4))
    plain = {k: jnp.asarray(v) for k, v in host.items()}
    specs = {"w1": P(None, "x"), "b1": P("x"), "w2": P("x", None)}   # tensor-parallel-like layout
    sharded = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in host.items()}
    xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("x", None)))           # data-parallel batch
    ys = jax.device_put(jnp.asarray(y), NamedSharding(mesh, P("x", None)))
    out = {"n_shards": [len(sharded[k].sharding.device_set) for k in ("w1", "b1", "w2")]}

    be_s, be_p = PytreeBackend(sharded), PytreeBackend(plain)
    vs, vp = be_s.randn(5), be_p.randn(5)
    out["randn_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(vs, vp))
    out["randn_sharded"] = [len(a.sharding.device_set) for a in vs]
    ws = be_s.rademacher(2)
    flat = lambda v: np.concatenate([np.asarray(a).ravel() for a in v])
    out["dot"] = [be_s.dot(vs, ws), float(flat(vs) @ flat(ws))]
    out["norm"] = [be_s.norm(vs), float(np.linalg.norm(flat(vs)))]

    op_s, op_p = HessianOperator(loss, sharded, xs, ys), HessianOperator(loss, plain, x, y)
    hs, hp = op_s.matvec(vs), op_p.matvec(vp)
    out["hvp_maxdiff"] = float(np.max(np.abs(flat(hs) - flat(hp))))
    out["hvp_scale"] = float(np.max(np.abs(flat(hp))))
    out["hvp_sharded"] = [len(a.sharding.device_set) for a in hs]

    rs = top_eigenvalues(loss, sharded, xs, ys, k=2, tol=1e-9, max_iter=60)
    rp = top_eigenvalues(loss, plain, x, y, k=2, tol=1e-9, max_iter=60)
    out["lanczos"] = [list(rs.eigenvalues), list(rp.eigenvalues), rs.converged, rp.converged]
    ls = lambda_max(loss, sharded, xs, ys, tol=1e-9, max_iter=60)
    out["lambda_max"] = [ls.lambda_max, ls.converged]
    ts, tp = hessian_trace(loss, sharded, xs, ys, n_samples=20), hessian_trace(loss, plain, x, y, n_samples=20)
    out["trace"] = [ts.estimate, tp.estimate]
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_params_give_the_unsharded_answer():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_ENABLE_X64"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[len("RESULT ") :])
    assert r["n_shards"] == [4, 4, 4]
    assert r["randn_equal"] and r["randn_sharded"] == [4, 4, 4]
    assert abs(r["dot"][0] - r["dot"][1]) <= 1e-12 * abs(r["dot"][1])
    assert abs(r["norm"][0] - r["norm"][1]) <= 1e-12 * r["norm"][1]
    assert r["hvp_maxdiff"] <= 1e-12 * r["hvp_scale"]
    assert max(r["hvp_sharded"]) == 4  # the products stay sharded
    ev_s, ev_p, conv_s, conv_p = r["lanczos"]
    assert conv_s and conv_p
    for a, b in zip(ev_s, ev_p):
        assert abs(a - b) <= 1e-10 * abs(b)
    assert r["lambda_max"][1] and abs(r["lambda_max"][0] - ev_p[0]) <= 1e-10 * abs(ev_p[0])
    assert abs(r["trace"][0] - r["trace"][1]) <= 1e-10 * abs(r["trace"][1])
