"""Top Hessian eigenvalue of a sweep's proxy models at initialisation, for ``eta* ~ kappa / lambda_max``.

Edge-of-stability reasoning (Cohen et al. 2021, 2022): full-batch GD is stable only while
``lambda_max < 2 / eta``, so a model's usable LR scales like ``1 / lambda_max``. The predictor measured
here is ``lambda_max`` of the loss Hessian at the initial weights, on the first training global batch
of the run's batch size, by Lanczos (Paige 1976) over exact Hessian-vector products (Pearlmutter 1994):
one measurement per (width, depth, batch_tokens, seq_len) group, since init weights and the first batch
do not depend on the LR or the token budget. Values go to the ``init_lambda_max`` table of the store.

With ``precondition=True`` the measured operator is Adam's preconditioned Hessian
``P^-1/2 H P^-1/2``, ``P = diag(sqrt(v) + eps)`` (Cohen et al. 2022: Adam is stable while its top
eigenvalue stays below ``(2 + 2 beta1) / ((1 - beta1) lr)``), with ``v`` Adam's bias-corrected
second moment after ``moment_batches`` steps at ``lr=0`` on the first training global batches (an
EMA of squared gradients at the initial weights, accumulated by ``torch.optim.Adam`` itself with the
config's ``betas``): the measurement stays LR-free. Those values go to ``init_lambda_max_adam``.

    from lrscale_megatron.sweep.curvature import measure_store
    measure_store("data/sweeps/cpu-sweep.sqlite", settings)      # settings: GPTSweepSettings
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lrscale_megatron.sweep.megatron import GPTSweepSettings, train_config_dict

logger = logging.getLogger(__name__)

TABLES = {False: "init_lambda_max", True: "init_lambda_max_adam"}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {table} (width INTEGER, depth INTEGER, batch_tokens INTEGER, "
    "seq_len INTEGER, lambda_max REAL NOT NULL, converged INTEGER, n_matvec INTEGER, seconds REAL, "
    "PRIMARY KEY (width, depth, batch_tokens, seq_len))"
)

GroupShape = tuple[int, int, int, int]
"""(width, depth, batch_tokens, seq_len)."""


@dataclass(frozen=True)
class LambdaMeasurement:
    """lambda_max at init of one group (Lanczos ``k=1``)."""

    shape: GroupShape
    lambda_max: float
    converged: bool
    n_matvec: int
    seconds: float


def measure_point(
    point: dict[str, Any],
    settings: GPTSweepSettings,
    max_iter: int = 30,
    tol: float = 1e-3,
    precondition: bool = False,
    moment_batches: int = 4,
    eps: float = 1e-8,
) -> LambdaMeasurement:
    """lambda_max of the point's model at init on its first training global batch (this process);
    Adam-preconditioned when ``precondition`` (see the module docstring)."""
    if moment_batches < 1:
        raise ValueError(f"moment_batches={moment_batches}; fix: use >= 1 global batches for Adam's v")
    import time

    import torch

    from lrscale_megatron.curvature import HessianOperator, PreconditionedOperator, lanczos
    from lrscale_megatron.data import get_batch
    from lrscale_megatron.models.gpt import gpt_loss_fn
    from lrscale_megatron.sweep.megatron import _start_process
    from lrscale_megatron.train import config_from_dict
    from lrscale_megatron.train.loop import _cpu_mode, _seed_all, init_parallel
    from lrscale_megatron.train.setup import build_data, build_model, micro_batches

    _start_process()
    raw, base_dir = train_config_dict(point, settings)
    cfg = config_from_dict(raw, base_dir=base_dir, source="sweep-curvature")
    ctx = init_parallel(cfg)
    _seed_all(cfg.training.seed)
    model = build_model(cfg, ctx)
    data = build_data(cfg, ctx)
    t = cfg.training
    micro = micro_batches(get_batch(data.train, 0, t.global_batch_size), t.micro_batch_size)
    t0 = time.perf_counter()
    with _cpu_mode():
        op = HessianOperator(model, gpt_loss_fn, micro, mode="exact", parallel=ctx)
        target: Any = op
        if precondition:
            # Adam's state after `moment_batches` steps at lr=0 (weights unchanged): exactly the
            # bias-corrected EMA of squared gradients that from_optimizer reads.
            adam = torch.optim.Adam(op.params, lr=0.0, betas=_adam_betas(raw), eps=eps)
            for i in range(moment_batches):
                mb = micro_batches(get_batch(data.train, i, t.global_batch_size), t.micro_batch_size)
                g = HessianOperator(model, gpt_loss_fn, mb, mode="exact", parallel=ctx).loss_and_grad()[1]
                for p, gi in zip(op.params, g, strict=True):
                    p.grad = gi.to(p.dtype)
                adam.step()
            target = PreconditionedOperator.from_optimizer(op, adam)
            for p in op.params:
                p.grad = None
        res = lanczos(target, k=1, max_iter=max_iter, tol=tol, seed=0)
    shape = (int(point["width"]), int(point["depth"]), int(point["batch_tokens"]), int(point["seq_len"]))
    return LambdaMeasurement(
        shape, float(res.eigenvalues[0]), bool(res.converged), int(res.n_matvec), time.perf_counter() - t0
    )


def _adam_betas(raw: dict[str, Any]) -> tuple[float, float]:
    """Adam betas of a pretraining config's DeepSpeed optimizer (default (0.9, 0.95))."""
    ds = raw.get("deepspeed")
    betas = ds.get("optimizer", {}).get("params", {}).get("betas") if isinstance(ds, dict) else None
    return (float(betas[0]), float(betas[1])) if betas else (0.9, 0.95)


def measure_store(
    db_path: str | Path,
    settings: GPTSweepSettings,
    configs: list[dict[str, Any]] | None = None,
    precondition: bool = False,
) -> dict[GroupShape, float]:
    """Measure every (width, depth, batch_tokens, seq_len) group of ``configs`` (default: the store's
    runs) not yet in ``init_lambda_max`` (``init_lambda_max_adam`` when ``precondition``); returns all
    measured groups."""
    table = TABLES[precondition]
    from lrscale_megatron.sweep.store import SweepStore

    if configs is None:
        store = SweepStore(db_path)
        try:
            configs = [r.config for r in store.runs()]
        finally:
            store.close()
    have = load_lambdas(db_path, precondition)
    todo: dict[GroupShape, dict[str, Any]] = {}
    for c in configs:
        shape = (int(c["width"]), int(c["depth"]), int(c["batch_tokens"]), int(c["seq_len"]))
        if shape not in have and shape not in todo:
            todo[shape] = c
    for shape, c in sorted(todo.items()):
        m = measure_point(c, settings, precondition=precondition)
        logger.info(
            "%slambda_max at init %s = %.4g (%s, %d matvecs, %.1f s)",
            "Adam-preconditioned " if precondition else "",
            shape,
            m.lambda_max,
            "converged" if m.converged else "NOT converged",
            m.n_matvec,
            m.seconds,
        )
        db = sqlite3.connect(str(db_path), timeout=60.0, isolation_level=None)
        try:
            db.execute(_SCHEMA.format(table=table))
            db.execute(
                f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*shape, m.lambda_max, int(m.converged), m.n_matvec, m.seconds),
            )
        finally:
            db.close()
        have[shape] = m.lambda_max
    return have


def load_lambdas(db_path: str | Path, precondition: bool = False) -> dict[GroupShape, float]:
    """``(width, depth, batch_tokens, seq_len) -> lambda_max`` from the store (empty when none);
    the Adam-preconditioned values when ``precondition``."""
    table = TABLES[precondition]
    db = sqlite3.connect(str(db_path), timeout=60.0)
    try:
        db.execute(_SCHEMA.format(table=table))
        rows = db.execute(f"SELECT width, depth, batch_tokens, seq_len, lambda_max FROM {table}")
        return {(int(r[0]), int(r[1]), int(r[2]), int(r[3])): float(r[4]) for r in rows}
    finally:
        db.close()
