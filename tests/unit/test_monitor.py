"""LRScaleMonitor: CSV columns and values on a tiny run, TensorBoard/DeepSpeed sinks, and `lrscale plot`."""

from __future__ import annotations

import argparse
import csv
import logging
import math
from dataclasses import dataclass

import pytest
import torch

from lrscale_megatron import monitor as monitor_mod
from lrscale_megatron.adapter import Estimate, OnlineConfig
from lrscale_megatron.monitor import MEASURE_COLUMNS, MEASUREMENTS_FILE, STEPS_FILE, LRScaleMonitor
from lrscale_megatron.plot import FIGURES, add_subcommand, plot_logdir
from lrscale_megatron.scheduler import LRScaleConfig, LRScaleScheduler

CONFIG = {
    "total_steps": 20,
    "peak_lr": 0.1,
    "min_lr": 0.01,
    "warmup_steps": 4,
    "online": {
        "enabled": True,
        "adapt_every": 5,
        "warmup_checks": 1,
        "warmup_first": None,  # the measurement schedule below: end of warmup, then every 5
        "combine": "online",
        "ema": 0.0,
        "max_change": 10.0,
    },
}


@dataclass(frozen=True)
class TracedEstimate(Estimate):
    """An estimator's result that also carries the Lanczos residual and a Hutchinson trace."""

    residual: float = math.nan
    trace: float | None = None


class FakeDeepSpeedMonitor:
    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[str, float, int]] = []

    def write_events(self, events):
        self.events.extend(events)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _tiny_run(logdir, ds_monitor=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}], lr=0.1
    )  # group 1 runs at 0.5 x
    mon = LRScaleMonitor(logdir, deepspeed_monitor=ds_monitor)
    sched = LRScaleScheduler(opt, LRScaleConfig.from_dict(CONFIG), monitor=mon)
    estimates = iter(
        [
            TracedEstimate(40.0, n_matvec=7, residual=1e-4, trace=123.0),
            TracedEstimate(float("nan"), converged=False, reason="non-finite", n_matvec=3),
            TracedEstimate(20.0, n_matvec=9, residual=2e-4),
            TracedEstimate(10.0, n_matvec=5, residual=3e-4),
            TracedEstimate(10.0, n_matvec=5, residual=3e-4),
        ]
    )
    sched.attach_estimator(lambda params: next(estimates))
    used, losses = [], []
    for i in range(CONFIG["total_steps"]):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
        loss = model(x).pow(2).mean()
        loss.backward()
        used.append([g["lr"] for g in opt.param_groups])
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        mon.log_loss(loss)
        sched.step()
    mon.close()
    return sched, used, losses


def test_csv_columns_and_values(tmp_path):
    sched, used, losses = _tiny_run(tmp_path)
    steps = _read(tmp_path / STEPS_FILE)
    assert steps[0] == ["iteration", "loss", "lr_group0", "lr_group1"]
    assert len(steps) == 1 + CONFIG["total_steps"]
    for i, row in enumerate(steps[1:]):
        assert int(row[0]) == i
        assert float(row[1]) == losses[i]  # repr round-trips exactly
        assert [float(v) for v in row[2:]] == used[i]  # the LR each group used in iteration i

    meas = _read(tmp_path / MEASUREMENTS_FILE)
    assert tuple(meas[0]) == MEASURE_COLUMNS
    rows = [dict(zip(MEASURE_COLUMNS, r)) for r in meas[1:]]
    hist = sched.history
    assert len(rows) == len(hist) == 5  # end of warmup (4), then 5, 10, 15, 20
    assert [int(r["step"]) for r in rows] == [h["step"] for h in hist] == [4, 5, 10, 15, 20]
    for r, h in zip(rows, hist):
        assert r["group"] == "all"
        assert int(r["accepted"]) == h["accepted"]
        assert int(r["n_matvec"]) == h["n_matvec"]
        assert float(r["peak_after"]) == h["peak_after"] and float(r["peak_before"]) == h["peak_before"]
    first, skipped = rows[0], rows[1]
    assert float(first["lambda_max"]) == 40.0 and float(first["residual"]) == 1e-4
    assert float(first["trace"]) == 123.0 and first["converged"] == "1"
    # the gauge against the LR in force (0.1 at the end of warmup): 40 * 0.1 / 38 -> room -> raise
    assert float(first["lr"]) == 0.1 and float(first["gauge"]) == pytest.approx(40.0 * 0.1 / 38.0)
    assert first["action"] == "raise" and "raise_below" in first["reason"] and first["crossed_edge"] == "0"
    assert all(r["reason"] for r in rows)  # every decision says why
    assert skipped["lambda_max"] == "nan" and skipped["accepted"] == "0" and skipped["converged"] == "0"
    assert "non-finite" in skipped["reason"] and skipped["trace"] == ""
    assert float(rows[2]["residual"]) == 2e-4 and rows[2]["trace"] == ""


def test_deepspeed_sink_and_state_dict_unchanged(tmp_path):
    ds = FakeDeepSpeedMonitor()
    sched, used, losses = _tiny_run(tmp_path, ds_monitor=ds)
    by_tag: dict[str, list[tuple[float, int]]] = {}
    for tag, value, step in ds.events:
        by_tag.setdefault(tag, []).append((value, step))
    assert [v for v, _ in by_tag["lrscale/lr/group0"]] == [u[0] for u in used]
    assert [v for v, _ in by_tag["lrscale/loss"]] == losses
    assert [s for _, s in by_tag["lrscale/lambda_max"]] == [4, 10, 15, 20]  # the NaN is not an event
    assert [s for _, s in by_tag["lrscale/gauge"]] == [4, 10, 15, 20]
    assert [v for v, _ in by_tag["lrscale/gauge"]] == [h["gauge"] for h in sched.history if h["accepted"]]
    assert [v for v, _ in by_tag["lrscale/skipped"]] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert by_tag["lrscale/trace"] == [(123.0, 4)]
    assert all(math.isfinite(v) for _, v, _ in ds.events)
    # the monitor is not checkpoint state
    plain = LRScaleScheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), LRScaleConfig.from_dict(CONFIG)
    )
    assert set(sched.state_dict()) == set(plain.state_dict())
    assert (
        FakeDeepSpeedMonitor.enabled
        and LRScaleMonitor(tmp_path / "x", deepspeed_monitor=_Disabled()).deepspeed_monitor is None
    )


class _Disabled:
    enabled = False

    def write_events(self, events):  # pragma: no cover - must not be called
        raise AssertionError("a disabled DeepSpeed monitor received events")


def test_real_curvature_fills_n_matvec(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = LRScaleConfig(
        total_steps=6,
        peak_lr=1e-3,
        warmup_steps=2,
        online=OnlineConfig(enabled=True, max_iter=10, precondition=False, warmup_checks=2),
    )
    with LRScaleMonitor(tmp_path) as mon:
        sched = LRScaleScheduler(opt, cfg)
        sched.attach_monitor(mon)
        sched.attach_curvature(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), (x, y))
        for _ in range(6):
            sched.step()
    rows = _read(tmp_path / MEASUREMENTS_FILE)
    assert len(rows) == 3  # header + the two warmup checks (steps 1 and 2; adapt_every is 2000)
    for r in rows[1:]:
        assert (
            int(r[MEASURE_COLUMNS.index("n_matvec")]) > 0
            and float(r[MEASURE_COLUMNS.index("lambda_max")]) > 0
        )


def test_only_rank0_writes(tmp_path):
    mon = LRScaleMonitor(tmp_path / "r1", rank=1)
    mon.log_step(0, [0.1])
    mon.close()
    assert not (tmp_path / "r1").exists()


def test_tensorboard_unavailable_is_said_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(monitor_mod, "tensorboard_available", lambda: False)
    monkeypatch.setattr(monitor_mod, "_tensorboard_note_logged", False)
    with caplog.at_level(logging.INFO, logger="lrscale_megatron.monitor"):
        LRScaleMonitor(tmp_path / "a").close()
        LRScaleMonitor(tmp_path / "b").close()
    assert caplog.text.count("unavailable") == 1


def test_plot_writes_nonempty_pngs(tmp_path):
    _tiny_run(tmp_path)
    paths = plot_logdir(tmp_path, tmp_path / "fig")
    assert [p.name for p in paths] == list(FIGURES)
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, p
    # as the `lrscale plot LOGDIR` sub-command
    ap = argparse.ArgumentParser()
    add_subcommand(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["plot", str(tmp_path), "--out", str(tmp_path / "cli")])
    assert args.func(args) == 0
    assert all((tmp_path / "cli" / name).stat().st_size > 5000 for name in FIGURES)


def test_plot_names_the_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="LRScaleMonitor"):
        plot_logdir(tmp_path)
