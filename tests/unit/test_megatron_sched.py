"""Megatron compatibility: the OptimizerParamScheduler subclass, argparse options, the runtime patch."""

from __future__ import annotations

import argparse
import sys
import types

import pytest
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

import lrscale_megatron.integrations.megatron as lrs_mg
import lrscale_megatron.integrations.megatron_patch as lrs_patch
from lrscale_megatron.adapter import OnlineConfig
from lrscale_megatron.schedule import MEGATRON_DECAY_STYLE
from lrscale_megatron.scheduler import LRScaleConfig


def _opt(n: int = 2):
    return types.SimpleNamespace(param_groups=[{"wd_mult": 1.0} for _ in range(n)])


@pytest.mark.parametrize("style", ["cosine", "inverse_sqrt", "wsd", "linear", "constant"])
def test_matches_megatron_in_samples(style):
    gbs, warm, total = 16, 10 * 16, 120 * 16  # Megatron-LM: lengths and increments are samples
    cfg = LRScaleConfig(
        peak_lr=6e-4,
        min_lr=6e-5,
        init_lr=1e-6,
        warmup_steps=warm,
        total_steps=total,
        decay_style=style,
        wsd_decay_fraction=0.25,
        wsd_decay_shape="cosine",
    )
    ours = lrs_mg.LRScaleParamScheduler(_opt(), cfg, start_wd=0.01, end_wd=0.1, wd_incr_style="linear")
    ref = OptimizerParamScheduler(
        _opt(),
        init_lr=1e-6,
        max_lr=6e-4,
        min_lr=6e-5,
        lr_warmup_steps=warm,
        lr_decay_steps=total,
        lr_decay_style=MEGATRON_DECAY_STYLE[style],
        start_wd=0.01,
        end_wd=0.1,
        wd_incr_steps=total,
        wd_incr_style="linear",
        wsd_decay_steps=cfg.wsd_decay_steps,
        lr_wsd_decay_style="cosine",
    )
    for _ in range(140):
        assert [g["lr"] for g in ours.optimizer.param_groups] == [g["lr"] for g in ref.optimizer.param_groups]
        assert [g["weight_decay"] for g in ours.optimizer.param_groups] == [
            g["weight_decay"] for g in ref.optimizer.param_groups
        ]
        ours.step(increment=gbs)
        ref.step(increment=gbs)


def test_megatron_state_dict_round_trip_with_online():
    cfg = LRScaleConfig(
        peak_lr=1e-3,
        warmup_steps=64,
        total_steps=6400,
        decay_style="cosine",
        online=OnlineConfig(enabled=True, adapt_every=320, combine="online", ema=0.3),
    )
    lam = iter(range(1, 1000))
    a = lrs_mg.LRScaleParamScheduler(_opt(), cfg)
    a.attach_estimator(lambda params: 1000.0 * next(lam))
    for _ in range(50):
        a.step(increment=32)
    sd = a.state_dict()
    assert (
        sd["num_steps"] == 1600 and len(sd["lrscale"]["history"]) == 7
    )  # 32 (warmup check), 64, 320, ..., 1600
    b = lrs_mg.LRScaleParamScheduler(_opt(), cfg)
    b.attach_estimator(lambda params: 1000.0 * next(lam))
    b.load_state_dict(sd)
    assert b.num_steps == 1600 and b.lrscale.history == a.lrscale.history  # no re-measurement on load
    assert [g["lr"] for g in b.optimizer.param_groups] == [g["lr"] for g in a.optimizer.param_groups]


def test_add_lrscale_args_extends_megatron_parser():
    p = argparse.ArgumentParser()
    p.add_argument(
        "--lr-decay-style",
        default="linear",
        choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
    )
    p = lrs_mg.add_lrscale_args(p)
    args = p.parse_args(
        [
            "--lr-decay-style",
            "lrscale",
            "--lrscale-online",
            "--lrscale-adapt-every-iters",
            "5",
            "--lrscale-band",
            "0.5",
            "2",
        ]
    )
    assert args.lr_decay_style == "lrscale" and args.lrscale_online and args.lrscale_band == [0.5, 2.0]
    args.global_batch_size = 8
    cfg = lrs_mg.config_from_megatron_args(
        args, max_lr=1e-3, min_lr=1e-5, init_lr=0.0, lr_warmup_steps=80, lr_decay_steps=800
    )
    assert cfg.online.adapt_every == 40 and cfg.online.band == (0.5, 2.0) and cfg.peak_lr == 1e-3
    assert cfg.online.confirm_cuts and cfg.online.kappa is None  # the gauge policy's defaults


def test_gauge_policy_flags_reach_the_online_config():
    p = lrs_mg.add_lrscale_args(argparse.ArgumentParser())
    args = p.parse_args(
        [
            "--lrscale-online",
            "--lrscale-cut-above",
            "3",
            "--lrscale-raise-below",
            "0.2",
            "--lrscale-no-confirm-cuts",
            "--lrscale-max-cut",
            "4",
            "--lrscale-warmup-checks",
            "3",
            "--lrscale-warmup-tol",
            "0.05",
            "--lrscale-kappa",
            "5.1",
            "--lrscale-curvature-peak",
            "curv",
        ]
    )
    args.global_batch_size = 4
    o = lrs_mg.config_from_megatron_args(
        args, max_lr=1e-3, min_lr=0.0, init_lr=0.0, lr_warmup_steps=40, lr_decay_steps=400
    ).online
    assert (o.cut_above, o.raise_below, o.confirm_cuts, o.max_cut) == (3.0, 0.2, False, 4.0)
    assert (o.warmup_checks, o.warmup_tol, o.kappa, o.curvature_peak) == (3, 0.05, 5.1, "curv")


def test_patch_needs_megatron_training(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.training", None)  # make it unimportable
    monkeypatch.setitem(sys.modules, "megatron.training.training", None)
    with pytest.raises(ImportError, match=r"megatron\.training\.training.*Megatron-LM"):
        lrs_mg.patch_megatron_training()
    assert not lrs_mg.is_patched()


@pytest.fixture
def fake_megatron_training(monkeypatch):
    """A stand-in for Megatron-LM's megatron.training.training: the real constructor and get_args."""
    args = argparse.Namespace(global_batch_size=4, seq_length=16)
    parser = lrs_mg.add_lrscale_args(argparse.ArgumentParser())
    for k, v in vars(parser.parse_args([])).items():
        setattr(args, k, v)
    pkg = types.ModuleType("megatron.training")
    mod = types.ModuleType("megatron.training.training")
    mod.OptimizerParamScheduler = OptimizerParamScheduler
    mod.get_args = lambda: args
    pkg.training = mod
    monkeypatch.setitem(sys.modules, "megatron.training", pkg)
    monkeypatch.setitem(sys.modules, "megatron.training.training", mod)
    yield mod
    lrs_mg.unpatch_megatron_training()


def _build(mod, style):
    return mod.OptimizerParamScheduler(
        _opt(),
        init_lr=0.0,
        max_lr=1e-3,
        min_lr=1e-5,
        lr_warmup_steps=40,
        lr_decay_steps=400,
        lr_decay_style=style,
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=400,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def test_patch_and_unpatch_fake_megatron_training(fake_megatron_training):
    mod = fake_megatron_training
    lrs_mg.patch_megatron_training()
    lrs_mg.patch_megatron_training()  # idempotent
    assert lrs_mg.is_patched() and mod.OptimizerParamScheduler is not OptimizerParamScheduler
    s = _build(mod, "lrscale")
    assert isinstance(s, lrs_mg.LRScaleParamScheduler)
    assert s.lrscale_config.total_steps == 400 and s.lrscale_config.peak_lr == 1e-3
    plain = _build(mod, "cosine")
    assert type(plain) is OptimizerParamScheduler
    for _ in range(100):
        s.step(4)
        plain.step(4)
        assert s.optimizer.param_groups[0]["lr"] == plain.optimizer.param_groups[0]["lr"]
    lrs_mg.unpatch_megatron_training()
    assert mod.OptimizerParamScheduler is OptimizerParamScheduler and not lrs_mg.is_patched()


def test_patch_refuses_untested_megatron_core(fake_megatron_training, monkeypatch):
    monkeypatch.setattr(lrs_patch, "_mcore_version", lambda: (0, 99))
    with pytest.raises(RuntimeError, match=r"megatron-core 0.99 is outside the tested range"):
        lrs_mg.patch_megatron_training()
    lrs_mg.patch_megatron_training(check_version=False)
    assert lrs_mg.is_patched()
