"""Validation of the LRScale scheduler params: each error names the field, the value and the fix."""

from __future__ import annotations

import pytest
import torch

from lrscale_megatron.scheduler import LRScaleConfig, LRScaleConfigError

GOOD = {"peak_lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10, "total_steps": 100, "decay_style": "cosine"}
LAW = {"law": "steplaw-dense", "model": {"params": 1e8, "tokens": 2e9, "batch_tokens": 5e5}}


def _without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


BAD = [
    # (params, field named in the message, value shown in the message)
    ({**GOOD, "peak_lrr": 1e-3}, "scheduler.params.peak_lrr", "0.001"),  # unknown key
    ({**GOOD, "peak_lr": -1e-3}, "scheduler.params.peak_lr", "-0.001"),  # negative LR
    ({**GOOD, "peak_lr": 0.0}, "scheduler.params.peak_lr", "0.0"),
    ({**GOOD, "peak_lr": float("nan")}, "scheduler.params.peak_lr", "nan"),
    ({**GOOD, "min_lr": -1.0}, "scheduler.params.min_lr", "-1.0"),
    ({**GOOD, "min_lr": 1e-2}, "scheduler.params.min_lr", "0.01"),  # min_lr > peak
    ({**GOOD, "init_lr": 1.0}, "scheduler.params.init_lr", "1.0"),
    ({**GOOD, "warmup_steps": 200}, "scheduler.params.warmup_steps", "200"),  # warmup > total
    ({**GOOD, "warmup_steps": 100}, "scheduler.params.warmup_steps", "100"),  # warmup == total
    ({**GOOD, "warmup_steps": -1}, "scheduler.params.warmup_steps", "-1"),
    ({**GOOD, "total_steps": 0, "warmup_steps": 0}, "scheduler.params.total_steps", "0"),
    (_without(GOOD, "total_steps"), "scheduler.params.total_steps", "None"),
    ({**GOOD, "decay_style": "cosin"}, "scheduler.params.decay_style", "'cosin'"),  # unknown style
    (
        {**GOOD, "decay_style": "wsd", "wsd_decay_shape": "square"},
        "scheduler.params.wsd_decay_shape",
        "'square'",
    ),
    ({**GOOD, "decay_style": "wsd", "wsd_decay_fraction": 1.5}, "scheduler.params.wsd_decay_fraction", "1.5"),
    (
        {**GOOD, "decay_style": "wsd", "wsd_decay_fraction": 0.001},
        "scheduler.params.wsd_decay_fraction",
        "0.001",
    ),
    (_without(GOOD, "peak_lr"), "scheduler.params.peak_lr", "None"),  # missing law
    ({**GOOD, **LAW}, "scheduler.params.law", "'steplaw-dense'"),  # both peak and law
    ({**_without(GOOD, "peak_lr"), "law": "steplaw-dense"}, "scheduler.params.model", "None"),
    (
        {**_without(GOOD, "peak_lr"), **LAW, "model": {"params": 1e8, "tokens": -2.0, "batch_tokens": 5e5}},
        "scheduler.params.model.tokens",
        "-2.0",
    ),
    (
        {
            **_without(GOOD, "peak_lr"),
            **LAW,
            "model": {"params": 1e8, "tokens": 2e9, "batch_tokens": 5e5, "layers": 2},
        },
        "scheduler.params.model.layers",
        "2",
    ),
    (
        {**_without(GOOD, "peak_lr"), **LAW, "model": {"params": 1e8}},
        "scheduler.params.model.tokens",  # names the first missing key (was: the whole model block)
        "None",
    ),
    ({**GOOD, "peak_lr": "3e-4"}, "scheduler.params.peak_lr", "'3e-4'"),  # wrong types
    ({**GOOD, "warmup_steps": 10.5}, "scheduler.params.warmup_steps", "10.5"),
    ({**GOOD, "warmup_steps": 1e1}, "scheduler.params.warmup_steps", "10.0"),
    ({**GOOD, "total_steps": True}, "scheduler.params.total_steps", "True"),
    ({**GOOD, "decay_style": 3}, "scheduler.params.decay_style", "3"),
    ({**GOOD, "online": True}, "scheduler.params.online", "True"),
    ({**GOOD, "online": {"enabled": "yes"}}, "scheduler.params.online.enabled", "'yes'"),
    ({**GOOD, "online": {"adapt_every": 0}}, "scheduler.params.online.adapt_every", "0"),
    ({**GOOD, "online": {"combine": "mean"}}, "scheduler.params.online.combine", "'mean'"),
    ({**GOOD, "online": {"rule": "cohen"}}, "scheduler.params.online.rule", "'cohen'"),
    ({**GOOD, "online": {"band": [2.0, 10.0]}}, "scheduler.params.online.band", "(2.0, 10.0)"),
    ({**GOOD, "online": {"band": [0.5]}}, "scheduler.params.online.band", "[0.5]"),
    ({**GOOD, "online": {"max_change": 1.0}}, "scheduler.params.online.max_change", "1.0"),
    ({**GOOD, "online": {"ema": 1.0}}, "scheduler.params.online.ema", "1.0"),
    ({**GOOD, "online": {"beta1": 1.0}}, "scheduler.params.online.beta1", "1.0"),
    ({**GOOD, "online": {"safety": 0.0}}, "scheduler.params.online.safety", "0.0"),
    ({**GOOD, "online": {"hvp": "jvp2"}}, "scheduler.params.online.hvp", "'jvp2'"),
    ({**GOOD, "online": {"tol": -1e-3}}, "scheduler.params.online.tol", "-0.001"),
    ({**GOOD, "online": {"adapt_evry": 10}}, "scheduler.params.online.adapt_evry", "10"),
    ({**GOOD, "online": {"cut_above": 1.0}}, "scheduler.params.online.cut_above", "1.0"),
    ({**GOOD, "online": {"raise_below": 0.6}}, "scheduler.params.online.raise_below", "0.6"),
    ({**GOOD, "online": {"warmup_checks": -1}}, "scheduler.params.online.warmup_checks", "-1"),
    ({**GOOD, "online": {"kappa": -1.0}}, "scheduler.params.online.kappa", "-1.0"),
    ({**GOOD, "online": {"curvature_peak": "min"}}, "scheduler.params.online.curvature_peak", "'min'"),
    ({**GOOD, "online": {"max_cut": float("inf")}}, "scheduler.params.online.max_cut", "inf"),
]


@pytest.mark.parametrize(
    ("params", "field", "value"), BAD, ids=[f"{i}-{b[1].split('.')[-1]}" for i, b in enumerate(BAD)]
)
def test_bad_config_names_field_value_and_fix(params, field, value):
    with pytest.raises(LRScaleConfigError) as info:
        LRScaleConfig.from_dict(params)
    msg = str(info.value)
    assert msg.startswith(f"{field}={value}"), msg
    assert "Fix: " in msg and len(msg.split("Fix: ")[1]) > 5, msg


def test_bad_configs_are_distinct():
    assert len({repr(p) for p, _, _ in BAD}) == len(BAD) >= 15


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(LRScaleConfigError, match="did you mean 'warmup_steps'"):
        LRScaleConfig.from_dict({**GOOD, "warmup_step": 5})


def test_params_not_a_mapping():
    with pytest.raises(LRScaleConfigError, match=r"scheduler.params=\[1, 2\]: must be a mapping"):
        LRScaleConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_good_config_round_trips():
    cfg = LRScaleConfig.from_dict(
        {
            **GOOD,
            "decay_style": "wsd",
            "wsd_decay_fraction": 0.25,
            "online": {"enabled": True, "band": [0.5, 2], "combine": "geomean"},
        }
    )
    assert cfg.online.band == (0.5, 2.0) and cfg.wsd_decay_steps == 25
    assert LRScaleConfig.from_dict(cfg.to_dict()) == cfg


def test_direct_construction_raises_our_error_and_schema_exists():
    from lrscale_megatron.configs.base import ConfigError
    from lrscale_megatron.scheduler import OnlineConfig

    with pytest.raises(LRScaleConfigError, match=r"^online.safety=2.0: must be in \(0, 1\]"):
        LRScaleConfig(total_steps=10, peak_lr=1.0, online=dict(safety=2.0))
    with pytest.raises(LRScaleConfigError, match=r"^safety=0.0"):
        OnlineConfig(safety=0.0)
    assert issubclass(LRScaleConfigError, ConfigError)
    schema = LRScaleConfig.json_schema()
    assert "total_steps" in schema["required"] and "online" in schema["properties"]


def test_deepspeed_factory_validates_like_the_config():
    lrs_ds = pytest.importorskip("lrscale_megatron.integrations.deepspeed")
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    with pytest.raises(LRScaleConfigError, match=r"^scheduler.params.decay_style='cosin'"):
        lrs_ds.LRScale(opt, **{**GOOD, "decay_style": "cosin"})
    sched = lrs_ds.LRScale(opt, **GOOD)
    assert opt.param_groups[0]["lr"] == 0.0 and sched.config.peak_lr == 1e-3
