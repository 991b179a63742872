"""fd on the Adam-preconditioned Hessian of a model with a dead parameter: right or refused (issue 9).

The causal Mixer's ``token_bias`` is a per-position constant added across channels, which every LayerNorm
removes: its gradient is round-off, Adam's ``v̂`` is round-off squared and ``P^-1/2`` ~ ``1/sqrt(eps)`` there,
which amplifies the finite-difference product's round-off (docs/benchmarks.md, "Mixer outlier reading").
On the CPU target that made fd refuse most measurements. Since the preconditioned operator leaves out the
coordinates at the round-off floor (``preconditioned.ROUNDOFF_ULPS``), fd converges to the right value on
the whole model; it must never converge to a wrong one. Checked against the dense float64 ``P^-1/2 H P^-1/2`` of a tiny float32 Mixer after a few AdamW steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrscale_megatron.measurement import measure_lambda_max
from lrscale_megatron.models.gpt import gpt_loss_fn
from lrscale_megatron.moments import second_moments
from tests.unit.test_cross_arch_curvature import dense_hessian, tiny_mixer


@pytest.fixture(scope="module")
def trained():
    model, batch = tiny_mixer()
    model = model.float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        gpt_loss_fn(model, batch).backward()
        opt.step()
    params = list(model.parameters())
    v_hat, eps = second_moments(opt, params)
    ref = tiny_mixer()[0]  # float64 copy of the trained parameters
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    h = dense_hessian(ref, batch)
    d = np.concatenate([(1.0 / np.sqrt(np.sqrt(v.double().numpy().ravel()) + eps)) for v in v_hat])
    want = float(np.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    return model, batch, opt, v_hat, eps, want


def test_the_dead_bias_has_round_off_gradient_and_the_largest_preconditioner(trained):
    model, _, _, v_hat, eps, _ = trained
    names = [n for n, _ in model.named_parameters()]
    scale = {n: float((torch.sqrt(v) + eps).rsqrt().max()) for n, v in zip(names, v_hat)}
    dead = [n for n in names if n.endswith("token_bias")]
    assert dead and all(scale[n] > 3e3 for n in dead), scale  # sqrt(v̂) at or below Adam's eps
    live = [s for n, s in scale.items() if "token" not in n]
    assert max(live) < 1e3, scale


@pytest.mark.parametrize("seed", [0, 1])
def test_fd_preconditioned_is_right_on_the_whole_model(trained, seed):
    """Before the round-off floor: refused on every seed (noise eigenvalues 4e4-6e4 for a true 421)."""
    model, batch, opt, _, _, want = trained
    kw = dict(optimizer=opt, max_iter=20, tol=1e-2, seed=seed)
    est = measure_lambda_max(model, gpt_loss_fn, batch, mode="fd", **kw)
    assert est.converged and abs(est.lambda_max - want) <= 0.03 * want, (est, want)
    exact = measure_lambda_max(model, gpt_loss_fn, batch, mode="exact", **{**kw, "max_iter": 40, "tol": 1e-3})
    assert exact.converged and abs(exact.lambda_max - want) <= 1e-2 * want, (exact, want)


def test_without_the_dead_bias_fd_converges_to_the_reference(trained):
    """The refusals come from the dead parameter: the same fd measurement without it is right (its
    Hessian rows are zero, so the top eigenvalue is the full operator's)."""
    model, batch, opt, _, _, want = trained
    live = [p for n, p in model.named_parameters() if not n.endswith("token_bias")]
    est = measure_lambda_max(model, gpt_loss_fn, batch, params=live, mode="fd", optimizer=opt, tol=1e-2)
    assert est.converged and abs(est.lambda_max - want) <= 0.03 * want, (est, want)
