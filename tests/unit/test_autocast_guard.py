"""fd products refuse a loss evaluated under low-precision autocast (the step rounds away there)."""

from __future__ import annotations

import pytest
import torch

from lrscale_megatron.curvature import HessianOperator, lanczos
from lrscale_megatron.curvature.autocast_guard import AutocastRefused, low_precision_autocast
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss


def _problem():
    cfg = TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=1, num_heads=2)
    model = TorchGPT(cfg)
    model.init_weights(0)
    tok = torch.randint(
        0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0)
    )
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def _loss(dtype, enabled=True):
    def loss_fn(model, batch):
        with torch.autocast("cpu", dtype=dtype, enabled=enabled):
            return torch_gpt_loss(model, batch).float()

    return loss_fn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fd_under_low_precision_autocast_is_refused_naming_the_setting(dtype):
    model, batch = _problem()
    before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, _loss(dtype), batch, mode="fd")
    with pytest.raises(AutocastRefused, match=r"autocast.*mode='exact'") as e:
        lanczos(op, k=1, max_iter=10, tol=1e-2, seed=0)
    assert str(dtype) in str(e.value)
    # nothing was left perturbed, and the global hook is gone
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_fd_under_an_outer_autocast_is_refused_too():
    model, batch = _problem()
    op = HessianOperator(model, _loss(torch.float32, enabled=False), batch, mode="fd")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(AutocastRefused):
        op.matvec(op.backend.randn(0))


def test_autocast_switched_off_inside_the_loss_passes_and_matches_exact():
    model, batch = _problem()
    loss = _loss(torch.bfloat16, enabled=False)
    fd = lanczos(HessianOperator(model, loss, batch, mode="fd"), k=1, max_iter=30, tol=1e-2, seed=0)
    ex = lanczos(HessianOperator(model, loss, batch, mode="exact"), k=1, max_iter=30, tol=1e-3, seed=0)
    assert fd.converged and ex.converged
    assert abs(fd.eigenvalues[0] - ex.eigenvalues[0]) <= 1e-2 * abs(ex.eigenvalues[0])


def test_exact_mode_under_autocast_is_not_refused():
    model, batch = _problem()
    ref = lanczos(
        HessianOperator(model, _loss(torch.float32, enabled=False), batch, mode="exact"),
        k=1,
        max_iter=30,
        tol=1e-3,
        seed=0,
    )
    got = lanczos(
        HessianOperator(model, _loss(torch.bfloat16), batch, mode="exact"), k=1, max_iter=30, tol=3e-2, seed=0
    )  # bf16 matmuls: products accurate to ~1e-2, so the online default tol
    assert got.converged
    assert abs(got.eigenvalues[0] - ref.eigenvalues[0]) <= 5e-2 * abs(ref.eigenvalues[0])


def test_low_precision_autocast_describes_what_is_on():
    assert low_precision_autocast() is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "bfloat16" in (low_precision_autocast() or "")
        with torch.autocast("cpu", enabled=False):
            assert low_precision_autocast() is None
