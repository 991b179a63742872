"""An in-process job (init_megatron ... shutdown) leaves the process as it found it: no MASTER_PORT a later
child process would inherit while this one still listens on it (EADDRINUSE), no CPU shims on torch.cuda."""

from __future__ import annotations

import os

import torch

from lrscale_megatron.launch import init_megatron, shutdown

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


def test_shutdown_restores_environment_and_torch_cuda(monkeypatch):
    for k in DIST_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # a variable the user set stays
    current_device = torch.cuda.current_device
    init_megatron(1, 1, seed=0)
    assert os.environ["MASTER_PORT"] and os.environ["WORLD_SIZE"] == "1"
    assert torch.cuda.current_device is not current_device  # CPU shims on
    shutdown()
    assert [k for k in DIST_ENV if k in os.environ] == ["MASTER_ADDR"]
    assert torch.cuda.current_device is current_device
