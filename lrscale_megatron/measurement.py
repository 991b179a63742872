"""The bridge between the LRScale scheduler and the curvature core: what one online measurement is.

* :func:`measure_lambda_max`: top eigenvalue of the (Adam-preconditioned) Hessian on the held batch, by
  Lanczos (Paige 1976) on Hessian-vector products (Pearlmutter 1994 / finite differences); the
  preconditioner ``P = sqrt(v̂) + eps`` comes from :func:`~lrscale_megatron.moments.second_moments`, which
  reads torch Adam/AdamW, DeepSpeed ``BF16_Optimizer`` / ZeRO-1/2 flat partitions / ``FP16_Optimizer``
  and megatron-core's distributed and float16 optimizers.
* :func:`curvature_estimator`: the estimator the scheduler attaches; it runs :func:`preflight` first,
  so a setting that cannot be measured is refused when the estimator is attached, not at the end of
  warmup.
* :func:`preflight` (in :mod:`lrscale_megatron.preflight`): refusals and the measurement's memory.

The policy (:mod:`lrscale_megatron.adapter`) stays pure; it only sees :class:`Estimate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from lrscale_megatron.adapter import Estimate, Estimator, OnlineConfig
from lrscale_megatron.moments import MomentsUnavailable, second_moments
from lrscale_megatron.online_config import BasisMode
from lrscale_megatron.preflight import MeasurementMemory, MeasurementRefused, measurement_memory, preflight

__all__ = [
    "MeasurementMemory",
    "MeasurementRefused",
    "MomentsUnavailable",
    "WarmStart",
    "curvature_estimator",
    "measure_lambda_max",
    "measurement_memory",
    "online_estimators",
    "preconditioned_operator",
    "preflight",
    "second_moments",
]

logger = logging.getLogger(__name__)


def preconditioned_operator(op: Any, optimizer: Any) -> Any:
    """``PreconditionedOperator(op, v̂, eps)`` with ``v̂`` read by :func:`second_moments` for ``op.params``.

    Collective under sharded optimizers (every data-parallel rank calls it). Raises
    :class:`MomentsUnavailable` with the reason when the optimizer has no usable second moment.
    """
    from lrscale_megatron.curvature import PreconditionedOperator

    v_hat, eps = second_moments(optimizer, op.params)
    return PreconditionedOperator(op, v_hat, eps=eps)


class WarmStart:
    """The last converged top Ritz vector of each measured parameter set: the next measurement's start.

    The next start is ``y / ||y|| + r / ||r||`` with ``r`` the measurement's seeded random vector: where the
    top direction moved little, Lanczos converges in fewer products; the random half keeps what a random
    start guarantees (a nonzero component along whatever is now the top eigenvector, so a stale ``y``
    that is no longer the top direction cannot pass as converged after one step). One vector (this rank's
    shards, in the operator's dtype) per parameter set. Not checkpointed: a resumed run starts cold.
    """

    def __init__(self) -> None:
        self._vectors: dict[tuple[int, ...] | None, Any] = {}
        self._since_failure: dict[tuple[int, ...] | None, int] = {}

    #: after an unconverged measurement, this many converged ones (without a vector) before asking again
    RECOVER = 2

    def wants_vector(self, params: Sequence[Any] | None) -> bool:
        """Whether to ask the solver for this measurement's Ritz vector: not after an unconverged
        measurement of ``params`` until ``RECOVER`` have converged, because the solver builds the vector of
        an unconverged run too (a second pass, about ``max_iter`` more products) and failures recur
        (measured on the tiny GPT after warmup: converged and unconverged measurements alternating)."""
        return self._since_failure.get(self.key(params), self.RECOVER) >= self.RECOVER

    @staticmethod
    def key(params: Sequence[Any] | None) -> tuple[int, ...] | None:
        return None if params is None else tuple(id(p) for p in params)

    def start(self, backend: Any, params: Sequence[Any] | None, seed: int) -> Any:
        """The start vector for ``params`` (``None``: no usable previous vector, a cold random start)."""
        y = self._vectors.get(self.key(params))
        if y is None or len(y) != len(backend.specs):
            return None
        if any(tuple(t.shape) != tuple(spec.shape) for t, spec in zip(y, backend.specs)):
            return None  # the parameters were re-sharded since: start cold
        ny = backend.norm(y)
        if not (math.isfinite(ny) and ny > 0.0):
            return None
        r = backend.randn(seed)
        return backend.axpy_(1.0 / ny, y, backend.scale_(1.0 / backend.norm(r), r))

    def record(self, params: Sequence[Any] | None, converged: bool, vector: Any = None) -> None:
        """After a measurement: keep ``vector`` (only a converged one), or forget the old one."""
        k = self.key(params)
        if converged and vector is not None:
            self._vectors[k] = vector
        else:  # only a vector the checks passed seeds the next measurement
            self._vectors.pop(k, None)
        if converged:
            if k in self._since_failure:
                self._since_failure[k] += 1
        else:
            self._since_failure[k] = 0


def measure_lambda_max(
    model: Any,
    loss_fn: Callable[..., Any],
    batch: Any,
    *,
    params: Sequence[Any] | None = None,
    mode: str = "exact",
    max_iter: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    parallel: Any = None,
    optimizer: Any = None,
    grad_fn: Callable[[], Any] | None = None,
    warm: WarmStart | None = None,
    basis: BasisMode = "auto",
    vectors: str = "device",
    batch_split: int = 1,
) -> Estimate:
    """Top Hessian eigenvalue of ``loss_fn(model, batch)`` by Lanczos; collective over the job's ranks.

    ``params`` restricts the Hessian to a subset (one param group); ``parallel`` is the job's
    :class:`~lrscale_megatron.parallel.ParallelContext` (``None``: :func:`resolve_context`). With
    ``optimizer`` the Adam-preconditioned operator is measured; an optimizer without a usable second
    moment (no step taken yet) gives ``converged=False`` with the reason, never a number. ``grad_fn``
    (``mode="fd"`` only) computes gradients through the host's own step, e.g.
    :func:`~lrscale_megatron.integrations.megatron_schedule.schedule_grad_fn`. With ``warm`` the solver
    starts from the previous converged Ritz vector of ``params`` (:class:`WarmStart`) and stores this one's;
    a cold fd start (``fd_scheme="forward"``, the default) is ``g/||g|| + r/||r||`` with ``g`` the gradient the
    fd product computes anyway, in the operator's coordinates
    (:func:`~lrscale_megatron.curvature.start.gradient_start`: 3 instead of 4-5 Lanczos iterations to 1 %
    on the 834k GPT of ``benchmarks/curvature_vs_pyhessian.py``).
    ``basis``: where the Lanczos basis lives (``OnlineConfig.basis``); ``vectors``, ``batch_split``: where
    the solver's vectors live and in how many parts the batch is evaluated (``OnlineConfig``).
    """
    from lrscale_megatron.curvature import HessianOperator, lanczos
    from lrscale_megatron.parallel import resolve_context

    ctx = parallel if parallel is not None else resolve_context(model)
    kwargs: dict[str, Any] = {} if grad_fn is None else {"grad_fn": grad_fn}
    op: Any = HessianOperator(
        model,
        loss_fn,
        batch,
        mode=mode,
        params=None if params is None else list(params),
        parallel=ctx,
        vectors=vectors,
        batch_split=batch_split,
        **kwargs,
    )
    if optimizer is not None:
        from lrscale_megatron.curvature.preconditioned import FD_STEP_FACTOR

        op.fd_eps *= FD_STEP_FACTOR  # a smaller fd step for the uneven preconditioned geometry
        try:
            op = preconditioned_operator(op, optimizer)
        except MomentsUnavailable as e:
            return Estimate(lambda_max=math.nan, converged=False, reason=f"no Adam preconditioner: {e}")
    want = warm is not None and warm.wants_vector(params)
    # the start vector is passed as a recipe: lanczos makes it when it starts and again for its second
    # pass (the fallback when the host has no room), so no start vector stays alive during the products
    res = lanczos(
        op,
        k=1,
        max_iter=max_iter,
        tol=tol,
        seed=seed,
        v0=lambda: _start_vector(op, warm, params, seed),
        return_vectors=want,
        basis=basis,
    )
    if warm is not None:
        warm.record(params, bool(res.converged), res.eigenvectors[0] if res.eigenvectors else None)
    lam = float(res.eigenvalues[0]) if len(res.eigenvalues) else math.nan
    return Estimate(
        lambda_max=lam,
        converged=bool(res.converged),
        reason=res.reason,
        n_matvec=int(res.n_matvec),
        residual=float(res.residuals[0]) if len(res.residuals) else math.nan,
    )


def _start_vector(op: Any, warm: WarmStart | None, params: Sequence[Any] | None, seed: int) -> Any:
    """The warm start if there is one, else the gradient-informed cold start (fd forward: ``g/||g|| +
    r/||r||``, :mod:`~lrscale_megatron.curvature.start`), else ``None`` (random)."""
    v0 = None if warm is None else warm.start(op.backend, params, seed)
    if v0 is None:
        from lrscale_megatron.curvature.start import gradient_start

        v0 = gradient_start(op, seed)[0]  # None (a random start) for exact / jvp / central fd
    return v0


def curvature_estimator(
    model: Any,
    loss_fn: Callable[..., Any],
    batch: Any,
    online: OnlineConfig,
    *,
    sync: bool = True,
    parallel: Any = None,
    optimizer: Any = None,
    engine: Any = None,
    grad_fn: Callable[[], Any] | None = None,
    check: bool = True,
    reserve_bytes: int = 0,
    warm: WarmStart | None = None,
) -> Estimator:
    """The estimator a scheduler attaches: :func:`measure_lambda_max` with the online settings.

    Preconditioned by ``optimizer`` (or ``engine``'s optimizer) when ``online.precondition``. With
    ``check`` (default) :func:`preflight` runs now and raises :class:`MeasurementRefused` for a
    setting that cannot be measured or a measurement that will not fit (``reserve_bytes``: device
    memory to keep for the training step's activations). With ``sync`` rank 0's estimate is broadcast
    so every rank applies the same LR. With ``online.warm_start`` each measurement starts from the
    previous one's Ritz vector (``warm``: a store to share with another estimator; default: a new one).
    """
    opt = optimizer if optimizer is not None else (getattr(engine, "optimizer", None) if engine else None)
    if online.warm_start and warm is None:
        warm = WarmStart()
    store = warm if online.warm_start else None
    vectors: str = "device" if online.vectors == "auto" else online.vectors  # unchecked: no memory plan
    if check:
        mem = preflight(
            model, opt, online, engine=engine, parallel=parallel, batch=batch, reserve_bytes=reserve_bytes
        )
        vectors = mem.vectors  # online.vectors="auto" resolved against the free memory
        logger.info("lrscale: online measurement attached; %s, vectors=%s", mem.render(), vectors)

    def estimator(params: Sequence[Any] | None) -> Estimate:
        return measure_lambda_max(
            model,
            loss_fn,
            batch,
            params=params,
            mode=online.hvp,
            max_iter=online.max_iter,
            tol=online.tol,
            seed=online.seed,
            parallel=parallel,
            optimizer=opt if online.precondition else None,
            grad_fn=grad_fn,
            warm=store,
            basis=online.basis,
            vectors=vectors,
            batch_split=online.batch_split,
        )

    out = _broadcast_from_rank0(estimator) if sync else estimator
    out.online = online.model_copy(update={"vectors": vectors})  # type: ignore[attr-defined]  # as resolved
    return out


def online_estimators(
    model: Any,
    loss_fn: Callable[..., Any],
    batch: Any,
    online: OnlineConfig,
    warmup_steps: int,
    **kwargs: Any,
) -> tuple[Estimator, Estimator | None]:
    """:func:`curvature_estimator` for the schedule's measurements, and a cheaper one (``online.warmup_tol``,
    preflight not repeated) for its measurements during warmup, or ``None`` when warmup has none or
    measures at the same tolerance. ``kwargs`` go to both (``sync``, ``parallel``, ``optimizer``, ...)."""
    warm = kwargs.pop("warm", None) or WarmStart()  # both estimators continue from the same vectors
    estimator = curvature_estimator(model, loss_fn, batch, online, warm=warm, **kwargs)
    if not (online.warmup_checks and online.warmup_tol != online.tol and warmup_steps > 0):
        return estimator, None
    resolved = getattr(estimator, "online", online)  # online.vectors="auto" as the first one resolved it
    cheap = resolved.model_copy(update={"tol": online.warmup_tol})  # same settings, looser tolerance
    kw = {**kwargs, "check": False, "warm": warm}
    return estimator, curvature_estimator(model, loss_fn, batch, cheap, **kw)


def _broadcast_from_rank0(estimator: Estimator) -> Estimator:
    def synced(params: Sequence[Any] | None) -> Estimate:
        import torch.distributed as dist

        est = estimator(params)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box: list[Any] = [est]
            dist.broadcast_object_list(box, src=0)
            est = box[0]
        return est

    return synced
