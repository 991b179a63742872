"""The fd product's per-evaluation guards made cheaper (helper ``fd256``) still catch what they caught.

* the module walk of :func:`deterministic_loss` is ``model.modules()`` (shared submodules once, ``None``
  entries skipped), and runs at every evaluation: a module ``loss_fn`` creates is in ``eval()`` in the
  next evaluation, and every flag is restored after;
* the random generators are saved and restored directly (no ``fork_rng``): seeded inside, the training
  run's stream untouched after, also when ``loss_fn`` raises;
* :func:`math_sdpa` leaves only the math kernel on inside and restores any previous flags (also on an
  exception), like ``sdpa_kernel(SDPBackend.MATH)`` (its fallback);
* the autocast guard's fast path still refuses autocast (and Transformer Engine's FP8) switched on
  between two products of one solve, and the parameters are ``theta0`` bit for bit after the refusal;
* the fd product's version-keyed caches read through one anchor key: a parameter modified between two
  products of a solve gives the product at the modified parameters, bit for bit a fresh operator's.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
from torch import nn
from torch.nn.attention import _cur_sdpa_kernel_backends

from lrscale_megatron.curvature import HessianOperator, evaluation, norm_hint
from lrscale_megatron.curvature.autocast_guard import AutocastRefused
from lrscale_megatron.curvature.evaluation import (
    MEASUREMENT_SEED,
    all_modules,
    deterministic_loss,
    math_sdpa,
)
from lrscale_megatron.curvature.solve_scope import DIRTY, solve_scope
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss


def _gpt():
    model = TorchGPT(TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=2, num_heads=2))
    model.init_weights(0)
    tok = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def _loss(m, b):
    return torch_gpt_loss(m, b).float()


def _unit(op):
    v = op.backend.randn(0)
    n = op.backend.norm(v)
    return [x / n for x in v]


def _bits(ts):
    return [t.detach().clone().contiguous().view(torch.int32) for t in ts]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_module_walk_is_model_modules_with_shared_and_none_entries():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(
        nn.Linear(3, 3), nn.ModuleList([shared, nn.Sequential(shared, nn.Dropout(0.5))]), nn.ReLU()
    )
    model.register_module("absent", None)
    model[1][1].add_module("nested", nn.Sequential(nn.Tanh(), shared))
    got = all_modules(model)
    assert [id(m) for m in got] == [id(m) for m in model.modules()]  # same modules, same order, each once


def test_every_flag_is_eval_inside_and_restored_after_and_a_new_module_is_switched_next_time():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Sequential(nn.Dropout(0.1)))
    model[2].eval()  # mixed flags: restored as they were
    flags = [m.training for m in model.modules()]
    with deterministic_loss(model):
        assert not any(m.training for m in model.modules())
        model.add_module("late", nn.Dropout(0.5))  # created during an evaluation: training=True
        assert model.late.training
    assert [m.training for m in model.modules()][: len(flags)] == flags
    with deterministic_loss(model):  # the next evaluation walks the modules again
        assert not model.late.training
    assert model.late.training
    with pytest.raises(RuntimeError), deterministic_loss(model):
        raise RuntimeError("in loss_fn")
    assert [m.training for m in model.modules()][: len(flags)] == flags and model.late.training
    with deterministic_loss(model, eval_mode=False):
        assert [m.training for m in model.modules()][: len(flags)] == flags


def test_the_generators_are_seeded_inside_and_the_training_stream_is_untouched():
    lin = nn.Linear(2, 2)
    ref = torch.Generator().manual_seed(MEASUREMENT_SEED)
    seeded, seeded_normal = torch.rand(4, generator=ref), torch.randn(3, generator=ref)
    torch.manual_seed(7)
    torch.randn(1)  # a cached second normal sample in the training stream: not seen inside
    before = torch.get_rng_state()
    for _ in range(2):
        with deterministic_loss(lin):
            assert torch.equal(torch.rand(4), seeded)  # the same draws in every evaluation
            assert torch.equal(torch.randn(3), seeded_normal)
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(KeyboardInterrupt), deterministic_loss(lin):
        torch.rand(100)
        raise KeyboardInterrupt
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    torch.randn(1)
    expected_next = torch.randn(5)  # the same stream (cached normal included) without any measurement
    torch.manual_seed(7)
    torch.randn(1)
    with deterministic_loss(lin):
        torch.randn(7)
    assert torch.equal(torch.randn(5), expected_next)


def test_functional_dropout_in_the_loss_draws_the_same_mask_in_every_product():
    model, batch = _gpt()

    def noisy(m, b):  # dropout no eval() can switch off: the fixed generator makes it the same each time
        return torch.nn.functional.dropout(_loss(m, b), p=0.5, training=True) * 0.5

    op = HessianOperator(model, noisy, batch, mode="fd")
    v = _unit(op)
    a, b = op.matvec(v), op.matvec(v)
    assert _same(_bits(a), _bits(b))


@pytest.mark.parametrize("fallback", [False, True])
def test_math_sdpa_sets_the_math_kernel_only_and_restores_any_previous_flags(monkeypatch, fallback):
    if fallback:  # another torch without the flag functions: the public context manager
        monkeypatch.setattr(evaluation, "_SDP", None)
    from torch.nn.attention import SDPBackend

    default = _cur_sdpa_kernel_backends()
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        before = _cur_sdpa_kernel_backends()
        assert SDPBackend.FLASH_ATTENTION not in before and SDPBackend.MATH in before
        with math_sdpa():
            assert _cur_sdpa_kernel_backends() == [SDPBackend.MATH]
        assert _cur_sdpa_kernel_backends() == before
        with pytest.raises(ValueError), math_sdpa():
            raise ValueError
        assert _cur_sdpa_kernel_backends() == before
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert _cur_sdpa_kernel_backends() == default


def _anchored(model, loss_fn, batch):
    op = HessianOperator(model, loss_fn, batch, mode="fd")
    assert op.allow_anchor()
    return op


@pytest.mark.parametrize("what", ["autocast", "fp8"])
def test_autocast_switched_on_between_two_products_of_a_solve_is_refused(monkeypatch, what):
    model, batch = _gpt()
    before = _bits(model.parameters())
    calls = [0]
    fp8_on = [False]
    if what == "fp8":  # a stand-in for Transformer Engine's FP8 state (the guard reads it when imported)
        fake = types.ModuleType("transformer_engine.pytorch.fp8")
        fake.FP8GlobalStateManager = types.SimpleNamespace(is_fp8_enabled=lambda: fp8_on[0])  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.fp8", fake)

    def loss_fn(m, b):
        calls[0] += 1
        low = calls[0] >= 3  # base gradient, first product: float32; the second product: low precision
        if what == "fp8":
            fp8_on[0] = low
            try:
                return _loss(m, b)
            finally:
                fp8_on[0] = False
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            return _loss(m, b)

    op = _anchored(model, loss_fn, batch)
    v = _unit(op)
    with solve_scope():
        norm_hint.remember(v, 1.0)
        op.matvec(v)
        assert op._anchor is not None and op._anchor.written  # left lazy: theta0 + h v in place
        with pytest.raises(AutocastRefused):
            op.matvec(v)
        assert not DIRTY
    assert _same(_bits(model.parameters()), before)  # theta0 back, bit for bit
    assert not torch.nn.modules.module._global_forward_pre_hooks


def test_a_parameter_modified_between_two_products_gives_the_product_there_bit_for_bit():
    model, batch = _gpt()
    op = _anchored(model, _loss, batch)
    v = _unit(op)
    with solve_scope():
        norm_hint.remember(v, 1.0)
        op.matvec(v)  # leaves theta0 + h v in place
        with torch.no_grad():
            model.blocks[0].fc1.weight.add_(1e-3)  # moved while the anchor is dirty: kept as it is
        moved = copy.deepcopy(model)  # the parameters now: theta0 + h v + delta in one tensor
        got = op.matvec(v)
        ref_op = HessianOperator(moved, _loss, batch, mode="fd", fd_restore="subtract")
        ref = ref_op.matvec(v)
        assert op._theta_norm is not None and ref_op._theta_norm is not None
        assert op._theta_norm[1] == ref_op._theta_norm[1]  # ||theta|| re-taken at the moved parameters
    assert _same(_bits(got), _bits(ref))
    assert _same(_bits(model.parameters()), _bits(moved.parameters()))
