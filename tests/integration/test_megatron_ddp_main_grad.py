"""Finite-difference curvature through megatron's pipeline schedule with the model wrapped in
megatron-core's ``DistributedDataParallel``: the backward hooks move gradients into ``main_grad`` and
leave ``p.grad`` empty, so ``schedule_grad_fn`` must read ``main_grad`` (it read ``p.grad``: zeros).
Checked against plain autograd gradients / exact products of the unwrapped float64 model."""

from __future__ import annotations

import pytest
import torch

from lrscale_megatron.curvature import HessianOperator
from lrscale_megatron.integrations.megatron_schedule import schedule_grad_fn
from lrscale_megatron.launch import init_megatron, shutdown
from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
from lrscale_megatron.models.text import byte_batch


@pytest.fixture(scope="module")
def setup():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from lrscale_megatron.integrations.megatron_cpu import CudaToCpuMode

    ctx = init_megatron(1, 1, seed=0)
    try:
        preset = get_preset("tiny")
        model = build_gpt(preset, ctx, dtype=torch.float64, seed=0)
        with CudaToCpuMode():
            ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        full = byte_batch(4, preset.seq_length, seed=0)
        micro = [{k: v[i * 2 : (i + 1) * 2] for k, v in full.items()} for i in range(2)]
        yield ctx, preset, model, ddp, micro
    finally:
        shutdown()


def test_schedule_gradients_under_megatron_ddp_read_main_grad(setup):
    ctx, preset, model, ddp, micro = setup
    params = [p for p in ddp.parameters() if p.requires_grad]
    assert all(hasattr(p, "main_grad") for p in params)  # megatron DDP owns the gradients
    grad_fn = schedule_grad_fn(ddp, gpt_loss_fn, micro, seq_length=preset.seq_length, micro_batch_size=2)
    loss, grads = grad_fn()
    ref = HessianOperator(model, gpt_loss_fn, micro, mode="exact", parallel=ctx)
    ref_loss, ref_grads = ref.loss_and_grad()
    # megatron's own (non-patched) vocab-parallel cross entropy runs in float32 in the schedule; the
    # reference is the float64 operator: agreement to float32 round-off
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert sum(float(g.norm()) for g in grads) > 0  # p.grad would have given all zeros
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.to(torch.float64), r, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in params)  # nothing left behind for the training step
    assert all(float(p.main_grad.abs().sum()) == 0 for p in params)  # the grad buffer is zeroed again
    # the model config's sync hooks are restored
    assert ddp.config.finalize_model_grads_func is None or callable(ddp.config.finalize_model_grads_func)


def test_fd_products_through_ddp_schedule_equal_exact(setup):
    ctx, preset, model, ddp, micro = setup
    grad_fn = schedule_grad_fn(ddp, gpt_loss_fn, micro, seq_length=preset.seq_length, micro_batch_size=2)
    fd = HessianOperator(
        ddp, gpt_loss_fn, micro, mode="fd", fd_scheme="central", parallel=ctx, grad_fn=grad_fn
    )
    exact = HessianOperator(model, gpt_loss_fn, micro, mode="exact", parallel=ctx)
    v = exact.backend.randn(3)
    hv_fd, hv = fd.matvec(v), exact.matvec(v)
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(hv_fd, hv) if float(b.norm()) > 0)
    assert rel < 5e-3  # float32 cross entropy in the schedule (see above); p.grad gave zeros: rel = 1
