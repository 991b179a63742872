"""Lanczos from a gradient-informed cold start vs a random one: products to lambda_max within 1 %.

    python benchmarks/lanczos_start.py --threads 1 --seeds 5 [--problems gpt1m30,gpt1m300,quick,precond]

For each problem and seed, ``lanczos(op, k=1, tol, seed)`` on the fd-forward operator from the random start
(``v0=None``) and from :func:`lrscale_megatron.curvature.start.gradient_start` (``g/||g|| + r/||r||``, the
same ``r``), over the tol grid of ``benchmarks/curvature_vs_pyhessian.py`` (c): products (checks included),
relative error against a float64 exact reference, converged; and the oracle count (``tol=0``, the first
iteration after which the Ritz value stays within 1 %). Problems: ``gpt1m30`` / ``gpt1m300`` (the
834,304-parameter TorchGPT of that benchmark after 30 / 300 AdamW steps), ``quick`` (its ``--quick`` shapes:
the small gpt1m, the 118k-shape ``gpt`` and ``neardegen`` problems, float32), ``precond`` (the small gpt1m
after 30 AdamW steps, Adam-preconditioned: the start is ``P^-1/2 g``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import curvature_vs_pyhessian as cvp  # noqa: E402

from lrscale_megatron.curvature import HessianOperator, lanczos  # noqa: E402
from lrscale_megatron.curvature.preconditioned import FD_STEP_FACTOR, PreconditionedOperator  # noqa: E402
from lrscale_megatron.curvature.start import gradient_start  # noqa: E402

TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)


def _oracle(hist, ref, rel):
    idx = None
    for i in range(len(hist) - 1, -1, -1):
        if math.isfinite(hist[i]) and abs(hist[i] - ref) <= rel * abs(ref):
            idx = i + 1
        else:
            break
    return idx


def compare(label, make_op, ref, seeds, rel=1e-2, max_iter=60):
    rows = []
    for start in ("random", "gradient"):
        fewest, oracle, wrong = [], [], 0
        for s in seeds:
            best = None
            for tol in TOLS:
                op = make_op()
                v0 = gradient_start(op, s)[0] if start == "gradient" else None
                r = lanczos(op, k=1, max_iter=max_iter, tol=tol, seed=s, v0=v0)
                err = abs(r.eigenvalues[0] - ref) / abs(ref)
                if r.converged and err > 3 * tol:
                    wrong += 1  # converged outside its own bound: must never happen
                if err <= rel and r.converged and (best is None or r.n_matvec < best[0]):
                    best = (r.n_matvec, tol, err)
            fewest.append(best)
            op = make_op()
            v0 = gradient_start(op, s)[0] if start == "gradient" else None
            r = lanczos(op, k=1, max_iter=25, tol=0.0, seed=s, v0=v0)
            oracle.append(_oracle(r.history, ref, rel))
        rows.append((start, fewest, oracle, wrong))
    out = [
        f"#### {label} (reference lambda_max {ref:.6g})",
        "",
        "| start | products to 1 % (fewest over tol, per seed) | tol chosen | oracle iterations to 1 % | converged outside 3 tol |",
        "|---|---|---|---|---|",
    ]
    for start, fewest, oracle, wrong in rows:
        out.append(
            f"| {start} | {', '.join('-' if b is None else str(b[0]) for b in fewest)} | "
            f"{', '.join('-' if b is None else f'{b[1]:g}' for b in fewest)} | "
            f"{', '.join('-' if o is None else str(o) for o in oracle)} | {wrong} |"
        )
    return "\n".join(out)


def _precond_problem():
    cfg = cvp.TorchGPTConfig(vocab_size=256, seq_length=16, hidden_size=32, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    m = cvp.TorchGPT(cfg).double()
    m.init_weights(0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for s in range(30):
        b = cvp.byte_batch(8, cfg.seq_length, seed=1000 + s)
        loss = cvp.torch_gpt_loss(m, {"tokens": b["tokens"], "labels": b["labels"]})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    b = cvp.byte_batch(4, cfg.seq_length, seed=0)
    batch = {"tokens": b["tokens"], "labels": b["labels"]}
    ref = lanczos(
        PreconditionedOperator.from_optimizer(
            HessianOperator(m, cvp.torch_gpt_loss, batch, mode="exact"), opt
        ),
        k=1,
        max_iter=200,
        tol=1e-10,
        seed=12345,
    ).eigenvalues[0]
    m32 = cvp.TorchGPT(cfg)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    opt32 = torch.optim.AdamW(m32.parameters(), lr=3e-3)
    for p32, p in zip(m32.parameters(), m.parameters()):  # the same second moments, in float32
        st = opt.state[p]
        opt32.state[p32] = {
            k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dim() else v)
            for k, v in st.items()
        }

    def make():
        op = HessianOperator(m32, cvp.torch_gpt_loss, batch, mode="fd")
        op.fd_eps *= FD_STEP_FACTOR  # as measure_lambda_max does
        return PreconditionedOperator.from_optimizer(op, opt32)

    return make, ref


def megatron_tiny(seeds, steps=300):
    """megatron-core GPTModel preset ``tiny`` (init_megatron(1, 1)), ``steps`` AdamW steps (lr 1e-3) on
    Shakespeare bytes, then ``measure_lambda_max`` as the online default measures (fd, preconditioned,
    ``OnlineConfig()`` tol and max_iter) from the gradient start (adopted) and from a random start;
    reference: exact-mode preconditioned Lanczos, tol 1e-8 (float32: the model has no float64 path)."""
    from unittest import mock

    from lrscale_megatron.adapter import OnlineConfig
    from lrscale_megatron.curvature import start as st
    from lrscale_megatron.launch import init_megatron, shutdown
    from lrscale_megatron.measurement import measure_lambda_max
    from lrscale_megatron.models.gpt import build_gpt, get_preset, gpt_loss_fn
    from lrscale_megatron.models.text import byte_batch

    oc = OnlineConfig()
    preset = get_preset("tiny")
    ctx = init_megatron(1, 1, seed=0)
    try:
        model = build_gpt(preset, ctx, dtype=torch.float32, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for i in range(steps):
            loss = gpt_loss_fn(model, byte_batch(preset.micro_batch_size, preset.seq_length, seed=1 + i))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        held = byte_batch(preset.micro_batch_size, preset.seq_length, seed=10**6)
        kw = dict(parallel=ctx, optimizer=opt)
        ref = measure_lambda_max(model, gpt_loss_fn, held, mode="exact", max_iter=200, tol=1e-8, **kw)
        assert ref.converged, ref.reason
        out = [
            f"#### megatron-core tiny GPT, {steps} AdamW steps, preconditioned fd, OnlineConfig() "
            f"tol {oc.tol:g} max_iter {oc.max_iter} (reference {ref.lambda_max:.6g}, exact tol 1e-8)",
            "",
            "| start | products per seed | rel err per seed | converged |",
            "|---|---|---|---|",
        ]
        for start in ("random", "gradient"):
            res = []
            for s in seeds:
                patch = (
                    mock.patch.object(st, "gradient_start", lambda op, seed: (None, "off"))
                    if start == "random"
                    else contextlib.nullcontext()
                )
                with patch:
                    e = measure_lambda_max(
                        model, gpt_loss_fn, held, mode="fd", max_iter=oc.max_iter, tol=oc.tol, seed=s, **kw
                    )
                res.append(e)
            out.append(
                f"| {start} | {', '.join(str(e.n_matvec) for e in res)} | "
                f"{', '.join(f'{abs(e.lambda_max - ref.lambda_max) / ref.lambda_max:.1e}' for e in res)} | "
                f"{', '.join('yes' if e.converged else 'NO' for e in res)} |"
            )
        return "\n".join(out)
    finally:
        shutdown()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--problems", default="quick,precond,gpt1m30,gpt1m300")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = list(range(a.seeds))
    print(f"(start {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()})")
    for name in a.problems.split(","):
        if name == "quick":
            p = cvp.gpt1m_problem(True)
            print(compare(f"quick gpt1m shape, {p.label}", lambda p=p: cvp.op_for(p, "fd"), p.ref[0], seeds))
            for p in cvp._gpt_problems(True) + cvp._neardegen_problems(True):
                if p.dtype == torch.float32:
                    print(compare(f"quick {p.label}", lambda p=p: cvp.op_for(p, "fd"), p.ref[0], seeds))
        elif name == "precond":
            make, ref = _precond_problem()
            print(compare("preconditioned small gpt1m shape (30 AdamW steps), fd", make, ref, seeds))
        elif name == "megatron":
            print(megatron_tiny(seeds))
        elif name.startswith("gpt1m"):
            p = cvp.gpt1m_problem(False, int(name[5:]))
            print(compare(p.label, lambda p=p: cvp.op_for(p, "fd"), p.ref[0], seeds))
        print(
            f"(done {name} {time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()})",
            flush=True,
        )


if __name__ == "__main__":
    main()
