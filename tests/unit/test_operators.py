"""HessianOperator and friends against dense references (torch.autograd.functional.hessian + eigvalsh)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from lrscale_megatron.curvature import (
    BlockOperator,
    HessianOperator,
    PreconditionedOperator,
    hutchinson_trace,
    lanczos,
    power_iteration,
    slq_density,
)
from lrscale_megatron.curvature.blocks import transformer_blocks
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

torch.set_num_threads(2)


def dense_hessian(model: nn.Module, loss_fn, batch) -> np.ndarray:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def f(flat):
        parts = torch.split(flat, sizes)
        pd = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return loss_fn(_Call(model, pd), batch)

    return torch.autograd.functional.hessian(f, flat0, vectorize=True).numpy()


class _Call:
    def __init__(self, model, pd):
        self.model, self.pd = model, pd

    def __call__(self, *a, **k):
        return functional_call(self.model, self.pd, a, k)


def mlp_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return model, loss_fn, (x, y)


def gpt_problem(seed=0, **kw):
    cfg = TorchGPTConfig(
        **{"vocab_size": 16, "seq_length": 6, "hidden_size": 8, "num_layers": 2, "num_heads": 2, **kw}
    )
    model = TorchGPT(cfg).double()
    model.init_weights(seed)
    with torch.no_grad():  # move away from the symmetric init so the spectrum is generic
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, cfg.vocab_size, (4, cfg.seq_length + 1), generator=g)
    return model, torch_gpt_loss, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def gpt_dense():
    model, loss_fn, batch = gpt_problem()
    H = dense_hessian(model, loss_fn, batch)
    return model, loss_fn, batch, H


@pytest.mark.parametrize("problem", ["mlp", "gpt"])
def test_lanczos_top5_matches_eigvalsh(problem, gpt_dense):
    if problem == "mlp":
        model, loss_fn, batch = mlp_problem()
        H = dense_hessian(model, loss_fn, batch)
    else:
        model, loss_fn, batch, H = gpt_dense
    assert np.allclose(H, H.T, atol=1e-10)
    ref = np.sort(np.linalg.eigvalsh(H))[::-1][:5]
    op = HessianOperator(model, loss_fn, batch, mode="exact")
    res = lanczos(op, k=5, max_iter=min(H.shape[0], 200), tol=1e-9, seed=0)
    assert res.converged, res.reason
    for got, want in zip(res.eigenvalues, ref):
        assert rel(got, want) < 1e-6, (res.eigenvalues, ref)
    assert res.n_matvec == op.n_matvec


def test_hvp_modes_match_dense_product(gpt_dense):
    model, loss_fn, batch, H = gpt_dense
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = H @ v.numpy()
    for mode, scheme, tol in [
        ("exact", "forward", 1e-10),
        ("jvp", "forward", 1e-10),
        ("fd", "central", 1e-6),
        ("fd", "forward", 1e-4),
    ]:
        op = HessianOperator(model, loss_fn, batch, mode=mode, fd_scheme=scheme)
        parts = list(torch.split(v, [p.numel() for p in op.params]))
        vv = [t.view_as(p) for t, p in zip(parts, op.params)]
        got = torch.cat([x.reshape(-1) for x in op.matvec(vv)]).numpy()
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < tol, (mode, scheme, err)


def test_forward_fd_reuses_cached_gradient(gpt_dense):
    model, loss_fn, batch, _ = gpt_dense
    op = HessianOperator(model, loss_fn, batch, mode="fd", fd_scheme="forward")
    v = op.backend.randn(0)
    op.matvec(v)
    op.matvec(v)
    op.matvec(v)
    assert op.n_grad == 4  # one base gradient + one per product
    central = HessianOperator(model, loss_fn, batch, mode="fd", fd_scheme="central")
    central.matvec(v)
    assert central.n_grad == 2


def test_fd_restores_parameters_exactly(gpt_dense):
    model, loss_fn, batch, _ = gpt_dense
    before = [p.detach().clone() for p in model.parameters()]
    op = HessianOperator(model, loss_fn, batch, mode="fd", fd_scheme="central")
    op.matvec(op.backend.randn(1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_exact_fd_jvp_agree_on_lambda_max_plain_gpt():
    cfg = TorchGPTConfig(vocab_size=64, seq_length=16, hidden_size=32, num_layers=2, num_heads=4)
    model = TorchGPT(cfg).double()
    model.init_weights(0)
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, 64, (4, 17), generator=g)
    batch = {"tokens": tok[:, :-1], "labels": tok[:, 1:]}
    lam = {}
    for mode, scheme in [("exact", "forward"), ("jvp", "forward"), ("fd", "central"), ("fd", "forward")]:
        op = HessianOperator(model, torch_gpt_loss, batch, mode=mode, fd_scheme=scheme)
        res = lanczos(op, k=1, max_iter=40, tol=1e-8, seed=0)
        lam[(mode, scheme)] = res.eigenvalues[0]
    ref = lam[("exact", "forward")]
    for k, v in lam.items():
        assert rel(v, ref) < 1e-4, (k, v, ref)


def test_sdpa_model_double_backward_uses_math_kernel():
    model, loss_fn, batch = gpt_problem(use_sdpa=True)
    ref_model, _, _ = gpt_problem(use_sdpa=False)
    v = HessianOperator(ref_model, loss_fn, batch).backend.randn(0)
    a = HessianOperator(model, loss_fn, batch, mode="exact").matvec(v)
    b = HessianOperator(ref_model, loss_fn, batch, mode="exact").matvec(v)
    assert max(float((x - y).norm() / y.norm()) for x, y in zip(a, b)) < 1e-10


def test_microbatches_average_to_full_batch(gpt_dense):
    model, loss_fn, batch, _ = gpt_dense
    halves = [{k: t[:2] for k, t in batch.items()}, {k: t[2:] for k, t in batch.items()}]
    full = HessianOperator(model, loss_fn, batch)
    split = HessianOperator(model, loss_fn, halves)
    v = full.backend.randn(5)
    a, b = full.matvec(v), split.matvec(v)
    assert max(float((x - y).norm() / y.norm()) for x, y in zip(b, a)) < 1e-12


def test_hutchinson_and_slq_on_dense_reference(gpt_dense):
    model, loss_fn, batch, H = gpt_dense
    op = HessianOperator(model, loss_fn, batch)
    tr = hutchinson_trace(op, n_samples=60, seed=0)
    assert abs(tr.estimate - np.trace(H)) <= 3 * tr.stderr
    dens = slq_density(op, n_probes=2, n_iter=30, seed=0)
    assert abs(np.trapezoid(dens.density, dens.grid) - 1.0) < 1e-6


def test_power_iteration_agrees_with_lanczos():
    model, loss_fn, batch = mlp_problem()
    op = HessianOperator(model, loss_fn, batch)
    lz = lanczos(op, k=1, max_iter=60, tol=1e-10, seed=0)
    pw = power_iteration(op, max_iter=2000, tol=1e-7, seed=0)
    assert rel(pw.eigenvalues[0], lz.eigenvalues[0]) < 1e-5
    assert lz.n_matvec < pw.n_matvec


def test_block_operator_equals_dense_sub_block(gpt_dense):
    model, loss_fn, batch, H = gpt_dense
    op = HessianOperator(model, loss_fn, batch)
    blocks = transformer_blocks(op.backend)
    assert list(blocks)[:3] == ["embedding", "layers.0", "layers.1"]
    offsets = np.cumsum([0] + [p.numel() for p in op.params])
    for name, idx in blocks.items():
        cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx])
        want = np.linalg.eigvalsh(H[np.ix_(cols, cols)])[-1]
        res = lanczos(BlockOperator(op, idx), k=1, max_iter=min(len(cols), 150), tol=1e-10, seed=0)
        assert rel(res.eigenvalues[0], want) < 1e-6, name
        # the same block through parameter restriction (H restricted to the block, others fixed)
        names = [op.named_params[i][0] for i in idx]
        res2 = lanczos(op.restrict(names), k=1, max_iter=min(len(cols), 150), tol=1e-10, seed=0)
        assert rel(res2.eigenvalues[0], want) < 1e-6, name


def test_adam_preconditioned_operator_matches_dense(gpt_dense):
    model, loss_fn, batch, H = gpt_dense
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: state fills, weights stay
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
    op = HessianOperator(model, loss_fn, batch)
    pre = PreconditionedOperator.from_optimizer(op, opt)
    vhat = torch.cat([(opt.state[p]["exp_avg_sq"] / (1 - 0.999**3)).reshape(-1) for p in op.params]).numpy()
    d = 1.0 / np.sqrt(np.sqrt(vhat) + 1e-8)
    want = np.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1]
    res = lanczos(pre, k=1, max_iter=150, tol=1e-9, seed=0)
    assert rel(res.eigenvalues[0], want) < 1e-6


def test_preconditioner_needs_adam_state(gpt_dense):
    model, loss_fn, batch, _ = gpt_dense
    op = HessianOperator(model, loss_fn, batch)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        PreconditionedOperator.from_optimizer(op, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="betas"):
        PreconditionedOperator.from_optimizer(op, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.parametrize("mode", ["exact", "fd", "jvp"])
def test_nan_loss_is_reported_not_converged(mode):
    model, loss_fn, batch = mlp_problem()

    def nan_loss(m, b):
        return loss_fn(m, b) * float("nan")

    res = lanczos(HessianOperator(model, nan_loss, batch, mode=mode), k=1, max_iter=10, seed=0)
    assert not res.converged
    assert "non-finite" in (res.reason or "")


def test_inf_in_product_is_reported():
    model, loss_fn, batch = mlp_problem()
    op = HessianOperator(model, loss_fn, batch)
    calls = {"n": 0}
    inner = op.matvec

    def flaky(v):
        calls["n"] += 1
        out = inner(v)
        if calls["n"] == 4:
            out[0][0].fill_(math.inf)
        return out

    op.matvec = flaky  # type: ignore[method-assign]
    res = lanczos(op, k=1, max_iter=20, tol=1e-12, seed=0)
    assert not res.converged and "non-finite" in (res.reason or "")


def test_bf16_model_accumulates_in_fp32():
    model, loss_fn, batch = mlp_problem()
    ref = lanczos(HessianOperator(model, loss_fn, batch), k=1, max_iter=40, tol=1e-8, seed=0).eigenvalues[0]
    m16 = model.to(torch.bfloat16)
    b16 = (batch[0].to(torch.bfloat16), batch[1])
    op = HessianOperator(m16, lambda m, b: loss_fn(m, b).float(), b16)
    assert op.backend.dtype == torch.float32
    hv = op.matvec(op.backend.randn(0))
    assert all(h.dtype == torch.float32 for h in hv)
    lam = lanczos(op, k=1, max_iter=40, tol=1e-3, seed=0).eigenvalues[0]
    assert rel(lam, ref) < 0.1


def test_bad_arguments_name_the_field():
    model, loss_fn, batch = mlp_problem()
    with pytest.raises(ValueError, match="mode='second'"):
        HessianOperator(model, loss_fn, batch, mode="second")
    with pytest.raises(ValueError, match="fd_scheme='backward'"):
        HessianOperator(model, loss_fn, batch, fd_scheme="backward")
    with pytest.raises(ValueError, match="fd_eps"):
        HessianOperator(model, loss_fn, batch, mode="fd", fd_eps=-1.0)
    with pytest.raises(ValueError, match="no trainable parameter named"):
        HessianOperator(model, loss_fn, batch, params=["nope.weight"])
    with pytest.raises(ValueError, match="grad_fn"):
        HessianOperator(model, loss_fn, batch, mode="exact", grad_fn=lambda: (0.0, []))


def test_resolve_context_single_process_without_distributed():
    import torch.distributed as dist

    from lrscale_megatron.parallel import ParallelContext, resolve_context

    assert not dist.is_initialized()
    ctx = resolve_context()
    assert (ctx.tp_size, ctx.pp_size, ctx.dp_size, ctx.world_size) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"tp\(2\) \* pp\(1\) \* dp\(1\) = 2 != world_size\(1\)"):
        ParallelContext(tp_size=2)


def test_forward_fd_base_gradient_follows_parameter_updates(gpt_dense):
    model, loss_fn, batch, _ = gpt_dense
    model = __import__("copy").deepcopy(model)
    op = HessianOperator(model, loss_fn, batch, mode="fd", fd_scheme="forward")
    v = op.backend.randn(0)
    op.matvec(v)
    op.matvec(v)
    assert op.n_grad == 3  # the cache survives the operator's own (exactly undone) perturbations
    with torch.no_grad():
        next(model.parameters()).add_(0.1)  # an optimizer step
    hv = op.matvec(v)
    assert op.n_grad == 5  # base gradient recomputed at the new parameters
    ref = HessianOperator(model, loss_fn, batch, mode="exact").matvec(v)
    assert max(float((a - b).norm() / b.norm()) for a, b in zip(hv, ref)) < 1e-5
