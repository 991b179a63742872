"""``OnlineConfig.basis`` reaches the solver: the host-kept basis and the second pass give the dense
Hessian's top eigenvalue, the second pass at more products; a bad value is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrscale_megatron.configs.base import ConfigError
from lrscale_megatron.measurement import curvature_estimator, measure_lambda_max
from lrscale_megatron.online_config import OnlineConfig


def _problem():
    torch.manual_seed(0)
    x = torch.randn(64, 12, dtype=torch.float64) * torch.linspace(0.2, 3.0, 12, dtype=torch.float64)
    y = torch.randn(64, 3, dtype=torch.float64)
    model = torch.nn.Linear(12, 3, bias=False).double()

    def loss_fn(m, batch):
        return ((m(batch[0]) - batch[1]) ** 2).mean()

    # loss = mean over 64*3 entries: H = 2/(64*3) * kron(I_3, X^T X); top eigenvalue of that
    want = float(np.linalg.eigvalsh(2.0 / (64 * 3) * (x.T @ x).numpy())[-1])
    return model, loss_fn, (x, y), want


@pytest.mark.parametrize("basis", ["host", "recompute", "auto"])
def test_every_basis_gives_the_dense_eigenvalue(basis):
    model, loss_fn, batch, want = _problem()
    est = measure_lambda_max(model, loss_fn, batch, mode="exact", max_iter=12, tol=1e-8, basis=basis)
    assert est.converged and est.lambda_max == pytest.approx(want, rel=1e-8)


def test_the_online_setting_reaches_the_solver():
    model, loss_fn, batch, want = _problem()
    counts = {}
    for basis in ("host", "recompute"):
        online = OnlineConfig(hvp="exact", precondition=False, tol=1e-8, max_iter=12, basis=basis)
        est = curvature_estimator(model, loss_fn, batch, online, sync=False, check=False)(None)
        assert est.converged and est.lambda_max == pytest.approx(want, rel=1e-8)
        counts[basis] = est.n_matvec
    assert counts["recompute"] > counts["host"]  # the second pass re-runs the recurrence


def test_a_bad_basis_names_the_field():
    with pytest.raises(ConfigError, match="basis"):
        OnlineConfig(basis="disk")
