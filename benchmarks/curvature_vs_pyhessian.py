"""Curvature core vs PyHessian: Hessian-vector products and wall time to a given eigenvalue accuracy.

One process, CPU (2 threads)::

    python benchmarks/curvature_vs_pyhessian.py            # full run, ~5-10 min on 2 cores
    python benchmarks/curvature_vs_pyhessian.py --quick    # smoke run, smaller problems, ~15 s
    python benchmarks/curvature_vs_pyhessian.py --threads 1  # torch.set_num_threads (default 2)
    python benchmarks/curvature_vs_pyhessian.py --problems neardegen   # one problem only
    python benchmarks/curvature_vs_pyhessian.py --gpt1m --threads 1   # (c) only: ~1M-param LM, 1 % accuracy

Needs ``pip install -c .venv/constraints.txt --no-deps pyhessian==0.1`` (GPL-3: a comparison peer, imported
here only, never by the package).

Problems (each in float64 and in float32, same weights, the float32 copy cast from the float64 one):

* ``gpt``: a plain-PyTorch GPT (``TorchGPT``, V=256, S=32, H=64, L=2; 118,528 parameters) after 60 AdamW
  steps on Shakespeare bytes, Hessian of the next-token loss on one fixed batch (B=4). Reference
  eigenvalues: float64 Lanczos, tol 1e-12, 300 iterations. (At initialisation this model's most negative
  eigenvalue is larger in magnitude than its largest one; power iteration, hence PyHessian, then returns
  the negative one. The short training run gives a spectrum whose top-5 by magnitude are its top-5.)
* ``neardegen``: least squares ``mean((Xw - y)^2)`` (``nn.Linear(d, 1)``, d=2000) with ``X`` built so that
  the Hessian ``2/N X^T X`` has top eigenvalues 35.85, 34.30, 33.87, 33.10, 32.60 (the first three are
  megatron ``tiny``'s at init) over a bulk in [0, 25). Reference: the constructed eigenvalues.

Counting (Hessian-vector products, "products"):

* *oracle*: every method is run long with no early stop (Lanczos ``tol=0`` with a ``callback``; our power
  iteration ``tol=0`` and its ``history``; PyHessian ``tol=0`` so that each eigenpair takes exactly
  ``maxIter`` products, its ``hessian_vector_product`` wrapped to record the Rayleigh quotient ``v^T H v``
  it computes). The count for an eigenvalue is the first product after which the estimate stays within
  1e-3 relative error of the reference for the rest of the run. For PyHessian's top-5 it is the sum over
  eigenpairs of each pair's count: a lower bound, since in the run each earlier pair went on to
  ``maxIter`` products and so deflates better than a pair stopped at its count would.
* *stopping rule*: each method with its own convergence test, sweeping its ``tol`` (ours: residual
  ``||Hv - theta v|| <= tol |theta|``; PyHessian: relative change of the estimate between iterations)
  over a grid; the figure is the fewest products among the settings whose result is within 1e-3 on every
  wanted eigenvalue (i.e. each method gets its best tol, chosen knowing the answer).

Wall time (b): lambda_max with the fewest-products accurate tol of each method (as in *stopping rule*),
timed from operator construction (PyHessian's constructor runs the create_graph backward; our fd forward
mode computes its base gradient on the first product) to the result; min of ``--repeats``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrscale_megatron.curvature import HessianOperator, lanczos, power_iteration
from lrscale_megatron.models.text import byte_batch
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss

REL = 1e-3  # target relative eigenvalue error
TOP = 5


# ------------------------------------------------------------------------------------------ problems
@dataclass
class Problem:
    name: str
    dtype: torch.dtype
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    batch: Any
    ph_model: nn.Module  # same parameters, forward(x) -> predictions for criterion(pred, y)
    ph_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ph_data: tuple[torch.Tensor, torch.Tensor]
    ref: tuple[float, ...]  # top-5 eigenvalues by descending magnitude (ref[0] = lambda_max > 0)
    top5_vs_pyhessian: bool = True  # run the (costly) top-5 PyHessian comparison on this problem

    @property
    def label(self) -> str:
        return f"{self.name} {str(self.dtype).replace('torch.', '')}"


class _FlatLogits(nn.Module):
    """PyHessian calls ``criterion(model(x), y)``: logits as [B*S, V] against labels [B*S]."""

    def __init__(self, gpt: TorchGPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.gpt(tokens)
        return logits.reshape(-1, logits.shape[-1])


def _gpt_problems(quick: bool) -> list[Problem]:
    cfg = (
        TorchGPTConfig(vocab_size=256, seq_length=8, hidden_size=16, num_layers=1, num_heads=2)
        if quick
        else TorchGPTConfig(vocab_size=256, seq_length=32, hidden_size=64, num_layers=2, num_heads=4)
    )
    steps, bsz = (5, 8) if quick else (60, 16)
    torch.manual_seed(0)
    base = TorchGPT(cfg).double()
    base.init_weights(0)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for s in range(steps):
        b = byte_batch(bsz, cfg.seq_length, seed=1000 + s)
        loss = torch_gpt_loss(base, {"tokens": b["tokens"], "labels": b["labels"]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    base = base.float().double()  # float32-representable weights shared by both dtypes
    for p in base.parameters():
        p.grad = None
    b = byte_batch(2 if quick else 4, cfg.seq_length, seed=0)
    batch = {"tokens": b["tokens"], "labels": b["labels"]}
    ref_op = HessianOperator(base, torch_gpt_loss, batch, mode="exact")
    r = lanczos(ref_op, k=TOP + 3, max_iter=40 if quick else 300, tol=1e-12, seed=12345, which="LM")
    la = lanczos(ref_op, k=1, max_iter=40 if quick else 300, tol=1e-12, seed=12345, which="LA")
    if not math.isclose(r.eigenvalues[0], la.eigenvalues[0], rel_tol=1e-9):
        raise RuntimeError(
            f"gpt problem: the largest-magnitude eigenvalue {r.eigenvalues[0]} is not lambda_max "
            f"{la.eigenvalues[0]}; power iteration would not target lambda_max"
        )
    ref = tuple(r.eigenvalues[:TOP])
    out = []
    for dt in (torch.float64, torch.float32):
        m = TorchGPT(cfg).to(dt)
        m.load_state_dict({k: v.to(dt) for k, v in base.state_dict().items()})
        out.append(
            Problem(
                "gpt",
                dt,
                m,
                torch_gpt_loss,
                batch,
                _FlatLogits(m),
                F.cross_entropy,
                (batch["tokens"], batch["labels"].reshape(-1)),
                ref,
                top5_vs_pyhessian=quick or dt == torch.float64,
            )
        )
    return out


def _neardegen_problems(quick: bool) -> list[Problem]:
    d = 100 if quick else 2000
    n = 2 * d
    top = np.array([35.85, 34.30, 33.87, 33.10, 32.60])
    rng = np.random.default_rng(0)
    bulk = 25.0 * rng.random(d - top.size) ** 3
    lam = np.concatenate([top, bulk])
    q_n, _ = np.linalg.qr(rng.standard_normal((n, d)))
    v_d, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x = q_n @ np.diag(np.sqrt(n * lam / 2.0)) @ v_d.T  # (2/n) X^T X = V diag(lam) V^T
    y = rng.standard_normal((n, 1))
    w0 = rng.standard_normal((1, d)) / math.sqrt(d)
    out = []
    for dt in (torch.float64, torch.float32):
        m = nn.Linear(d, 1, bias=False).to(dt)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w0))
        xt, yt = torch.from_numpy(x).to(dt), torch.from_numpy(y).to(dt)

        def loss_fn(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return F.mse_loss(model(b[0]), b[1])

        out.append(
            Problem(
                "neardegen", dt, m, loss_fn, (xt, yt), m, F.mse_loss, (xt, yt), tuple(float(v) for v in top)
            )
        )
    return out


# ------------------------------------------------------------------------------------------ helpers
def rel_err(est: float, ref: float) -> float:
    return abs(est - ref) / abs(ref)


def first_stays_within(seq: Sequence[float], ref: float) -> int | None:
    """1-based index after which every estimate is within REL of ref; None if the last one is not."""
    idx = None
    for i in range(len(seq) - 1, -1, -1):
        if math.isfinite(seq[i]) and rel_err(seq[i], ref) <= REL:
            idx = i + 1
        else:
            break
    return idx


@contextlib.contextmanager
def _default_dtype(dt: torch.dtype):
    """PyHessian draws its start vectors with ``torch.randn`` in the default dtype: match the model's."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class _PHRecorder:
    """Wraps ``pyhessian.hessian.hessian_vector_product``: counts products and records ``v^T H v``."""

    def __init__(self, record: bool = True) -> None:
        import sys

        import pyhessian  # noqa: F401  (the package re-exports the class under the module's name)

        ph_mod = sys.modules["pyhessian.hessian"]
        self.mod, self.orig, self.record = ph_mod, ph_mod.hessian_vector_product, record
        self.count = 0
        self.rq: list[float] = []

    def _hvp(self, grads_h, params, v):
        hv = self.orig(grads_h, params, v)
        self.count += 1
        if self.record:
            self.rq.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
        return hv

    def __enter__(self) -> _PHRecorder:
        self.mod.hessian_vector_product = self._hvp
        return self

    def __exit__(self, *exc) -> None:
        self.mod.hessian_vector_product = self.orig


def run_pyhessian(
    p: Problem, top_n: int, max_iter: int, tol: float, seed: int, record: bool = True
) -> tuple[list[float], _PHRecorder]:
    from pyhessian import hessian

    for q in p.model.parameters():
        q.grad = None
    torch.manual_seed(seed)
    with _default_dtype(p.dtype), _PHRecorder(record) as rec:
        h = hessian(p.ph_model, p.ph_criterion, data=p.ph_data, cuda=False)
        vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
    del h
    for q in p.model.parameters():  # PyHessian leaves create_graph gradients on the parameters
        q.grad = None
    return [float(v) for v in vals], rec


def op_for(p: Problem, mode: str) -> HessianOperator:
    return HessianOperator(
        p.model,
        p.loss_fn,
        p.batch,
        mode="fd" if mode.startswith("fd") else mode,
        fd_scheme="central" if mode == "fd-central" else "forward",
    )


# ------------------------------------------------------------------------------------------ (a) top-5
@dataclass
class Top5Row:
    label: str
    lanczos_each: list[int | None]
    ph_each: list[int | None]  # cumulative oracle count at which eigenvalue i is reached
    lanczos_sweep: int | None
    ph_sweep: int | None


def top5(p: Problem, quick: bool) -> Top5Row:
    ref = p.ref
    # Lanczos oracle: Ritz values after every iteration.
    ritz: list[tuple[float, ...]] = []
    lanczos(
        op_for(p, "exact"),
        k=TOP,
        max_iter=30 if quick else 150,
        tol=0.0,
        seed=0,
        which="LM",
        callback=lambda it, th: ritz.append(th),
    )
    lz = [first_stays_within([t[i] if len(t) > i else math.nan for t in ritz], ref[i]) for i in range(TOP)]
    # PyHessian oracle: tol=0 -> exactly max_iter products per eigenpair.
    m_ph = 15 if quick else 300
    _, rec = run_pyhessian(p, TOP, m_ph, 0.0, seed=0)
    per_pair = [first_stays_within(rec.rq[i * m_ph : (i + 1) * m_ph], ref[i]) for i in range(TOP)]
    ph: list[int | None] = []
    acc = 0
    for c in per_pair:
        if c is None or (ph and ph[-1] is None):
            ph.append(None)
        else:
            acc += c
            ph.append(acc)
    # Stopping-rule sweeps.
    lz_sweep = None
    for tol in (1e-2, 1e-3) if quick else (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4):
        r = lanczos(op_for(p, "exact"), k=TOP, max_iter=30 if quick else 150, tol=tol, seed=0, which="LM")
        if all(rel_err(a, b) <= REL for a, b in zip(r.eigenvalues, ref)):
            lz_sweep = r.n_matvec if lz_sweep is None else min(lz_sweep, r.n_matvec)
    ph_sweep = None
    for tol in (1e-3,) if quick else (1e-3, 1e-4, 1e-5):
        vals, rec = run_pyhessian(p, TOP, m_ph, tol, seed=0, record=False)
        if all(rel_err(a, b) <= REL for a, b in zip(sorted(vals, key=abs, reverse=True), ref)):
            ph_sweep = rec.count if ph_sweep is None else min(ph_sweep, rec.count)
    return Top5Row(p.label, lz, ph, lz_sweep, ph_sweep)


# ------------------------------------------------------------------------------------------ (a) lambda_max
@dataclass
class LmaxRow:
    label: str
    lanczos: list[int | None]  # oracle, per seed
    power: list[int | None]
    lanczos_stop: list[tuple[int, float]]  # tol=1e-3 stopping rule: (products, rel error), per seed
    power_stop: list[tuple[int, float]]


def lmax(p: Problem, seeds: Sequence[int], quick: bool) -> LmaxRow:
    lz, pw, lzs, pws = [], [], [], []
    for s in seeds:
        r = lanczos(op_for(p, "exact"), k=1, max_iter=30 if quick else 100, tol=0.0, seed=s)
        lz.append(first_stays_within(r.history, p.ref[0]))
        r = power_iteration(op_for(p, "exact"), max_iter=30 if quick else 300, tol=0.0, seed=s)
        pw.append(first_stays_within(r.history, p.ref[0]))
        r = lanczos(op_for(p, "exact"), k=1, max_iter=200, tol=1e-3, seed=s)
        lzs.append((r.n_matvec, rel_err(r.eigenvalues[0], p.ref[0])))
        r = power_iteration(op_for(p, "exact"), max_iter=30 if quick else 300, tol=1e-3, seed=s)
        pws.append((r.n_matvec, rel_err(r.eigenvalues[0], p.ref[0])))
    return LmaxRow(p.label, lz, pw, lzs, pws)


# ------------------------------------------------------------------------------------------ (b) wall time
@dataclass
class WallRow:
    label: str
    ours: dict[str, tuple[float, int, float, float] | None]  # mode -> (tol, products, seconds, rel err)
    ph: tuple[float, int, float, float] | None


#: the clock of every timing: ``time.perf_counter`` (wall) or, with ``--clock thread``,
#: ``time.thread_time`` (this thread's CPU time: with one torch thread every kernel runs on the calling
#: thread, and time descheduled by other jobs on a shared machine is not counted)
CLOCK: Callable[[], float] = time.perf_counter


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = CLOCK()
    out = fn()
    return CLOCK() - t0, out


def wall(p: Problem, repeats: int, quick: bool) -> WallRow:
    """Pick each method's fewest-products accurate tol, then time them interleaved (min of ``repeats``),
    so that a burst of load on the shared machine hits every method alike."""
    ref = p.ref[0]
    max_lz, max_ph = (30, 30) if quick else (200, 400)
    ours_tol: dict[str, float | None] = {}
    for mode in ("exact", "fd-forward"):
        chosen = None
        for tol in (1e-2, 1e-3) if quick else (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4):
            r = lanczos(op_for(p, mode), k=1, max_iter=max_lz, tol=tol, seed=0)
            if rel_err(r.eigenvalues[0], ref) <= REL and (chosen is None or r.n_matvec < chosen[1]):
                chosen = (tol, r.n_matvec)
        ours_tol[mode] = None if chosen is None else chosen[0]
    chosen_ph = None
    for tol in (1e-5,) if quick else (1e-3, 1e-4, 1e-5, 1e-6):
        vals, rec = run_pyhessian(p, 1, max_ph, tol, seed=0, record=False)
        if rel_err(vals[0], ref) <= REL and (chosen_ph is None or rec.count < chosen_ph[1]):
            chosen_ph = (tol, rec.count)
    best: dict[str, tuple[float, int, float, float] | None] = {m: None for m in (*ours_tol, "pyhessian")}
    for _ in range(repeats):
        for mode, tol in ours_tol.items():
            if tol is None:
                continue
            sec, r = _timed(lambda: lanczos(op_for(p, mode), k=1, max_iter=max_lz, tol=tol, seed=0))  # noqa: B023
            if best[mode] is None or sec < best[mode][2]:  # type: ignore[index]
                best[mode] = (tol, r.n_matvec, sec, rel_err(r.eigenvalues[0], ref))
        if chosen_ph is not None:
            tol_ph = chosen_ph[0]
            sec, (vals, rec) = _timed(lambda: run_pyhessian(p, 1, max_ph, tol_ph, seed=0, record=False))  # noqa: B023
            if best["pyhessian"] is None or sec < best["pyhessian"][2]:  # type: ignore[index]
                best["pyhessian"] = (tol_ph, rec.count, sec, rel_err(vals[0], ref))
    ph = best.pop("pyhessian")
    return WallRow(p.label, best, ph)


# ------------------------------------------------------------------------------------------ (c) ~1M LM
def gpt1m_problem(quick: bool, steps: int = 30) -> Problem:
    """``gpt1m``: TorchGPT V=256, S=64, H=128, L=4 (834,304 parameters; ``--quick``: the small shape),
    ``steps`` AdamW steps in float32 (30; ``--gpt1m-steps 30 300`` adds a longer-trained copy, whose top
    eigenvalues are closer together), float32 Hessian on one batch (B=4). Reference lambda_max: float64
    exact Lanczos at the same weights (tol 1e-10); refused if the largest-magnitude eigenvalue is not
    lambda_max (PyHessian's power iteration would then target another eigenvalue)."""
    cfg = (
        TorchGPTConfig(vocab_size=256, seq_length=16, hidden_size=32, num_layers=2, num_heads=4)
        if quick
        else TorchGPTConfig(vocab_size=256, seq_length=64, hidden_size=128, num_layers=4, num_heads=4)
    )
    torch.manual_seed(0)
    m = TorchGPT(cfg)
    m.init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    steps = 5 if quick else steps
    for s in range(steps):
        b = byte_batch(8, cfg.seq_length, seed=1000 + s)
        loss = torch_gpt_loss(m, {"tokens": b["tokens"], "labels": b["labels"]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in m.parameters():
        p.grad = None
    b = byte_batch(4, cfg.seq_length, seed=0)
    batch = {"tokens": b["tokens"], "labels": b["labels"]}
    ref64 = TorchGPT(cfg).double()
    ref64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    ref_op = HessianOperator(ref64, torch_gpt_loss, batch, mode="exact")
    la = lanczos(ref_op, k=2, max_iter=40 if quick else 120, tol=1e-10, seed=12345, which="LA")
    lm = lanczos(ref_op, k=1, max_iter=40 if quick else 120, tol=1e-10, seed=12345, which="LM")
    if not math.isclose(la.eigenvalues[0], lm.eigenvalues[0], rel_tol=1e-6):
        raise RuntimeError(
            f"gpt1m: largest magnitude {lm.eigenvalues[0]} is not lambda_max {la.eigenvalues[0]}"
        )
    del ref64, ref_op
    return Problem(
        f"gpt1m ({steps} steps, lambda_2/lambda_1 {la.eigenvalues[1] / la.eigenvalues[0]:.3f})",
        torch.float32,
        m,
        torch_gpt_loss,
        batch,
        _FlatLogits(m),
        F.cross_entropy,
        (batch["tokens"], batch["labels"].reshape(-1)),
        (la.eigenvalues[0],),
        top5_vs_pyhessian=False,
    )


def _solve_1m(p: Problem, mode: str, tol: float, basis: str) -> Any:
    """One timed solve from operator construction; ``fd-grad``: the fd operator started from
    ``g/||g|| + r/||r||`` (``curvature/start.py``, what ``measure_lambda_max`` does on a cold start; the
    base gradient it reads is the one the first product reuses)."""
    from lrscale_megatron.curvature.start import gradient_start

    op = op_for(p, "fd-forward" if mode == "fd-grad" else mode)
    v0 = gradient_start(op, 0)[0] if mode == "fd-grad" else None
    return lanczos(op, k=1, max_iter=60, tol=tol, seed=0, basis=basis, v0=v0)  # type: ignore[arg-type]


def wall_1m(p: Problem, repeats: int, rel: float) -> str:
    """Wall time to lambda_max within ``rel``: each method's fewest-products accurate tol (as in (b)),
    then timed interleaved, min of ``repeats``. lrscale modes: ``exact`` and ``fd`` with the default
    k=1 path (``basis="auto"``: the basis in host memory when it fits, as here; 1 check product),
    ``fd recompute`` (no stored basis: second pass + 2 check products, the fallback) and ``fd keep``
    (``basis="keep"``: full reorthogonalisation on the device, 1 check product); ``fd, gradient start``:
    the default fd path from the gradient-informed cold start of ``measure_lambda_max``."""
    ref = p.ref[0]
    modes = {
        "exact": ("exact", "auto"),
        "fd": ("fd-forward", "auto"),
        "fd, gradient start": ("fd-grad", "auto"),
        "fd recompute": ("fd-forward", "recompute"),
        "fd keep": ("fd-forward", "keep"),
    }
    chosen: dict[str, float] = {}
    for name, (mode, basis) in modes.items():
        best = None
        for tol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3):
            r = _solve_1m(p, mode, tol, basis)
            if rel_err(r.eigenvalues[0], ref) <= rel and (best is None or r.n_matvec < best[1]):
                best = (tol, r.n_matvec)
        if best is not None:
            chosen[name] = best[0]
    ph_best = None
    for tol in (1e-2, 3e-3, 1e-3, 1e-4):
        vals, rec = run_pyhessian(p, 1, 300, tol, seed=0, record=False)
        if rel_err(vals[0], ref) <= rel and (ph_best is None or rec.count < ph_best[1]):
            ph_best = (tol, rec.count)
    res: dict[str, tuple[float, int, float, float, bool]] = {}
    for _ in range(repeats):
        for name, tol in chosen.items():
            mode, basis = modes[name]
            sec, r = _timed(lambda: _solve_1m(p, mode, tol, basis))  # noqa: B023
            if name not in res or sec < res[name][2]:
                res[name] = (tol, r.n_matvec, sec, rel_err(r.eigenvalues[0], ref), r.converged)
        if ph_best is not None:
            tph = ph_best[0]
            sec, (vals, rec) = _timed(lambda: run_pyhessian(p, 1, 300, tph, seed=0, record=False))  # noqa: B023
            if "pyhessian" not in res or sec < res["pyhessian"][2]:
                res["pyhessian"] = (tph, rec.count, sec, rel_err(vals[0], ref), True)
    n = sum(q.numel() for q in p.model.parameters())
    ph = res.get("pyhessian")
    out = [
        f"### (c) {p.label} ({n:,} parameters, lambda_max {ref:.6g}): wall time to lambda_max within {rel:g}",
        "",
        "| method | tol | products | s (min of repeats) | rel err | converged | / PyHessian (target <= 0.4) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (tol, k, sec, err, conv) in res.items():
        ratio = "" if name == "pyhessian" or ph is None else f"{sec / ph[2]:.3f}"
        out.append(f"| {name} | {tol:g} | {k} | {sec:.3f} | {err:.1e} | {conv} | {ratio} |")
    for name in modes:
        if name not in res:
            out.append(f"| {name} | no tol reached {rel:g} | | | | | |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ report
def _n(x: int | None) -> str:
    return "not reached" if x is None else str(x)


def _ratio(a: int | float | None, b: int | float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def report(
    t5: list[Top5Row], lm: list[LmaxRow], wr: list[WallRow], refs: dict[str, tuple[float, ...]]
) -> str:
    out = [
        "### Reference eigenvalues (top-5 by magnitude; the first is lambda_max)",
        "",
        "| problem | top-5 |",
        "|---|---|",
    ]
    for k, v in refs.items():
        out.append(f"| {k} | {', '.join(f'{x:.6g}' for x in v)} |")
    out += [
        "",
        f"### (a) products to {REL:g} relative error on each of the top-{TOP} eigenvalues "
        "(target: Lanczos / PyHessian <= 0.15)",
        "",
        "| problem | method | "
        + " | ".join(f"lambda_{i + 1}" for i in range(TOP))
        + " | all top-5 (oracle) | all top-5 (stopping rule, best tol) |",
        "|---|---|" + "---|" * TOP + "---|---|",
    ]
    for r in t5:
        lz_all = None if None in r.lanczos_each else max(r.lanczos_each)  # type: ignore[type-var]
        ph_all = r.ph_each[-1]
        out.append(
            f"| {r.label} | lrscale lanczos | "
            + " | ".join(_n(x) for x in r.lanczos_each)
            + f" | {_n(lz_all)} | {_n(r.lanczos_sweep)} |"
        )
        out.append(
            f"| {r.label} | PyHessian eigenvalues(top_n=5) | "
            + " | ".join(_n(x) for x in r.ph_each)
            + f" | {_n(ph_all)} | {_n(r.ph_sweep)} |"
        )
        ro, rs = _ratio(lz_all, ph_all), _ratio(r.lanczos_sweep, r.ph_sweep)
        out.append(
            f"| {r.label} | **ratio** | "
            + " | ".join("" for _ in range(TOP))
            + f" | **{_r(ro)}** {'met' if ro is not None and ro <= 0.15 else 'MISSED'}"
            + f" | **{_r(rs)}** {'met' if rs is not None and rs <= 0.15 else 'MISSED'} |"
        )
    out += [
        "",
        f"### (a) lambda_max: products to {REL:g} relative error, Lanczos vs power iteration "
        "(target: Lanczos never more)",
        "",
        "| problem | seeds | Lanczos (oracle) | power (oracle) | Lanczos <= power | "
        "Lanczos tol=1e-3: products (max rel err) | power tol=1e-3: products (max rel err) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in lm:
        ok = all(a is not None and (b is None or a <= b) for a, b in zip(r.lanczos, r.power))
        out.append(
            f"| {r.label} | {len(r.lanczos)} | {', '.join(_n(x) for x in r.lanczos)} | "
            f"{', '.join(_n(x) for x in r.power)} | {'yes' if ok else 'NO'} | "
            f"{', '.join(str(n) for n, _ in r.lanczos_stop)} ({max(e for _, e in r.lanczos_stop):.1e}) | "
            f"{', '.join(str(n) for n, _ in r.power_stop)} ({max(e for _, e in r.power_stop):.1e}) |"
        )
    out += [
        "",
        f"### (b) wall time to lambda_max at {REL:g} relative error (target: lrscale fastest / "
        "PyHessian <= 0.5)",
        "",
        "| problem | lrscale exact: tol, products, s | lrscale fd forward: tol, products, s | "
        "PyHessian: tol, products, s | fastest lrscale / PyHessian |",
        "|---|---|---|---|---|",
    ]
    for r in wr:

        def cell(x):
            return "no tol reached 1e-3" if x is None else f"{x[0]:g}, {x[1]}, {x[2]:.3f} (err {x[3]:.0e})"

        times = [v[2] for v in r.ours.values() if v is not None]
        ratio = _ratio(min(times) if times else None, r.ph[2] if r.ph else None)
        out.append(
            f"| {r.label} | {cell(r.ours.get('exact'))} | {cell(r.ours.get('fd-forward'))} | "
            f"{cell(r.ph)} | **{_r(ratio)}** {'met' if ratio is not None and ratio <= 0.5 else 'MISSED'} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small problems, one seed, one repeat (smoke run)")
    ap.add_argument("--seeds", type=int, default=3, help="start-vector seeds for the lambda_max comparison")
    ap.add_argument("--repeats", type=int, default=3, help="wall-time repeats (the minimum is reported)")
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch.set_num_threads (under heavy load on a 2-core machine, 2 threads can be 100x slower)",
    )
    ap.add_argument("--problems", default="gpt,neardegen", help="comma-separated subset of gpt,neardegen")
    ap.add_argument(
        "--gpt1m", action="store_true", help="only (c): wall time to lambda_max on the ~1M-parameter LM"
    )
    ap.add_argument("--rel", type=float, default=1e-2, help="(c): relative error that counts as reached")
    ap.add_argument(
        "--gpt1m-steps",
        type=int,
        nargs="+",
        default=[30],
        help="(c): AdamW steps before the Hessian is taken, one problem each (e.g. 30 300: the harder one)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: perf_counter; thread: this thread's CPU time (use with --threads 1 on a loaded machine)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "thread":
        if args.threads != 1:
            raise SystemExit(
                "--clock thread needs --threads 1 (other threads' CPU time would not be counted)"
            )
        CLOCK = time.thread_time
    if args.gpt1m:
        t0 = time.perf_counter()
        for steps in args.gpt1m_steps:
            print(
                f"(start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()}, "
                f"clock {args.clock})"
            )
            print(wall_1m(gpt1m_problem(args.quick, steps), 1 if args.quick else args.repeats, args.rel))
            print(f"(end {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()})\n")
        print(
            f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads, load {os.getloadavg()})"
        )
        return
    try:
        import pyhessian  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            "pyhessian is not installed: pip install -c .venv/constraints.txt --no-deps pyhessian==0.1"
        ) from e
    t0 = time.perf_counter()
    seeds = [0] if args.quick else list(range(args.seeds))
    repeats = 1 if args.quick else args.repeats
    wanted = args.problems.split(",")
    unknown = sorted(set(wanted) - {"gpt", "neardegen"})
    if unknown:
        raise SystemExit(f"--problems: {unknown} not in gpt, neardegen")
    problems = (_gpt_problems(args.quick) if "gpt" in wanted else []) + (
        _neardegen_problems(args.quick) if "neardegen" in wanted else []
    )
    refs = {p.name: p.ref for p in problems}
    t5 = [top5(p, args.quick) for p in problems if p.top5_vs_pyhessian]
    lm = [lmax(p, seeds, args.quick) for p in problems]
    wr = [wall(p, repeats, args.quick) for p in problems]
    print(report(t5, lm, wr, refs))
    print(
        f"\n({'quick' if args.quick else 'full'} run, {time.perf_counter() - t0:.0f} s, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average at the end {os.getloadavg()[0]:.2f})"
    )


if __name__ == "__main__":
    main()
