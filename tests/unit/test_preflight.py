"""preflight: what an online measurement cannot measure is refused when the estimator is attached,
naming the setting and the fix; the memory estimate is independent of max_iter and refuses what does
not fit. Megatron settings are set on a real megatron-core TransformerConfig (its field names)."""

from __future__ import annotations

import types

import pytest
import torch
from megatron.core.transformer import TransformerConfig

from lrscale_megatron.adapter import OnlineConfig
from lrscale_megatron.measurement import (
    MeasurementRefused,
    curvature_estimator,
    measurement_memory,
    preflight,
)


def _model(**config) -> torch.nn.Module:
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    cfg = TransformerConfig(num_layers=2, hidden_size=8, num_attention_heads=2)
    for k, v in config.items():
        assert hasattr(cfg, k), k  # a real megatron field name
        object.__setattr__(cfg, k, v)
    m.config = cfg  # type: ignore[assignment]
    return m


def _adam(m):
    return torch.optim.AdamW(m.parameters(), lr=1e-3)


FD, EXACT = OnlineConfig(enabled=True, hvp="fd"), OnlineConfig(enabled=True, hvp="exact")


def test_plain_dense_model_passes_and_reports_memory():
    m = _model()
    mem = preflight(m, _adam(m), FD)
    n = sum(p.numel() for p in m.parameters())
    assert mem.n_params == n and mem.total_bytes > 0 and mem.graph_bytes == 0
    assert "hvp=fd" in mem.render()


@pytest.mark.parametrize(
    "setting,value,field",
    [
        ("sequence_parallel", True, "sequence_parallel"),
        ("context_parallel_size", 2, "context_parallel_size"),
        ("virtual_pipeline_model_parallel_size", 2, "virtual_pipeline_model_parallel_size"),
        ("num_moe_experts", 8, "expert parallel"),
        ("expert_model_parallel_size", 2, "expert parallel"),
    ],
)
@pytest.mark.parametrize("online", [FD, EXACT], ids=["fd", "exact"])
def test_unsupported_layouts_refused_in_both_modes(setting, value, field, online):
    m = _model(**{setting: value})
    with pytest.raises(MeasurementRefused, match="Fix:") as e:
        preflight(m, _adam(m), online)
    assert field in str(e.value)


def test_activation_recompute_exact_refused_fd_needs_schedule_gradients():
    m = _model(recompute_granularity="full")
    with pytest.raises(MeasurementRefused, match="recompute_granularity.*hvp='fd'"):
        preflight(m, _adam(m), EXACT)
    with pytest.raises(MeasurementRefused, match="schedule_grad_fn"):
        preflight(m, _adam(m), FD)
    assert preflight(m, _adam(m), FD, grad_fn=lambda: (0.0, [])).mode == "fd"


def test_zero3_refused_by_engine_stage_and_by_partitioned_params():
    m = _model()
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 3, module=m, optimizer=_adam(m))
    with pytest.raises(MeasurementRefused, match="zero_optimization.stage=3.*stage 0, 1 or 2"):
        preflight(m, None, FD, engine=engine)
    m2 = _model()
    next(m2.parameters()).ds_id = 0  # what ZeRO-3 puts on its partitioned parameters
    with pytest.raises(MeasurementRefused, match="ZeRO-3"):
        preflight(m2, _adam(m2), FD)


def test_virtual_pipeline_chunks_refused():
    with pytest.raises(MeasurementRefused, match="virtual"):
        preflight([_model(), _model()], None, FD)


def test_preconditioning_needs_an_adam_optimizer():
    m = _model()
    with pytest.raises(MeasurementRefused, match="not Adam-type.*precondition=false"):
        preflight(m, torch.optim.SGD(m.parameters(), lr=0.1), FD)
    with pytest.raises(MeasurementRefused, match="no optimizer"):
        preflight(m, None, FD)
    raw = OnlineConfig(enabled=True, hvp="fd", precondition=False, rule="inverse")
    assert not preflight(m, torch.optim.SGD(m.parameters(), lr=0.1), raw).precondition


def test_deepspeed_style_wrapper_is_unwrapped_to_its_adam():
    m = _model()
    wrapper = types.SimpleNamespace(optimizer=_adam(m))  # e.g. DeepSpeedZeroOptimizer.optimizer
    assert preflight(m, wrapper, FD).precondition


def test_memory_fit_is_checked_and_refused_with_the_numbers():
    m = _model()
    mem = preflight(m, _adam(m), EXACT, activation_bytes=10_000)
    assert mem.graph_bytes == 20_000
    preflight(m, _adam(m), EXACT, activation_bytes=10_000, free_bytes=10 * mem.total_bytes)
    with pytest.raises(MeasurementRefused, match="needs .* GiB but .* GiB are free"):
        preflight(m, _adam(m), EXACT, activation_bytes=10_000, free_bytes=mem.total_bytes)
    with pytest.raises(MeasurementRefused, match="free"):  # the training step's reserve counts
        preflight(m, _adam(m), FD, free_bytes=10 * mem.total_bytes, reserve_bytes=10 * mem.total_bytes)


def test_memory_estimate_shape():
    n = 1_000_000
    fd = measurement_memory(n, mode="fd", param_bytes=2)
    exact = measurement_memory(n, mode="exact", param_bytes=2, activation_bytes=5 * n)
    raw = measurement_memory(n, mode="fd", param_bytes=2, precondition=False)
    assert (
        fd.total_bytes == 2 * measurement_memory(n // 2, mode="fd", param_bytes=2).total_bytes
    )  # linear in N
    assert fd.graph_bytes == 0 and exact.graph_bytes == 10 * n
    assert fd.total_bytes - raw.total_bytes == 8 * n  # the preconditioner's scale and scaled input
    with pytest.raises(ValueError, match="mode"):
        measurement_memory(n, mode="jvp", param_bytes=2)


def test_curvature_estimator_runs_preflight_when_attached():
    m = _model(sequence_parallel=True)
    with pytest.raises(MeasurementRefused, match="sequence_parallel"):
        curvature_estimator(
            m, lambda mod, b: mod(b).sum(), torch.ones(2, 4), FD, sync=False, optimizer=_adam(m)
        )


@pytest.mark.parametrize(
    ("dtype", "precondition", "basis"),
    [
        (torch.float32, False, "recompute"),
        (torch.float32, True, "recompute"),
        (torch.bfloat16, False, "recompute"),
        (torch.float32, False, "host"),
        (torch.float32, True, "host"),
        (torch.bfloat16, False, "host"),
    ],
)
def test_fd_estimate_matches_a_counted_measurement(dtype, precondition, basis, monkeypatch):
    """measurement_memory(fd) against the storages a k=1 fd Lanczos measurement (tol=0: every iteration,
    and the second pass with basis="recompute": the worst case) allocates over one training
    forward+backward, counted on CPU; with basis="host", device and host storages counted apart."""
    from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos, perturb
    from lrscale_megatron.curvature.memtrack import HostDeviceBytes, fwd_bwd_peak
    from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

    monkeypatch.setattr(perturb, "PERTURB_CHUNK", 2048)  # chunk temporaries small next to this model
    model = TorchGPT(TorchGPTConfig(vocab_size=64, seq_length=16, hidden_size=32, num_layers=2, num_heads=4))
    model.init_weights(0)
    model = model.to(dtype)
    tok = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": tok[:, :-1], "labels": tok[:, 1:]}

    def loss_fn(m, b):
        return torch_gpt_loss(m, b).float()

    params = list(model.parameters())
    n, pbytes = sum(p.numel() for p in params), params[0].element_size()
    train = fwd_bwd_peak(model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, batch, mode="fd")
    a = op
    if precondition:
        a = PreconditionedOperator(op, [torch.rand(p.shape) for p in params])
    with HostDeviceBytes() as mem2:
        r = lanczos(a, k=1, max_iter=6, tol=0.0, seed=0, return_vectors=True, basis=basis)
        op.release()
        del r
    counted = mem2.peak - train + (4 * n if precondition else 0)  # + the scale, made when attached
    est = measurement_memory(
        n,
        mode="fd",
        param_bytes=pbytes,
        precondition=precondition,
        activation_bytes=train - n * pbytes,
        basis=basis,
        max_iter=6,
    )
    assert est.total_bytes == pytest.approx(counted, rel=0.03), (est.total_bytes / n, counted / n)
    assert est.host_bytes == mem2.host_peak, (est.host_bytes / n, mem2.host_peak / n)
