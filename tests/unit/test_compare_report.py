"""Report arithmetic without training: done-when checks, compute to a tuned LR, the proxy-cost reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrscale_megatron.compare.cost import compute_to_tuned_lr, proxy_cost
from lrscale_megatron.compare.report import ratios_and_checks


def _entry(steps: float | None, loss: float) -> dict:
    return {"steps_to_target": steps, "final_val_loss": loss}


def test_checks_met_missed_and_unknown() -> None:
    by = {
        "cosine": _entry(200.0, 2.60),
        "lrscale_offline": _entry(140.0, 2.50),
        "steplaw_formula": _entry(None, 2.70),
        "schedulefree": _entry(150.0, 2.40),
        "cosine_grid_best": _entry(150.0, 2.48),
    }
    r, checks = ratios_and_checks(by, steps_budget=300)
    c = {x["check"]: x for x in checks}
    assert r["lrscale_offline_over_cosine_steps_to_target"] == pytest.approx(0.7)
    assert c["steps-to-target lrscale_offline / cosine"]["met"] is True
    assert c["final val loss lrscale_offline / grid best"]["value"] == pytest.approx(2.50 / 2.48)
    assert c["final val loss lrscale_offline / grid best"]["met"] is True
    assert c["final val loss lrscale_offline / steplaw_formula < 1"]["met"] is True
    assert c["final val loss lrscale_offline / schedulefree < 1"]["met"] is False
    assert "final val loss lrscale_offline / prodigy < 1" not in c  # arm not run: no check, no claim


def test_not_reached_is_a_miss_through_its_lower_bound() -> None:
    by = {"cosine": _entry(100.0, 2.6), "lrscale_offline": _entry(None, 2.7)}
    r, checks = ratios_and_checks(by, steps_budget=300)
    assert r["lrscale_offline_over_cosine_steps_to_target_lower_bound"] == pytest.approx(3.0)
    assert checks[0]["value"] is None and checks[0]["met"] is False
    by = {"cosine": _entry(None, 2.6), "lrscale_offline": _entry(None, 2.7)}
    _, checks = ratios_and_checks(by, steps_budget=300)
    assert checks[0]["met"] is None  # nothing to compare: unknown, never met


def _run(wall: float, tokens: int = 5000) -> dict:
    return {"num_params": 1200, "tokens": tokens, "wall_s": wall / 2, "elapsed_s": wall}


def test_compute_to_tuned_lr(tmp_path: Path) -> None:
    (tmp_path / "prediction.json").write_text(
        json.dumps({"peak_lr": 1e-3, "cost": {"proxies": {"flops": 6e7, "wall_s": 50.0, "runs": 20}}})
    )
    grid = {lr: [_run(10.0), _run(12.0)] for lr in (1e-3, 3e-3, 1e-2)}
    c = compute_to_tuned_lr([_run(8.0), _run(10.0)], grid, str(tmp_path), n_params=1000)
    one = 6.0 * 1000 * 5000  # N = the non-embedding parameters given, not num_params
    assert c["lrscale"]["target_run_flops"] == one and c["grid"]["total_flops"] == 3 * one
    assert c["lrscale"]["total_flops"] == 6e7 + one
    assert c["lrscale_over_grid_flops"] == pytest.approx((6e7 + one) / (3 * one))
    assert c["lrscale"]["total_wall_s"] == pytest.approx(50.0 + 9.0)
    assert c["grid"]["total_wall_s"] == pytest.approx(33.0)
    assert c["proxies"]["runs"] == 20 and c["proxies"]["keys"]["flops"] == "cost.proxies.flops"


def test_proxy_cost_reads_lrscale_tune_costs(tmp_path: Path) -> None:
    (tmp_path / "prediction.json").write_text(
        json.dumps(
            {
                "costs": {
                    "proxy_over_target_flops": 3.0,
                    "proxy_runs": 28,
                    "proxy_flops": 9e10,
                    "proxy_wall_s": 120.0,
                    "target_run_flops": 3e10,
                }
            }
        )
    )
    p = proxy_cost(str(tmp_path / "prediction.json"))
    assert (p["flops"], p["wall_s"], p["runs"]) == (9e10, 120.0, 28) and not p["missing"]


def test_proxy_cost_says_what_is_missing(tmp_path: Path) -> None:
    assert proxy_cost(None)["missing"] and proxy_cost(None)["flops"] is None
    assert "not found" in proxy_cost(str(tmp_path / "nope"))["missing"][0]
    (tmp_path / "prediction.json").write_text(json.dumps({"peak_lr": 1e-3, "target": {"flops": 5.0}}))
    p = proxy_cost(str(tmp_path))
    assert p["flops"] is None and p["wall_s"] is None  # the target's FLOPs are not the proxies'
    assert any("flops" in m for m in p["missing"])
    c = compute_to_tuned_lr([_run(8.0)], {1e-3: [_run(9.0)], 2e-3: [_run(9.0)]}, str(tmp_path), 1000)
    assert c["lrscale"]["total_flops"] is None and c["lrscale_over_grid_flops"] is None
