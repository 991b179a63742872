"""The megatron patches are opt-in, reversible and version-checked."""

from __future__ import annotations

import pytest
import torch

megatron_core = pytest.importorskip("megatron.core")

from lrscale_megatron.integrations import megatron_cpu, megatron_tp  # noqa: E402


def _symbols():
    from megatron.core import tensor_parallel as tpp
    from megatron.core.tensor_parallel import layers as L
    from megatron.core.tensor_parallel import mappings as M

    return [
        M._CopyToModelParallelRegion.__dict__["backward"],
        M._ReduceFromModelParallelRegion.__dict__["forward"],
        M._ReduceFromModelParallelRegion.__dict__["backward"],
        M._ScatterToModelParallelRegion.__dict__["backward"],
        M._GatherFromModelParallelRegion.__dict__["backward"],
        L.linear_with_grad_accumulation_and_async_allreduce,
        tpp.vocab_parallel_cross_entropy,
    ]


def test_tp_patch_swaps_and_restores_every_symbol():
    assert not megatron_tp.is_enabled()
    before = _symbols()
    megatron_tp.enable()
    megatron_tp.enable()  # idempotent
    during = _symbols()
    assert all(a is not b for a, b in zip(before, during))
    megatron_tp.disable()
    assert all(a is b for a, b in zip(before, _symbols()))
    assert not megatron_tp.is_enabled()


def test_tp_patch_context_manager_restores_previous_state():
    before = _symbols()
    with megatron_tp.twice_differentiable_tp():
        assert megatron_tp.is_enabled()
    assert all(a is b for a, b in zip(before, _symbols()))


def test_tp_patch_refuses_unsupported_version(monkeypatch):
    monkeypatch.setattr(megatron_core, "__version__", "0.9.0")
    with pytest.raises(RuntimeError, match=r"found 0\.9\.0.*megatron-core==0\.16\.\*"):
        megatron_tp.enable()
    assert not megatron_tp.is_enabled()


def test_cpu_shims_are_reversible_and_refused_with_cuda(monkeypatch):
    orig = torch.cuda.current_device
    megatron_cpu.enable(0)
    assert torch.cuda.current_device() == "cpu"
    megatron_cpu.disable()
    assert torch.cuda.current_device is orig
    assert not megatron_cpu.is_enabled()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA"):
        megatron_cpu.enable(0)


def test_cuda_to_cpu_mode_redirects_factories():
    with megatron_cpu.CudaToCpuMode():
        t = torch.zeros(3, device="cuda")
        assert t.device.type == "cpu"
        assert t.cuda() is t
