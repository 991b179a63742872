"""CUDA-only: the k=1 Lanczos basis kept in pinned host memory (``basis="host"``) gives the second pass's
answer with fewer device bytes (skipped without CUDA; run on a GPU machine with
`bash scripts/test.sh tests/gpu`)."""

from __future__ import annotations

import pytest
import torch

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _measure(model, batch, basis: str) -> tuple[float, list[torch.Tensor], int, int]:
    op = HessianOperator(model, torch_gpt_loss, batch, mode="fd")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = lanczos(op, k=1, max_iter=12, tol=0.0, seed=0, basis=basis, return_vectors=True)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    op.release()
    return r.eigenvalues[0], r.eigenvectors[0], peak, r.n_matvec  # type: ignore[index]


def test_host_basis_on_cuda_matches_the_second_pass_with_less_device_memory():
    cfg = TorchGPTConfig(vocab_size=128, seq_length=64, hidden_size=256, num_layers=2, num_heads=4)
    model = TorchGPT(cfg)
    model.init_weights(0)
    model = model.cuda()
    tok = torch.randint(0, 128, (4, 65), generator=torch.Generator().manual_seed(0)).cuda()
    batch = {"tokens": tok[:, :-1], "labels": tok[:, 1:]}
    vec = 4 * sum(p.numel() for p in model.parameters())
    lam_r, y_r, peak_r, n_r = _measure(model, batch, "recompute")
    lam_h, y_h, peak_h, n_h = _measure(model, batch, "host")
    assert lam_h == pytest.approx(lam_r, rel=1e-5)
    cos = sum(float((a * b).sum()) for a, b in zip(y_r, y_h))
    assert abs(cos) == pytest.approx(1.0, abs=1e-4)
    assert n_h == 12 and n_r == 12 + 11  # no second pass (tol=0: no check either)
    assert peak_h <= peak_r - 1.5 * vec, (peak_r / vec, peak_h / vec)  # two vectors fewer on the device
