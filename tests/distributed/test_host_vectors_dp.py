"""HessianOperator(vectors="host", batch_split=...) under data parallelism (2 gloo ranks): the same
eigenvalue as device vectors (bit for bit at the whole local batch), on every rank, equal to a float64
single-process reference on the whole batch, and every collective on the context's device."""

from __future__ import annotations

import copy
import glob
import os

import torch
from torch import nn

from lrscale_megatron.curvature import HessianOperator, lanczos
from tests.distributed._launch import torchrun

WORKER = os.path.join(os.path.dirname(__file__), "host_vectors_worker.py")


def test_host_vectors_under_data_parallelism_match_device_vectors_and_a_float64_reference(tmp_path):
    torchrun(2, WORKER, "--out", str(tmp_path))
    ranks = [torch.load(f, weights_only=False) for f in sorted(glob.glob(str(tmp_path / "rank*.pt")))]
    assert len(ranks) == 2
    torch.manual_seed(0)
    m16 = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 4)).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=g).to(torch.bfloat16), torch.randint(0, 4, (64,), generator=g)
    m64 = copy.deepcopy(m16).double()
    ref = lanczos(
        HessianOperator(m64, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x.double(), y)),
        k=1,
        max_iter=60,
        tol=1e-8,
        seed=0,
    ).eigenvalues[0]
    for r in ranks:
        assert r["devices"] == [r["ctx_device"]]
        assert r["host,1"] == r["device,1"]  # the same products bit for bit
        for key in ("device,1", "host,1", "device,2", "host,2"):
            lam, converged, _ = r[key]
            assert converged and abs(lam - ref) / ref < 2e-3, (key, lam, ref)
            assert lam == ranks[0][key][0]  # every rank reports the same value
