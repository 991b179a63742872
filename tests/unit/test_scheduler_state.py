"""Checkpoint state (bit-identical continuation, config mismatch) and the offline peak from a law."""

from __future__ import annotations

import copy
import io
import sys
import types

import pytest
import torch

from lrscale_megatron.adapter import OnlineConfig
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler, resolve_offline_peak


def _cfg(**kw) -> LRScaleConfig:
    base = dict(
        peak_lr=1e-2,
        min_lr=1e-4,
        warmup_steps=10,
        total_steps=150,
        decay_style="wsd",
        wsd_decay_fraction=0.3,
        online=OnlineConfig(enabled=True, adapt_every=7, combine="online", band=(0.1, 10.0), max_change=1.5),
    )
    base.update(kw)
    return LRScaleConfig(**base)


def _make(cfg: LRScaleConfig, model_state=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    if model_state is not None:
        model.load_state_dict(model_state)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    sched = LRScaleScheduler(opt, cfg)
    # A deterministic estimator that depends on the trajectory (the weights).
    sched.attach_estimator(lambda params: 1.0 + float(sum(p.abs().sum() for p in model.parameters())))
    return model, opt, sched


def _run(model, opt, sched, start: int, stop: int) -> list[float]:
    lrs = []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, 3, generator=g)
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    return lrs


def test_bitwise_continuation_online():
    cfg = _cfg()
    model, opt, sched = _make(cfg)
    _run(model, opt, sched, 0, 100)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    reference = _run(model, opt, sched, 100, 200)
    assert len({h["peak_after"] for h in sched.history}) > 3  # the peak really moved

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2, opt2, sched2 = _make(cfg, ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert sched2.num_steps == 100
    assert _run(model2, opt2, sched2, 100, 200) == reference  # bitwise
    assert sched2.history == sched.history


@pytest.mark.parametrize(
    ("change", "field", "old", "new"),
    [
        (dict(warmup_steps=20), "warmup_steps", "10", "20"),
        (dict(decay_style="cosine"), "decay_style", "'wsd'", "'cosine'"),
        (dict(online=OnlineConfig(enabled=True, adapt_every=8)), "online.adapt_every", "7", "8"),
        (dict(peak_lr=2e-2), "peak_lr", "0.01", "0.02"),
    ],
)
def test_config_mismatch_names_both_values(change, field, old, new):
    _, _, sched = _make(_cfg())
    sd = sched.state_dict()
    _, _, other = _make(_cfg(**change))
    with pytest.raises(ValueError) as info:
        other.load_state_dict(sd)
    msg = str(info.value)
    assert f"checkpoint has {field}={old}" in msg and f"this run has {field}={new}" in msg, msg


def test_state_dict_is_plain_data_and_not_aliased():
    _, _, sched = _make(_cfg())
    sd = sched.state_dict()
    snapshot = copy.deepcopy(sd)
    for _ in range(30):
        sched.step()
    assert sd == snapshot
    assert set(sd) >= {"num_steps", "config", "states", "history", "offline_peak", "group_ratios"}


def test_law_is_resolved_lazily_through_law_predict(monkeypatch):
    calls = {}

    def load_law(name):
        calls["law"] = name
        return "LAW"

    def predict(law, params, tokens, batch_tokens, width=None, depth=None):
        calls["args"] = (law, params, tokens, batch_tokens, width, depth)
        return types.SimpleNamespace(peak_lr=2.5e-3)

    fake = types.ModuleType("lrscale_megatron.law.predict")
    fake.load_law, fake.predict = load_law, predict
    monkeypatch.setitem(sys.modules, "lrscale_megatron.law.predict", fake)
    cfg = LRScaleConfig.from_dict(
        {
            "law": "my-preset",
            "total_steps": 100,
            "warmup_steps": 10,
            "model": {"params": 1e8, "tokens": 2e9, "batch_tokens": 5e5, "width": 768},
        }
    )
    assert resolve_offline_peak(cfg) == 2.5e-3
    assert calls == {"law": "my-preset", "args": ("LAW", 1e8, 2e9, 5e5, 768, None)}
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    sched = LRScaleScheduler(opt, cfg)
    for _ in range(10):
        sched.step()
    assert opt.param_groups[0]["lr"] == 2.5e-3


def test_law_preset_with_the_real_law_module():
    from lrscale_megatron.scheduler import _law_api

    load_law, predict = _law_api()  # the package's own law module: a failure here is a regression
    law = load_law("steplaw-dense")
    want = predict(law, params=1e8, tokens=2e9, batch_tokens=5e5).peak_lr
    cfg = LRScaleConfig.from_dict(
        {
            "law": "steplaw-dense",
            "total_steps": 100,
            "model": {"params": 1e8, "tokens": 2e9, "batch_tokens": 5e5},
        }
    )
    assert resolve_offline_peak(cfg) == want > 0
