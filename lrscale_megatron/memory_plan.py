"""The extra device (and host) memory of one online curvature measurement, per GPU.

Memory (:func:`measurement_memory`, bytes on one GPU, over this rank's parameter shards ``N``), counted
on the code as it runs (``tests/unit/test_preflight.py::test_fd_estimate_matches_a_counted_measurement``
holds the estimate to a counted ``k=1`` fd measurement): with finite differences (the online default)
the measurement holds, over one training forward+backward, :data:`FD_VECTORS` = 4 vectors in the vector
dtype (fp32; fp64 for fp64 models): Lanczos' ``q``, ``q_prev`` and the Ritz vector of its second pass
(independent of ``max_iter``) and the cached base gradient. When the host can hold the Lanczos basis
(``lanczos(basis="auto")`` decides at measurement time, ``curvature/hostbasis.py``), the device holds
:data:`FD_HOST_VECTORS` = 2 (``q`` and the base gradient) and the host ``max_iter`` vectors
(``measurement_memory(basis="host", max_iter=...)``), plus, for float32/float64 parameters, the fd
anchor (:data:`FD_ANCHOR_VECTORS` = 1 in the parameter dtype: one copy of the parameters for the length
of the solve, which the products restore from; ``curvature/anchor.py``): 3 in all. The preflight refusal
uses the fallback's 4, since the host's room is only known when the measurement runs. With the second
pass the perturbed parameters are restored by subtraction, without a copy (the default
``fd_restore="auto"``; ``"copy"``: one more vector in the parameter dtype). With the
Adam preconditioner: :data:`PRECONDITION_VECTORS` = 2 more (the scale and the scaled input). With
bf16/fp16 parameters the loss is evaluated at fp32 substitutes: one more fp32 vector, and the forward
runs in fp32, so one more micro-batch of activations (``activation_bytes``). Exact products keep
:data:`EXACT_FP32_VECTORS` fp32 vectors (Lanczos' three and the product), the tangent in the parameter
dtype and the gradient kept with its graph, and the graph itself (about twice one micro-batch's
activations). The product's own gradient takes the place of the training step's gradient, and its
forward/backward fits in the memory the training step's activations free, so neither is counted.

With ``vectors="host"`` (fd, bf16/fp16 parameters; ``curvature/hostvectors.py``) no solver vector is on the
device: it holds the fp32 substitutes (4 B/param) and one fp32 forward/backward of a part of the batch
(``batch_split`` parts), counted over the training step's as an upper bound, as if the fp32 gradient's
extra ``4 - param_bytes`` B/param and the extra activations ``(2 / batch_split - 1) x`` one micro-batch's
peaked together (floored at 0); the host holds ``q``, the product and the base gradient (3 vectors, 5
with the preconditioner) and the host basis's ``max_iter``. A measurement that will not fit is refused
with the fix naming these settings. From the parameter count and the training step's peak alone this
bound cannot be tightened: a model whose gradient is made while its activations are alive (most
parameters in the last layer, as an LM head) reaches it within 2 % at ``batch_split`` 1 and 2
(``tests/unit/test_preflight_host_vectors.py``), though a transformer counts well below it (3.6 of
6.0 B/param at split 2). Not counted: float32 copies of floating-point batch inputs (bf16 inputs are
upcast per part; 4 B per element; token batches have none).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
#: fd, k=1: q, q_prev, the Ritz vector (second pass), the cached base gradient (module docstring)
FD_VECTORS = 4
#: fd, k=1 with the Lanczos basis in host memory: q and the cached base gradient on the device
FD_HOST_VECTORS = 2
#: fd, k=1 with the host basis, float32/float64 parameters: the anchor (in the parameter dtype)
FD_ANCHOR_VECTORS = 1
#: the Adam preconditioner's scale P^-1/2 and the scaled input of each product
PRECONDITION_VECTORS = 2
#: exact products: q, q_prev, the Ritz vector and the product
EXACT_FP32_VECTORS = 4
#: fd, k=1 with vectors="host": q, the product and the base gradient in host memory
FD_HOST_SIDE_VECTORS = 3


@dataclass(frozen=True)
class MeasurementMemory:
    """Extra device memory of one online measurement on this rank (bytes)."""

    mode: str
    n_params: int
    param_bytes: int
    vectors_bytes: int
    graph_bytes: int
    precondition: bool
    host_bytes: int = 0  # host memory: a host Lanczos basis (basis="host"), the vectors (vectors="host")
    vectors: str = "device"  # where the solver's vectors live

    @property
    def total_bytes(self) -> int:
        return self.vectors_bytes + self.graph_bytes

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.n_params, 1)

    def render(self) -> str:
        unit, scale = ("GiB", GIB) if self.total_bytes >= GIB else ("MiB", 1024**2)
        what = "graph" if self.mode == "exact" else "fp32 forward"
        graph = f" + {what} {self.graph_bytes / scale:.2f}" if self.graph_bytes else ""
        where = "vectors and basis" if self.vectors == "host" else "basis"
        host = f"; host {where} {self.host_bytes / GIB:.2f} GiB of host memory" if self.host_bytes else ""
        return (
            f"measurement extra {self.total_bytes / scale:.2f} {unit} = vectors {self.vectors_bytes / scale:.2f}"
            f"{graph} (hvp={self.mode}, k=1, any max_iter, {self.bytes_per_param:.1f} B/param, "
            f"{self.total_bytes / max(self.n_params * self.param_bytes, 1):.1f} x parameter bytes{host})"
        )


def measurement_memory(
    n_params: int,
    *,
    mode: str,
    param_bytes: int,
    precondition: bool = True,
    activation_bytes: int = 0,
    fd_restore: str = "auto",
    basis: str = "recompute",
    max_iter: int = 20,
    vectors: str = "device",
    batch_split: int = 1,
) -> MeasurementMemory:
    """Extra bytes of one ``k=1`` measurement over ``n_params`` local parameter elements (module docstring).

    ``activation_bytes``: one micro-batch's activations (the exact mode's graph; the fp32 forward of
    bf16/fp16 models in fd mode). ``basis``: ``"recompute"`` (no stored basis: the worst case on the
    device) or ``"host"`` (fd only: the basis in host memory, ``max_iter`` vectors in ``host_bytes``).
    ``fd_restore`` as :class:`~lrscale_megatron.curvature.operators.HessianOperator`'s (``"auto"``: the
    anchor with the host basis, subtraction with the second pass). ``vectors="host"`` (fd, bf16/fp16) and
    ``batch_split``: the solver's vectors in host memory, the batch in parts (module docstring).
    """
    if basis not in ("recompute", "host"):
        raise ValueError(f"basis={basis!r} is not 'recompute' or 'host'")
    if basis == "host" and mode != "fd":
        raise ValueError("basis='host' is counted for mode='fd' only")
    if mode not in ("fd", "exact"):
        raise ValueError(f"mode={mode!r} is not 'fd' or 'exact'")
    if fd_restore not in ("auto", "subtract", "copy"):
        raise ValueError(f"fd_restore={fd_restore!r} is not 'auto', 'subtract' or 'copy'")
    low = param_bytes < 4
    vbytes = 8 if param_bytes == 8 else 4  # the vector dtype: fp32, fp64 for fp64 models
    pre = PRECONDITION_VECTORS if precondition else 0
    host = 0
    if vectors not in ("device", "host") or (vectors == "host" and not (mode == "fd" and low)):
        raise ValueError(
            f"vectors={vectors!r} is counted as 'device', or 'host' for mode='fd' with bf16/fp16"
        )
    if not (isinstance(batch_split, int) and batch_split >= 1):
        raise ValueError(f"batch_split={batch_split!r} must be an integer >= 1")
    if vectors == "host":
        rows = int(max_iter) if basis == "host" else 0
        host = vbytes * int(n_params) * (FD_HOST_SIDE_VECTORS + pre + rows)
        extra = (4 - param_bytes) * int(n_params) + (2 / batch_split - 1) * int(activation_bytes)
        n = int(n_params)  # on the device: the fp32 substitutes and the fp32 fwd+bwd over the training step's
        return MeasurementMemory(
            mode, n, int(param_bytes), 4 * n, int(max(extra, 0.0)), precondition, host, vectors
        )
    if mode == "fd":
        per = vbytes * ((FD_HOST_VECTORS if basis == "host" else FD_VECTORS) + pre)
        host = vbytes * int(n_params) * int(max_iter) if basis == "host" else 0
        if low:
            per += 4  # fp32 substitutes of the parameters
        elif fd_restore == "copy":
            per += param_bytes
        elif fd_restore == "auto" and basis == "host":
            per += FD_ANCHOR_VECTORS * param_bytes
        # the fp32 forward of a bf16/fp16 model (of one part: batch_split) over the training step's
        graph = int(max(2 / batch_split - 1, 0.0) * activation_bytes) if low else 0
    else:
        per = vbytes * (EXACT_FP32_VECTORS + pre) + 2 * param_bytes  # + tangent, gradient with its graph
        graph = 2 * int(activation_bytes) // batch_split  # one part's graph at a time
    nbytes = n_params * per
    return MeasurementMemory(mode, int(n_params), int(param_bytes), int(nbytes), graph, precondition, host)
