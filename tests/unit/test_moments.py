"""second_moments on torch optimizers and measure_lambda_max against a dense reference:
the preconditioned top eigenvalue of a float64 least-squares model equals eigvalsh(P^-1/2 H P^-1/2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrscale_megatron.measurement import MomentsUnavailable, measure_lambda_max, second_moments
from lrscale_megatron.parallel import ParallelContext


def _trained(opt_cls=torch.optim.AdamW, steps=3, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1, bias=False).double()
    opt = opt_cls(model.parameters(), lr=1e-2, betas=(0.9, 0.95), **kw)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().mul(0.5).backward()
        opt.step()
    return model, opt, (x, y)


def test_torch_adam_bias_corrected():
    model, opt, _ = _trained()
    (v,), eps = second_moments(opt, list(model.parameters()))
    st = opt.state[model.weight]
    torch.testing.assert_close(v, (st["exp_avg_sq"] / (1 - 0.95**3)).float())
    assert v.dtype == torch.float32 and v.shape == model.weight.shape and eps == 1e-8


def test_amsgrad_reads_the_running_maximum():
    model, opt, _ = _trained(amsgrad=True)
    (v,), _ = second_moments(opt, list(model.parameters()))
    st = opt.state[model.weight]
    torch.testing.assert_close(v, (st["max_exp_avg_sq"] / (1 - 0.95**3)).float())


class _FusedLike(torch.optim.Optimizer):
    """Step count in the param group and no bias correction, as DeepSpeed's FusedAdam can be."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-6, "bias_correction": False})

    def step(self, closure=None):
        for g in self.param_groups:
            g["step"] = g.get("step", 0) + 1
            for p in g["params"]:
                self.state[p].setdefault("exp_avg_sq", torch.zeros_like(p)).mul_(0.95).addcmul_(
                    p.grad, p.grad, value=0.05
                )


def test_group_step_and_no_bias_correction():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = _FusedLike(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    vs, eps = second_moments(opt, list(model.parameters()))
    assert eps == 1e-6
    for v, p in zip(vs, model.parameters()):
        torch.testing.assert_close(v, opt.state[p]["exp_avg_sq"])  # no correction applied


def test_refusals_name_the_fix():
    model = torch.nn.Linear(3, 1)
    with pytest.raises(MomentsUnavailable, match="take at least one optimizer step"):
        second_moments(torch.optim.AdamW(model.parameters()), list(model.parameters()))
    with pytest.raises(MomentsUnavailable, match="precondition=false"):
        second_moments(torch.optim.SGD(model.parameters(), lr=0.1), list(model.parameters()))
    other = torch.nn.Linear(3, 1)
    _, opt, _ = _trained()
    with pytest.raises(MomentsUnavailable, match="not in"):
        second_moments(opt, list(other.parameters()))
    p = torch.nn.Parameter(torch.zeros(2))
    p.ds_id = 3  # a ZeRO-3 partitioned parameter
    with pytest.raises(MomentsUnavailable, match="ZeRO stage 3"):
        second_moments(opt, [p])


def test_preconditioned_lambda_equals_dense_reference():
    model, opt, (x, y) = _trained()
    est = measure_lambda_max(
        model,
        lambda m, b: ((m(b[0]) - b[1]) ** 2).mean().mul(0.5),
        (x, y),
        mode="exact",
        max_iter=10,
        tol=1e-10,
        parallel=ParallelContext.single(),
        optimizer=opt,
    )
    h = (x.T @ x / x.shape[0]).numpy()
    v = (opt.state[model.weight]["exp_avg_sq"] / (1 - 0.95**3)).float().double().numpy().ravel()
    s = 1.0 / np.sqrt(np.sqrt(v) + 1e-8)
    ref = np.linalg.eigvalsh(s[:, None] * h * s[None, :])[-1]
    assert est.converged and est.lambda_max == pytest.approx(ref, rel=1e-6)


def test_no_second_moment_gives_not_converged_with_reason():
    model = torch.nn.Linear(3, 1).double()
    est = measure_lambda_max(
        model,
        lambda m, b: m(b).pow(2).mean(),
        torch.randn(4, 3, dtype=torch.float64),
        parallel=ParallelContext.single(),
        optimizer=torch.optim.AdamW(model.parameters()),
    )
    assert (
        not est.converged
        and "no Adam preconditioner" in (est.reason or "")
        and est.lambda_max != est.lambda_max
    )
