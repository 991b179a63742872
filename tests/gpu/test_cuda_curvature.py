"""CUDA-only paths of the curvature core (skipped without CUDA; run on a GPU machine with
`bash scripts/test.sh tests/gpu`)."""

from __future__ import annotations

import pytest
import torch

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _gpt(dtype, use_sdpa=True):
    cfg = TorchGPTConfig(
        vocab_size=128, seq_length=64, hidden_size=128, num_layers=2, num_heads=4, use_sdpa=use_sdpa
    )
    model = TorchGPT(cfg)
    model.init_weights(0)
    model = model.to("cuda", dtype)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 128, (8, 65), generator=g).cuda()
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def test_bf16_products_accumulate_in_fp32_and_track_fp32():
    m32, batch = _gpt(torch.float32)
    m16, _ = _gpt(torch.bfloat16)
    ref = lanczos(HessianOperator(m32, torch_gpt_loss, batch), k=1, max_iter=30, tol=1e-4, seed=0)
    op16 = HessianOperator(m16, torch_gpt_loss, batch)
    assert op16.backend.dtype == torch.float32
    assert all(h.dtype == torch.float32 and h.is_cuda for h in op16.matvec(op16.backend.randn(0)))
    res = lanczos(op16, k=1, max_iter=30, tol=1e-2, seed=0)
    assert abs(res.eigenvalues[0] - ref.eigenvalues[0]) <= 0.1 * abs(ref.eigenvalues[0])


def test_exact_fd_jvp_agree_on_cuda_fp32():
    model, batch = _gpt(torch.float32, use_sdpa=False)
    lam = {
        m: lanczos(
            HessianOperator(model, torch_gpt_loss, batch, mode=m, fd_scheme="central"),
            k=1,
            max_iter=30,
            tol=1e-5,
            seed=0,
        ).eigenvalues[0]
        for m in ("exact", "jvp", "fd")
    }
    assert abs(lam["jvp"] - lam["exact"]) <= 1e-3 * abs(lam["exact"])
    assert abs(lam["fd"] - lam["exact"]) <= 1e-2 * abs(lam["exact"])


def test_megatron_gpt_on_cuda_nccl_exact_matches_fd():
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
    from lrscale_megatron.models.text import byte_batch

    ctx = init_megatron(1, 1, seed=0, backend="nccl")
    try:
        preset = get_preset("tiny")
        model = build_gpt(preset, ctx, dtype=torch.float32, seed=0).cuda()
        batch = {k: v.cuda() for k, v in byte_batch(8, preset.seq_length, seed=0).items()}
        exact = HessianOperator(model, gpt_loss_fn, batch, parallel=ctx)
        fd = HessianOperator(model, gpt_loss_fn, batch, mode="fd", fd_scheme="central", parallel=ctx)
        v = exact.backend.randn(0)
        a, b = exact.matvec(v), fd.matvec(v)
        err = max(float((x - y).norm() / y.norm().clamp_min(1e-12)) for x, y in zip(a, b))
        assert err < 5e-2
    finally:
        shutdown()
