"""A synthetic ``train_fn`` for tests and demos: no model, a loss curve with a known optimum.

The final loss is ``L(lr) = 2 + 0.05 * log(lr / eta*)^2 + noise`` with
``eta* = c * params^a * tokens^b * batch_tokens^d`` (defaults below), so a sweep run with it can be
fitted and must give back ``a, b, d``.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.runner import Report, RunResult

TRUE_LAW = {"c": 2.0, "params": -0.7, "tokens": 0.1, "batch": 0.3}


def synthetic_optimum(config: dict[str, Any]) -> float:
    return TRUE_LAW["c"] * (
        config["params"] ** TRUE_LAW["params"]
        * config["tokens"] ** TRUE_LAW["tokens"]
        * config["batch_tokens"] ** TRUE_LAW["batch"]
    )


def synthetic_train_fn(
    config: dict[str, Any],
    report: Report,
    n_steps: int = 5,
    step_seconds: float = 0.0,
    noise: float = 1e-3,
    start_log: str | None = None,
) -> RunResult:
    """Report ``n_steps`` decreasing train losses (sleeping ``step_seconds`` each) and a final result."""
    if start_log is not None:
        with Path(start_log).open("a") as fh:
            fh.write(f"{config['lr']}\n")
    seed = int(hashlib.sha256(repr(sorted(config.items())).encode()).hexdigest()[:8], 16)
    eps = noise * ((seed % 2001) / 1000.0 - 1.0)
    final = 2.0 + 0.05 * math.log(config["lr"] / synthetic_optimum(config)) ** 2 + eps
    for step in range(n_steps):
        time.sleep(step_seconds)
        report(
            step=step,
            train_loss=final + 1.0 / (step + 1),
            tokens=(step + 1) * int(config.get("batch_tokens", 1)),
        )
    return RunResult(
        final_train_loss=final,
        final_val_loss=final + 0.01,
        tokens=int(config.get("tokens", 0)),
        energy_j=None,
    )
