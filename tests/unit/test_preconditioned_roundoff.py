"""The Adam-preconditioned fd product where a parameter's gradient is float round-off (issue 11, third pass).

An attention key bias shifts every score of a softmax row by the same amount: the loss does not depend on it,
its gradient is round-off, Adam's ``v̂`` there is round-off squared, and ``P^-1/2 = (sqrt(v̂) + eps)^-1/2``
is ~1e4 there. The fd product perturbs those coordinates 1e4x harder than the others and multiplies the
round-off of their gradient difference by 1e4 again: on the megatron-core ``tiny`` GPT after 1000 AdamW
steps the fd + preconditioned measurement ran to ``max_iter`` (Ritz value 3755 vs 2374 exact)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos
from lrscale_megatron.measurement import measure_lambda_max


class KeyBiasLM(nn.Module):
    """One causal attention head with a bias on q, k and v, then a linear read-out."""

    def __init__(self, vocab: int = 16, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, vocab)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        q, k, v = self.qkv(h).split(self.dim, dim=-1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.dim)
        n = x.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        return self.out(h + torch.softmax(s, dim=-1) @ v)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


class _Scaled64:
    """``D H D`` of a float64 copy by exact products, with ``D = (sqrt(v̂) + eps)^-1/2`` over every coordinate
    (no exclusion): the independent reference."""

    def __init__(self, model: nn.Module, batch: torch.Tensor, vhat: list[torch.Tensor]) -> None:
        self.op = HessianOperator(copy.deepcopy(model).double(), lm_loss, batch, mode="exact")
        self.backend = self.op.backend
        self.d = [(v.double().sqrt() + 1e-8).rsqrt() for v in vhat]

    def matvec(self, v):
        w = self.op.matvec([x * d for x, d in zip(v, self.d)])
        return [x * d for x, d in zip(w, self.d)]

    __call__ = matvec


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = KeyBiasLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        loss = lm_loss(model, torch.randint(0, 16, (8, 9), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = torch.randint(0, 16, (8, 9), generator=g)
    vhat = [opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** opt.state[p]["step"]) for p in model.parameters()]
    ref = lanczos(_Scaled64(model, held, vhat), k=1, max_iter=200, tol=1e-7, seed=0)
    assert ref.converged, ref.reason
    return model, opt, held, float(ref.eigenvalues[0])


def test_key_bias_is_at_the_roundoff_floor(trained):
    """The premise: the key bias's v̂ is round-off (so P^-1/2 ~ 1e4 there), the rest is not."""
    model, opt, _, _ = trained
    vk = opt.state[model.qkv.bias]["exp_avg_sq"][8:16]
    vq = opt.state[model.qkv.bias]["exp_avg_sq"][:8]
    assert float(vk.sqrt().max()) < 1e-8 < float(vq.sqrt().min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_preconditioned_matches_float64_reference(trained, seed):
    model, opt, held, want = trained
    est = measure_lambda_max(model, lm_loss, held, mode="fd", optimizer=opt, max_iter=30, tol=1e-2, seed=seed)
    assert est.converged, est.reason
    assert abs(est.lambda_max / want - 1) < 1e-2, (est.lambda_max, want)


def test_roundoff_coordinates_are_excluded_and_reported(trained):
    model, opt, held, want = trained
    pre = PreconditionedOperator.from_optimizer(HessianOperator(model, lm_loss, held, mode="exact"), opt)
    assert pre.n_excluded == 8  # the key bias, nothing else
    res = lanczos(pre, k=1, max_iter=200, tol=1e-6, seed=0)
    assert abs(res.eigenvalues[0] / want - 1) < 1e-5  # the exact product: excluding them changes nothing
