"""Host vectors against device vectors for one bf16 fd product (a part of ``benchmarks/gpu_check.py``).

On the check's bf16 GPT (``HessianOperator(mode="fd")``, one micro-batch), for ``vectors="device"``,
``vectors="host"`` and ``vectors="host", batch_split=2``:

* ``product_s``: median wall time of one product (the base gradient cached; ``repeats`` after a warm-up),
  and its ratio to the device vectors' (on a GPU a host product adds two parameter-sized PCIe copies:
  ``q`` to the device, the gradient back);
* ``peak_extra_gib`` / ``peak_extra_x_param_bytes``: the device peak (``torch.cuda.max_memory_allocated``)
  of the base gradient and one product over the memory allocated before the operator was made (the
  vectors kept by the operator count: the cached base gradient is device memory with device vectors),
  in GiB and in units of the bf16 parameter bytes; ``None`` on CPU (no device counter);
* ``equals_device``: the host product is the device vectors' bit for bit (at the same split).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

GIB = 1024**3
SETTINGS = (("device", 1), ("host", 1), ("host", 2))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_vector_products(model: torch.nn.Module, batch: dict, ctx: Any, repeats: int) -> dict[str, Any]:
    """Time and device peak of one fd product per setting of :data:`SETTINGS` (module docstring)."""
    from lrscale_megatron.curvature import HessianOperator
    from lrscale_megatron.models.gpt import gpt_loss_fn

    cuda = torch.cuda.is_available()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out: dict[str, Any] = {"params": n, "repeats": repeats}
    products: dict[tuple[str, int], list[torch.Tensor]] = {}
    for vectors, split in SETTINGS:
        key = f"{vectors},split{split}"
        _sync()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        op = HessianOperator(
            model, gpt_loss_fn, [batch], mode="fd", parallel=ctx, vectors=vectors, batch_split=split
        )
        v = op.backend.randn(0)
        op.base_gradient()
        hv = op.matvec(v)  # the first product: the peak below, and the warm-up of the timing
        _sync()
        row: dict[str, Any] = {"peak_extra_gib": None, "peak_extra_x_param_bytes": None}
        if cuda:
            extra = torch.cuda.max_memory_allocated() - before
            row = {"peak_extra_gib": extra / GIB, "peak_extra_x_param_bytes": extra / (2 * n)}
        products[(vectors, split)] = [t.detach().to("cpu", copy=True) for t in hv]
        del hv
        times = []
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            op.matvec(v)
            _sync()
            times.append(time.perf_counter() - t0)
        row["product_s"] = statistics.median(times)
        out[key] = row
        op.release()
        del op, v
    base = out["device,split1"]["product_s"]
    for vectors, split in SETTINGS:
        row = out[f"{vectors},split{split}"]
        row["over_device"] = row["product_s"] / base
    dev, host = products[("device", 1)], products[("host", 1)]
    out["host,split1"]["equals_device"] = all(torch.equal(a, b) for a, b in zip(dev, host))
    return out


def render_host_vectors(r: dict[str, Any] | None) -> list[str]:
    """Markdown rows of :func:`host_vector_products`' result (none when it was not run)."""
    if not r:
        return []

    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [
        "",
        f"one bf16 fd product, host vs device vectors ({r['params']:,} parameters, median of {r['repeats']}):",
        "",
        "| vectors | batch_split | product s | / device vectors | device peak extra GiB | x param bytes |",
        "|---|---|---|---|---|---|",
    ]
    for vectors, split in SETTINGS:
        e = r[f"{vectors},split{split}"]
        same = {True: " (= device bit for bit)", False: " (NOT the device product)"}.get(
            e.get("equals_device"), ""
        )
        lines.append(
            f"| {vectors}{same} | {split} | {f(e['product_s'], '.4g')} | {f(e['over_device'], '.3g')} | "
            f"{f(e['peak_extra_gib'], '.3f')} | {f(e['peak_extra_x_param_bytes'], '.2f')} |"
        )
    return lines
