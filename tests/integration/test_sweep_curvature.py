"""lambda_max at init of a sweep group, raw and Adam-preconditioned, against an independent reference.

A worker process (this file as a script; the gloo group never lives in the pytest process) measures a
tiny megatron-core GPT sweep point with :func:`lrscale_megatron.sweep.curvature.measure_point` and
recomputes both eigenvalues without the curvature package: Adam's ``v̂`` as the bias-corrected EMA of
squared gradients written out by hand, Hessian-vector products by plain double backward, and power
iteration (shifted past the most negative eigenvalue when that one dominates). The preconditioned value must also differ from the raw one (it is a different
operator), and the measurement must not depend on the point's LR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.integration._selfrun import run_self

ROOT = Path(__file__).resolve().parents[2]
POINT = dict(width=16, depth=1, tokens=4096, batch_tokens=128, seq_len=32, lr=1e-3, seed=0)


def _reference(settings, point, m: int, iters: int = 500) -> dict:
    import torch

    from lrscale_megatron.data import get_batch
    from lrscale_megatron.integrations.megatron_tp import twice_differentiable_tp
    from lrscale_megatron.models.gpt import gpt_loss_fn
    from lrscale_megatron.sweep.megatron import train_config_dict
    from lrscale_megatron.train import config_from_dict
    from lrscale_megatron.train.loop import _seed_all, init_parallel
    from lrscale_megatron.train.setup import build_data, build_model, micro_batches

    raw, base = train_config_dict(point, settings)
    cfg = config_from_dict(raw, base_dir=base)
    ctx = init_parallel(cfg)
    _seed_all(cfg.training.seed)
    model = build_model(cfg, ctx).double()
    data = build_data(cfg, ctx)
    t = cfg.training
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of(i: int) -> torch.Tensor:
        mbs = micro_batches(get_batch(data.train, i, t.global_batch_size), t.micro_batch_size)
        return sum(gpt_loss_fn(model, mb) for mb in mbs) / len(mbs)

    b1, b2 = raw["deepspeed"]["optimizer"]["params"]["betas"]
    v = [torch.zeros_like(p) for p in params]
    for i in range(m):
        g = torch.autograd.grad(loss_of(i), params)
        v = [b2 * vi + (1 - b2) * gi.square() for vi, gi in zip(v, g)]
    scale = [(vi / (1 - b2**m)).sqrt().add(1e-8).rsqrt() for vi in v]

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with twice_differentiable_tp(), sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_of(0), params, create_graph=True)

        def power(pre: bool, shift: float = 0.0) -> float:
            """Largest-magnitude eigenvalue of (op + shift I) minus shift."""
            gen = torch.Generator().manual_seed(1)
            x = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
            lam = 0.0
            for _ in range(iters):
                n = torch.sqrt(sum((xi * xi).sum() for xi in x))
                x = [xi / n for xi in x]
                u = [xi * s for xi, s in zip(x, scale)] if pre else x
                hu = torch.autograd.grad(grads, params, grad_outputs=u, retain_graph=True)
                y = (
                    [h * s + shift * xi for h, s, xi in zip(hu, scale, x)]
                    if pre
                    else [h + shift * xi for h, xi in zip(hu, x)]
                )
                lam = float(sum((xi * yi).sum() for xi, yi in zip(x, y)))
                x = y
            return lam - shift

        def top(pre: bool) -> float:
            # the top *algebraic* eigenvalue: when power iteration lands on a negative one, shift by it
            first = power(pre)
            return first if first > 0 else power(pre, shift=-first)

        return {"raw": top(False), "adam": top(True)}


def _worker(out: Path) -> None:
    from lrscale_megatron.launch import shutdown
    from lrscale_megatron.sweep.curvature import measure_point
    from lrscale_megatron.sweep.megatron import GPTSweepSettings

    settings = GPTSweepSettings(
        base_config=str(ROOT / "configs/gpt/cpu-tiny.json"),
        overrides=('training.dtype="float64"',),
    )
    try:
        raw = measure_point(POINT, settings, max_iter=40, tol=1e-6)
        adam = measure_point(POINT, settings, max_iter=40, tol=1e-6, precondition=True, moment_batches=3)
        adam_lr = measure_point(
            {**POINT, "lr": 5e-2}, settings, max_iter=40, tol=1e-6, precondition=True, moment_batches=3
        )
        ref = _reference(settings, POINT, m=3)
    finally:
        shutdown()
    out.write_text(
        json.dumps(
            {"raw": raw.lambda_max, "adam": adam.lambda_max, "adam_lr": adam_lr.lambda_max, "ref": ref}
        )
    )


def test_init_lambda_raw_and_preconditioned_match_reference(tmp_path):
    out = tmp_path / "out.json"
    r = run_self(__file__, out, out, cwd=ROOT, own_port=True)
    assert abs(r["raw"] - r["ref"]["raw"]) <= 1e-6 * abs(r["ref"]["raw"])
    assert abs(r["adam"] - r["ref"]["adam"]) <= 1e-6 * abs(r["ref"]["adam"])
    assert r["adam"] == r["adam_lr"]  # LR-free
    assert abs(r["adam"] / r["raw"] - 1) > 0.5  # a different operator, not the raw Hessian again


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(Path(sys.argv[1]))
