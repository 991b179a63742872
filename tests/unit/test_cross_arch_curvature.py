"""Curvature on the non-GPT architectures (issue 12): lambda_max and per-layer lambda through the
project's operators (``HessianOperator`` + ``lanczos``, ``BlockOperator`` over ``transformer_blocks``,
``op.restrict``) against a dense float64 Hessian (``torch.autograd.functional.hessian`` + ``eigvalsh``)
of a tiny causal Mixer and a tiny ViT, through the same loss the trainer uses (``gpt_loss_fn``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call

from lrscale_megatron.curvature import BlockOperator, HessianOperator, lanczos
from lrscale_megatron.curvature.blocks import transformer_blocks
from lrscale_megatron.data.datasets import get_batch
from lrscale_megatron.data.digits import digits_splits
from lrscale_megatron.models.gpt import gpt_loss_fn
from lrscale_megatron.models.mixer import CausalMixer, MixerConfig
from lrscale_megatron.models.text import byte_batch
from lrscale_megatron.models.vit import ViT, ViTConfig


class _Call:
    post_process = True

    def __init__(self, model, pd):
        self.model, self.pd = model, pd

    def __call__(self, *a, **k):
        return functional_call(self.model, self.pd, a, k)


def dense_hessian(model, batch) -> np.ndarray:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat):
        parts = torch.split(flat, sizes)
        return gpt_loss_fn(_Call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}), batch)

    return torch.autograd.functional.hessian(f, flat0, vectorize=True).numpy()


def _perturb(model, seed: int, scale: float) -> None:
    """Away from the init (zero biases, unit norms, zero ViT head): every block has real curvature."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def tiny_mixer():
    model = CausalMixer(
        MixerConfig(vocab_size=16, seq_length=6, hidden_size=4, num_layers=2, ffn_hidden_size=8)
    )
    model.init_weights(0)
    model = model.double()
    _perturb(model, 1, 0.3)
    batch = byte_batch(3, 6, seed=0)  # Shakespeare bytes folded to 16 ids: a small embedding
    return model, {**batch, "tokens": batch["tokens"] % 16, "labels": batch["labels"] % 16}


def tiny_vit():
    model = ViT(
        ViTConfig(hidden_size=4, num_layers=1, num_heads=2, image_size=8, patch_size=4, ffn_hidden_size=8)
    )
    model.init_weights(0)
    model = model.double()
    _perturb(model, 2, 0.3)
    batch = get_batch(digits_splits().train, 0, 6)
    return model, {k: getattr(batch, k) for k in ("tokens", "labels", "loss_mask", "position_ids")}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.fixture(scope="module", params=["mixer", "vit"])
def problem(request):
    model, batch = tiny_mixer() if request.param == "mixer" else tiny_vit()
    return request.param, model, batch, dense_hessian(model, batch)


def test_lambda_max_equals_dense_eigvalsh(problem):
    arch, model, batch, H = problem
    assert np.allclose(H, H.T, atol=1e-10)
    op = HessianOperator(model, gpt_loss_fn, batch, mode="exact")
    assert op.dim == H.shape[0]
    want = np.linalg.eigvalsh(H)[-1]
    res = lanczos(op, k=1, max_iter=120, tol=1e-10, seed=0)
    assert res.converged, (arch, res.reason)
    assert rel(res.eigenvalues[0], want) < 1e-6, (arch, res.eigenvalues[0], want)


def test_per_layer_lambda_equals_dense_sub_blocks(problem):
    arch, model, batch, H = problem
    op = HessianOperator(model, gpt_loss_fn, batch, mode="exact")
    blocks = transformer_blocks(op.backend)
    layers = [b for b in blocks if b.startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(model.cfg.num_layers)], list(blocks)
    assert "embedding" in blocks and "final" in blocks
    offsets = np.cumsum([0] + [p.numel() for p in op.params])
    for name, idx in blocks.items():
        cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
        want = np.linalg.eigvalsh(H[np.ix_(cols, cols)])[-1]
        res = lanczos(BlockOperator(op, idx), k=1, max_iter=min(len(cols), 120), tol=1e-10, seed=0)
        assert res.converged, (arch, name, res.reason)
        assert rel(res.eigenvalues[0], want) < 1e-6, (arch, name, res.eigenvalues[0], want)
        names = [op.named_params[i][0] for i in idx]
        res2 = lanczos(op.restrict(names), k=1, max_iter=min(len(cols), 120), tol=1e-10, seed=0)
        assert rel(res2.eigenvalues[0], want) < 1e-6, (arch, name)


def test_mixer_masked_future_weights_have_no_curvature():
    """The upper triangle of the token-mixing matrix is never read: its Hessian rows are exactly 0."""
    model, batch = tiny_mixer()
    H = dense_hessian(model, batch)
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    i = names.index("blocks.0.token_mix")
    s = model.cfg.seq_length
    upper = np.triu(np.ones((s, s), dtype=bool), 1).reshape(-1)
    rows = offsets[i] + np.flatnonzero(upper)
    assert np.all(H[rows] == 0.0)
    lower = offsets[i] + np.flatnonzero(~upper)
    assert np.abs(H[lower]).max() > 1e-6


def test_scheduler_measurement_matches_dense(problem):
    """``measurement.measure_lambda_max`` (what LRScale's online mode calls): whole model and one layer's
    parameters (per-group mode), exact and finite-difference products, against the dense Hessian."""
    from lrscale_megatron.measurement import measure_lambda_max
    from lrscale_megatron.parallel import ParallelContext

    arch, model, batch, H = problem
    ctx = ParallelContext.single()
    want = np.linalg.eigvalsh(H)[-1]
    # fd: the solver tolerance above the finite-difference noise (tighter is refused, not wrong)
    for mode, solver_tol, tol in (("exact", 1e-8, 1e-6), ("fd", 1e-6, 1e-4)):
        est = measure_lambda_max(
            model, gpt_loss_fn, batch, mode=mode, max_iter=120, tol=solver_tol, parallel=ctx
        )
        assert est.converged, (arch, mode, est.reason)
        assert rel(est.lambda_max, want) < tol, (arch, mode, est.lambda_max, want)
    names = [n for n, _ in model.named_parameters()]
    layer = [p for n, p in model.named_parameters() if n.startswith("blocks.0.")]
    offsets = np.cumsum([0] + [p.numel() for p in model.parameters()])
    cols = np.concatenate(
        [np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names) if n.startswith("blocks.0.")]
    )
    est = measure_lambda_max(model, gpt_loss_fn, batch, params=layer, max_iter=120, tol=1e-8, parallel=ctx)
    assert est.converged and rel(est.lambda_max, np.linalg.eigvalsh(H[np.ix_(cols, cols)])[-1]) < 1e-6
