"""The LR-free arms: Schedule-Free's train/eval switching follows the model's mode (checked against the
package's independent reference implementation), Prodigy gets the authors' settings, and the arms' train
configs carry the right optimizer and scheduler blocks (no training here)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import schedulefree  # the demo extra: scripts/setup_env.sh always installs it
import torch

from lrscale_megatron.compare.arms import RunSpec, train_config_for
from lrscale_megatron.compare.config import compare_config_from_dict
from lrscale_megatron.compare.optimizers import PRODIGY, SCHEDULEFREE, prodigy, register, schedulefree_adamw
from lrscale_megatron.train.setup import CLIENT_OPTIMIZERS, param_groups

ROOT = Path(__file__).resolve().parents[2]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()


def _loss(m: torch.nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return (m(x) - x.sum(1, keepdim=True)).pow(2).mean()


def test_schedulefree_eval_point_follows_model_mode() -> None:
    ours, ref = _net(), _net()
    opt = schedulefree_adamw(
        ours, [{"params": list(ours.parameters())}], {"lr": 0.05, "betas": [0.9, 0.95], "warmup_steps": 3}
    )
    ref_opt = schedulefree.AdamWScheduleFreeReference(
        ref.parameters(), lr=0.05, betas=(0.9, 0.95), warmup_steps=3
    )
    ref_opt.train()
    ours.train()  # the training loop's engine.train(): must put the optimizer in train mode
    for i in range(12):
        for m, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(m, i).backward()
            o.step()
    y = [p.detach().clone() for p in ours.parameters()]
    ours.eval()  # evaluation: parameters must become the averaged point x
    ref_opt.eval()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(y, ours.parameters())), "eval() did not move to x"
    ours.train()  # and back to y for training
    for a, b in zip(y, ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_schedulefree_refuses_a_step_in_eval_mode() -> None:
    m = _net()
    opt = schedulefree_adamw(m, [{"params": list(m.parameters())}], {"lr": 0.01})
    m.eval()
    _loss(m, 0).backward()
    with pytest.raises(Exception, match="train mode"):
        opt.step()


def test_prodigy_gets_the_authors_settings() -> None:
    m = _net()
    opt = prodigy(
        m,
        param_groups(m),
        {
            "lr": 1.0,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.1,
            "d_coef": 2.0,
            "safeguard_warmup": True,
        },
    )
    g = opt.param_groups[0]
    assert g["lr"] == 1.0 and g["d_coef"] == 2.0 and g["betas"] == (0.9, 0.95)
    assert g["safeguard_warmup"] and g["use_bias_correction"] and g["weight_decay"] == 0.1
    assert opt.param_groups[1]["weight_decay"] == 0.0  # biases keep no decay


def test_arm_train_configs() -> None:
    register()
    assert CLIENT_OPTIMIZERS[SCHEDULEFREE] is schedulefree_adamw and CLIENT_OPTIMIZERS[PRODIGY] is prodigy
    cfg = compare_config_from_dict(
        {
            "train_config": str(ROOT / "configs/gpt/cpu-tiny.json"),
            "steps": 40,
            "seeds": [0],
            "baseline": {"lr": 6e-4, "justification": "GPT-3 paper, Table 2.1, 125M"},
            "arms": [
                "cosine",
                "inverse_sqrt",
                "lrscale_offline",
                "lrscale_online",
                "schedulefree",
                "prodigy",
            ],
            "prodigy": {"d_coef": 0.5},
        }
    )
    cos = train_config_for(cfg, RunSpec("cosine", 6e-4, 0)).deepspeed
    sf = train_config_for(cfg, RunSpec("schedulefree", 0.0025, 0))
    ds = sf.deepspeed
    assert "scheduler" not in ds and ds["optimizer"]["type"] == SCHEDULEFREE
    adamw = cos["optimizer"]["params"]
    for k in ("betas", "eps", "weight_decay"):
        assert ds["optimizer"]["params"][k] == adamw[k]
    assert ds["optimizer"]["params"]["warmup_steps"] == sf.training.warmup_steps and sf.training.lr == 0.0025
    pr = train_config_for(cfg, RunSpec("prodigy", 1.0, 0)).deepspeed
    assert pr["optimizer"]["type"] == PRODIGY and pr["optimizer"]["params"]["d_coef"] == 0.5
    assert pr["scheduler"]["type"] == "WarmupCosineLR" and pr["scheduler"]["params"]["cos_min_ratio"] == 0.0
    assert copy.deepcopy(cos["scheduler"]["params"])["cos_min_ratio"] == cfg.min_lr_ratio


def test_missing_package_is_refused_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from lrscale_megatron.compare.config import CompareConfigError
    from lrscale_megatron.compare.optimizers import require

    monkeypatch.setitem(__import__("sys").modules, "prodigyopt", None)  # import now raises ImportError
    require(["schedulefree"])  # installed: fine
    with pytest.raises(CompareConfigError, match="demo extra") as e:
        require(["schedulefree", "prodigy"])
    assert e.value.field_name == "arms" and e.value.value == "prodigy"
