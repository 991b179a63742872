"""The JAX API against the PyTorch one on the same MLP: lambda_max agreement and the cost of a product.

One process, CPU::

    python benchmarks/jax_curvature.py            # MLP 128-256-256-10, batch 512 (~101k params)
    python benchmarks/jax_curvature.py --quick    # MLP 16-32-32-4, batch 64: smoke run
    python benchmarks/jax_curvature.py --threads 1  # torch on one thread (XLA keeps its own pool)

1. Agreement: identical float64 weights in torch (``HessianOperator(mode="exact")`` + ``lanczos``) and in
   JAX (``lrscale_megatron.jax.lambda_max``), both at ``tol=1e-8``; and JAX float32 against the float64
   value.
2. Cost (float32): one HVP (JAX jitted ``jvp(grad)``; torch exact double backward and ``torch.func``
   jvp) and one loss+gradient in each framework, timed interleaved, median of ``--repeats``;
   ``lambda_max`` wall (warm: compiled) against ``n_matvec`` x the product time gives the solver's own
   overhead per product (vector arithmetic, checks, host syncs).
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from lrscale_megatron.curvature import HessianOperator as TorchHessian
from lrscale_megatron.curvature import lanczos as torch_lanczos
from lrscale_megatron.jax import HessianOperator, lambda_max


def _weights(sizes: list[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1)
        for i, o in zip(sizes[:-1], sizes[1:])
    ]


def _jax_loss(p, x, y):
    h = x
    for i, layer in enumerate(p):
        h = h @ layer["w"].T + layer["b"]
        if i < len(p) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def _torch_model(ws, dtype):
    layers: list[torch.nn.Module] = []
    for i, (w, b) in enumerate(ws):
        lin = torch.nn.Linear(w.shape[1], w.shape[0]).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(ws) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def _torch_loss(m, batch):
    return torch.mean((m(batch[0]) - batch[1]) ** 2)


def _median_ms(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [16, 32, 32, 4] if args.quick else [128, 256, 256, 10]
    batch = 64 if args.quick else 512
    ws = _weights(sizes, 0)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(batch, sizes[0])), rng.normal(size=(batch, sizes[-1]))
    n_params = sum(w.size + b.size for w, b in ws)
    report: dict = {
        "sizes": sizes,
        "batch": batch,
        "params": int(n_params),
        "torch_threads": torch.get_num_threads(),
    }

    # 1. agreement
    with jax.enable_x64(True):
        p64 = [{"w": jnp.asarray(w), "b": jnp.asarray(b)} for w, b in ws]
        rj = lambda_max(_jax_loss, p64, jnp.asarray(x), jnp.asarray(y), tol=1e-8, max_iter=80)
    op_t = TorchHessian(
        _torch_model(ws, torch.float64), _torch_loss, (torch.from_numpy(x), torch.from_numpy(y))
    )
    rt = torch_lanczos(op_t, k=1, max_iter=80, tol=1e-8, seed=0)
    p32 = [{"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)} for w, b in ws]
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    r32 = lambda_max(_jax_loss, p32, x32, y32, tol=1e-4, max_iter=80)
    report["agreement"] = {
        "jax_f64": rj.lambda_max,
        "torch_f64": rt.lambda_max,
        "rel_diff_f64": abs(rj.lambda_max - rt.lambda_max) / abs(rt.lambda_max),
        "converged": [rj.converged, rt.converged, r32.converged],
        "jax_f32": r32.lambda_max,
        "rel_diff_f32_vs_f64": abs(r32.lambda_max - rt.lambda_max) / abs(rt.lambda_max),
    }

    # 2. cost, float32, interleaved
    op_j = HessianOperator(_jax_loss, p32, x32, y32)
    v = op_j.backend.randn(0)
    grad_j = jax.jit(jax.value_and_grad(_jax_loss))
    jax.block_until_ready(op_j.matvec(v))
    jax.block_until_ready(grad_j(p32, x32, y32))
    m32 = _torch_model(ws, torch.float32)
    tb = (torch.from_numpy(x).float(), torch.from_numpy(y).float())
    op_ex = TorchHessian(m32, _torch_loss, tb, mode="exact")
    op_jvp = TorchHessian(m32, _torch_loss, tb, mode="jvp")
    vt = op_ex.backend.randn(0)
    op_ex.matvec(vt), op_jvp.matvec(vt)

    def torch_grad():
        m32.zero_grad(set_to_none=True)
        _torch_loss(m32, tb).backward()

    times: dict[str, list[float]] = {
        k: [] for k in ("jax_hvp", "jax_grad", "torch_exact", "torch_jvp", "torch_grad")
    }
    for _ in range(args.repeats):
        times["jax_hvp"].append(_median_ms(lambda: jax.block_until_ready(op_j.matvec(v)), 3))
        times["jax_grad"].append(_median_ms(lambda: jax.block_until_ready(grad_j(p32, x32, y32)), 3))
        times["torch_exact"].append(_median_ms(lambda: op_ex.matvec(vt), 3))
        times["torch_jvp"].append(_median_ms(lambda: op_jvp.matvec(vt), 3))
        times["torch_grad"].append(_median_ms(torch_grad, 3))
    med = {k: statistics.median(t) for k, t in times.items()}
    lambda_max(_jax_loss, p32, x32, y32, tol=1e-4, max_iter=80)  # warm (compiled) run first
    t0 = time.perf_counter()
    rw = lambda_max(_jax_loss, p32, x32, y32, tol=1e-4, max_iter=80)
    wall = (time.perf_counter() - t0) * 1e3
    report["cost_ms"] = {k: round(val, 3) for k, val in med.items()}
    report["ratios"] = {
        "jax_hvp/jax_grad": med["jax_hvp"] / med["jax_grad"],
        "torch_exact/torch_grad": med["torch_exact"] / med["torch_grad"],
        "jax_hvp/torch_exact": med["jax_hvp"] / med["torch_exact"],
        "jax_hvp/torch_jvp": med["jax_hvp"] / med["torch_jvp"],
    }
    report["jax_lambda_max_f32"] = {
        "wall_ms": round(wall, 2),
        "n_matvec": rw.n_matvec,
        "overhead_ms_per_product": (wall - rw.n_matvec * med["jax_hvp"]) / rw.n_matvec,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
