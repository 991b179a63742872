"""Hessian-vector products of a training loss, and the operators built on them.

:class:`HessianOperator` applies the Hessian of ``loss_fn(model, batch)`` (averaged over a fixed list of
micro-batches and over data-parallel replicas) to a per-parameter vector, in one of three modes:

* ``"exact"`` -- double backward (Pearlmutter 1994): ``Hv = ∂⟨∇L, v⟩/∂θ``. Under pipeline parallelism,
  stage-wise double backward with the tangent sent between stages (:mod:`.pipeline`). Megatron
  tensor-parallel layers are made twice differentiable around each product by
  :func:`lrscale_megatron.integrations.megatron_tp.twice_differentiable_tp` (unpatched they give a
  silently wrong answer).
* ``"fd"`` -- finite differences of gradients: ``forward`` scheme ``(∇L(θ+hv) - ∇L(θ))/h`` reuses a
  cached base gradient, so one product costs one gradient; ``central`` scheme
  ``(∇L(θ+hv) - ∇L(θ-hv))/2h`` costs two and is O(h²) accurate. The step is
  ``h = c·max(1, ||θ||)/||v||`` with ``c = 0.1·sqrt(u)`` (forward) or ``0.1·u^(1/3)`` (central), ``u``
  the unit roundoff of the parameter dtype. The textbook constants (without the 0.1) assume unit
  curvature scales; on a trained float32 GPT they gave a 1 % bias (forward) and, for central
  differences, Lanczos vectors concentrated on a few coordinates drove the Rayleigh quotient from 10.8
  to 292 (docs/benchmarks.md). The cached base gradient is recomputed when a parameter changed in
  place since it was taken (``Tensor._version``). Gradients come from autograd, from the stage-wise pipeline pass, or
  from a user ``grad_fn`` (for example megatron's pipeline schedule).
* ``"jvp"`` -- forward-over-reverse with ``torch.func.jvp(grad(L))``; plain PyTorch models only
  (megatron's custom autograd Functions have no forward-mode rule).

Vectors are lists of per-parameter tensors in float32 (float64 for float64 models), so bf16/fp16
models accumulate products in fp32. :class:`PreconditionedOperator` gives Adam's
``P^-1/2 H P^-1/2`` with ``P = diag(sqrt(v̂) + eps)`` from the optimizer's bias-corrected second moment
(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lrscale_megatron.curvature.backend import Vector, VectorBackend

if TYPE_CHECKING:
    from lrscale_megatron.parallel import ParallelContext

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
GradFn = Callable[[], "tuple[float, list[torch.Tensor]]"]
MODES = ("exact", "fd", "jvp")
FD_SCHEMES = ("forward", "central")


def _is_microbatch_list(batch: Any) -> bool:
    return isinstance(batch, list) and len(batch) > 0 and not isinstance(batch[0], (int, float))


class HessianOperator:
    """The Hessian of a loss over a fixed batch, applied to per-parameter vectors.

    Args:
        model: the module (this pipeline stage's module under PP).
        loss_fn: ``loss_fn(model, batch) -> loss``. Under pipeline parallelism it returns this stage's
            output instead (the loss on the last stage, the output activation elsewhere); the operator
            feeds the received activation through ``model.set_input_tensor`` (megatron convention)
            or ``input_setter``.
        batch: one batch, or a ``list`` of micro-batches (the loss is their mean).
        mode: ``"exact"`` | ``"fd"`` | ``"jvp"`` (see module docstring).
        params: parameters to differentiate with respect to (a restriction of H to that block, e.g. a
            layer): ``None`` for all parameters with ``requires_grad``, or a sequence of names or
            parameter tensors.
        parallel: the job's :class:`~lrscale_megatron.parallel.ParallelContext` (default single process).
        fd_scheme: ``"forward"`` (cached base gradient) or ``"central"``.
        fd_eps: override the finite-difference constant ``c`` (see module docstring).
        grad_fn: ``grad_fn() -> (loss, grads)`` computing this rank's gradients of its whole local batch
            at the current parameters (only for ``mode="fd"``), e.g. through megatron's pipeline schedule
            (:func:`lrscale_megatron.integrations.megatron_schedule.schedule_grad_fn`). The operator
            sums tied-embedding halves and averages over data-parallel ranks.
        megatron_tp_patch: make megatron TP layers twice differentiable around exact products (default).
            Turning it off gives wrong exact products; it exists to show that.
        math_sdpa: run scaled-dot-product attention with the math kernel during products (the fused
            CPU kernels have no double backward / forward-mode rule).
        input_setter: ``input_setter(model, tensor)`` for pipeline stages that are not megatron modules.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batch: Any,
        mode: str = "exact",
        params: Sequence[str] | Sequence[torch.Tensor] | None = None,
        parallel: ParallelContext | None = None,
        fd_scheme: str = "forward",
        fd_eps: float | None = None,
        grad_fn: GradFn | None = None,
        megatron_tp_patch: bool = True,
        math_sdpa: bool = True,
        input_setter: Callable[[torch.nn.Module, torch.Tensor | None], None] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"HessianOperator mode={mode!r} is not one of {MODES}")
        if fd_scheme not in FD_SCHEMES:
            raise ValueError(f"HessianOperator fd_scheme={fd_scheme!r} is not one of {FD_SCHEMES}")
        if fd_eps is not None and not (fd_eps > 0 and math.isfinite(fd_eps)):
            raise ValueError(f"HessianOperator fd_eps={fd_eps!r} must be a positive finite number")
        if grad_fn is not None and mode != "fd":
            raise ValueError(f"grad_fn is only used with mode='fd' (got mode={mode!r})")
        self.model = model
        self.loss_fn = loss_fn
        self.microbatches = list(batch) if _is_microbatch_list(batch) else [batch]
        self.mode = mode
        if parallel is None:
            from lrscale_megatron.parallel import ParallelContext

            parallel = ParallelContext.single()
        self.parallel = parallel
        self.fd_scheme = fd_scheme
        self.grad_fn = grad_fn
        self.math_sdpa = math_sdpa
        self.input_setter = input_setter
        self.named_params = self._select_params(params)
        self.params = [p for _, p in self.named_params]
        if not self.params:
            raise ValueError("HessianOperator has no parameters: params selected none with requires_grad")
        pdtype = self.params[0].dtype
        vdtype = torch.float64 if pdtype == torch.float64 else torch.float32
        self.backend: VectorBackend = self.parallel.backend(self.named_params, vdtype, self.params[0].device)
        self._tied = self.parallel.tied_embedding_indices(self.named_params)
        eps_dtype = pdtype if pdtype in (torch.float32, torch.float64) else torch.float32
        u = torch.finfo(eps_dtype).eps / 2
        self.fd_eps = (
            fd_eps if fd_eps is not None else 0.1 * (math.sqrt(u) if fd_scheme == "forward" else u ** (1 / 3))
        )
        from lrscale_megatron.integrations import megatron_tp

        self._has_tp_layers = megatron_tp.model_has_megatron_tp_layers(model)
        self.megatron_tp_patch = megatron_tp_patch and self._has_tp_layers
        if mode == "jvp" and self._has_tp_layers:
            raise ValueError(
                "mode='jvp' is not supported on megatron-core models: their custom autograd Functions "
                "have no forward-mode rule (torch.func); use mode='exact' (double backward) or mode='fd'"
            )
        if mode == "jvp" and self.parallel.pp_size > 1:
            raise ValueError("mode='jvp' does not support pipeline parallelism; use mode='exact' or 'fd'")
        if self._has_tp_layers and not megatron_tp_patch and mode == "exact":
            logger.warning(
                "megatron TP layers without the twice-differentiable patch: exact "
                "Hessian-vector products will be WRONG (megatron_tp_patch=False)"
            )
        self.n_matvec = 0
        self.n_grad = 0
        self._base: tuple[float, list[torch.Tensor]] | None = None
        self._base_version: int | None = None
        self.last_loss: float | None = None

    # ------------------------------------------------------------------ parameter selection
    def _select_params(self, params) -> list[tuple[str, torch.Tensor]]:
        named: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in self.model.named_parameters() if p.requires_grad
        ]
        if params is None:
            return named
        params = list(params)
        if all(isinstance(x, str) for x in params):
            wanted = set(params)
            known = {n for n, _ in named}
            missing = sorted(wanted - known)
            if missing:
                raise ValueError(
                    f"HessianOperator params: no trainable parameter named {missing[:5]}; "
                    f"known names start with {sorted(known)[:5]}"
                )
            return [(n, p) for n, p in named if n in wanted]
        ids = {id(p) for p in params}
        return [(n, p) for n, p in named if id(p) in ids]

    # ------------------------------------------------------------------ context for every product
    @contextlib.contextmanager
    def _autodiff_context(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.megatron_tp_patch:
                from lrscale_megatron.integrations.megatron_tp import twice_differentiable_tp

                stack.enter_context(twice_differentiable_tp())
            if self.math_sdpa:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield

    def _stage_fn(self, batch: Any, inp: torch.Tensor | None) -> torch.Tensor:
        if self.parallel.pp_size > 1:
            if self.input_setter is not None:
                self.input_setter(self.model, inp)
            else:
                _megatron_set_input(self.model, inp)
        out = self.loss_fn(self.model, batch)
        if self.parallel.is_last_stage and out.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar loss on the last stage; got shape {tuple(out.shape)}"
            )
        return out

    def _to_vec(self, ts: Sequence[torch.Tensor]) -> Vector:
        return [t.detach().to(self.backend.dtype) for t in ts]

    def _finish(self, acc: list[torch.Tensor]) -> Vector:
        """Sum tied-embedding halves over pipeline stages, then average over data-parallel replicas."""
        self.parallel.sum_tied_embeddings(acc, self._tied)
        self.parallel.average_data_parallel(acc)
        return acc

    def _cast_param(self, v: Vector) -> list[torch.Tensor]:
        return [vi.to(p.dtype) for vi, p in zip(v, self.params)]

    # ------------------------------------------------------------------ gradients
    def loss_and_grad(self) -> tuple[float, Vector]:
        """Mean loss (NaN on non-last pipeline stages) and the gradient at the current parameters."""
        self.n_grad += 1
        if self.grad_fn is not None:
            loss, g = self.grad_fn()
            self.last_loss = loss
            return loss, self._finish(self._to_vec(g))
        n = len(self.microbatches)
        acc = self.backend.zeros()
        total = 0.0
        for mb in self.microbatches:
            if self.parallel.pp_size > 1:
                from lrscale_megatron.curvature.pipeline import pipeline_loss_and_grad

                loss, g = pipeline_loss_and_grad(self.parallel, self._stage_fn, mb, self.params)
            else:
                out = self._stage_fn(mb, None)
                loss = float(out.detach())
                g_raw = torch.autograd.grad(out, self.params, allow_unused=True)
                g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g_raw, self.params)]
            total += loss / n
            for a, gi in zip(acc, g):
                a.add_(gi.detach().to(a.dtype), alpha=1.0 / n)
        self.last_loss = total
        return total, self._finish(acc)

    # ------------------------------------------------------------------ products
    def matvec(self, v: Vector) -> Vector:
        """H v (this rank's shards), averaged over micro-batches and data-parallel replicas."""
        self.n_matvec += 1
        with self._autodiff_context():
            if self.mode == "exact":
                return self._hvp_exact(v)
            if self.mode == "fd":
                return self._hvp_fd(v)
            return self._hvp_jvp(v)

    __call__ = matvec

    def _hvp_exact(self, v: Vector) -> Vector:
        vp = self._cast_param(v)
        n = len(self.microbatches)
        acc = self.backend.zeros()
        total = 0.0
        for mb in self.microbatches:
            if self.parallel.pp_size > 1:
                from lrscale_megatron.curvature.pipeline import pipeline_hvp

                loss, hv = pipeline_hvp(self.parallel, self._stage_fn, mb, self.params, vp)
            else:
                out = self._stage_fn(mb, None)
                loss = float(out.detach())
                g = torch.autograd.grad(out, self.params, create_graph=True, allow_unused=True)
                pairs = [(gi, vi) for gi, vi in zip(g, vp) if gi is not None and gi.requires_grad]
                hv_raw: Sequence[torch.Tensor | None] = [None] * len(self.params)
                if pairs:
                    hv_raw = torch.autograd.grad(
                        [gi for gi, _ in pairs],
                        self.params,
                        grad_outputs=[vi for _, vi in pairs],
                        allow_unused=True,
                    )
                hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv_raw, self.params)]
            total += loss / n
            for a, h in zip(acc, hv):
                a.add_(h.detach().to(a.dtype), alpha=1.0 / n)
        self.last_loss = total
        return self._finish(acc)

    def _hvp_fd(self, v: Vector) -> Vector:
        vnorm = self.backend.norm(v)
        if not math.isfinite(vnorm):
            return [torch.full_like(x, float("nan")) for x in v]
        if vnorm == 0.0:
            return self.backend.zeros()
        theta_norm = math.sqrt(
            max(self.backend.dot(self._to_vec(self.params), self._to_vec(self.params)), 0.0)
        )
        h = self.fd_eps * max(1.0, theta_norm) / vnorm
        if self.fd_scheme == "forward":
            if self._base is None or self._base_version != self._params_version():
                self._base = self.loss_and_grad()
                self._base_version = self._params_version()
            g0 = self._base[1]
            gp = self._grad_at(v, h)
            self._base_version = self._params_version()  # the perturbation was undone exactly
            return [(a - b) / h for a, b in zip(gp, g0)]
        gp = self._grad_at(v, h)
        gm = self._grad_at(v, -h)
        return [(a - b) / (2 * h) for a, b in zip(gp, gm)]

    def _params_version(self) -> int:
        """Changes whenever any parameter is modified in place (optimizer steps, load_state_dict)."""
        return sum(p._version for p in self.params)

    def _grad_at(self, v: Vector, h: float) -> Vector:
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, vi in zip(self.params, v):
                    p.add_(vi.to(p.dtype), alpha=h)
            _, g = self.loss_and_grad()
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
        return g

    def _hvp_jvp(self, v: Vector) -> Vector:
        from torch.func import functional_call, grad, jvp

        names = [n for n, _ in self.named_params]
        primals = {n: p.detach() for n, p in self.named_params}
        tangents = {n: vi.to(p.dtype) for (n, p), vi in zip(self.named_params, v)}
        n_mb = len(self.microbatches)
        acc = self.backend.zeros()
        for mb in self.microbatches:

            def loss_of(pdict, mb=mb):
                fmodel: Any = _FunctionalModel(self.model, pdict, functional_call)
                return self.loss_fn(fmodel, mb)

            hv = jvp(grad(loss_of), (primals,), (tangents,))[1]
            for a, n in zip(acc, names):
                a.add_(hv[n].detach().to(a.dtype), alpha=1.0 / n_mb)
        return self._finish(acc)

    # ------------------------------------------------------------------ helpers
    def restrict(self, params: Sequence[str] | Sequence[torch.Tensor]) -> HessianOperator:
        """The same loss and batch, restricted to a block of parameters (e.g. one layer)."""
        return HessianOperator(
            self.model,
            self.loss_fn,
            self.microbatches,
            mode=self.mode,
            params=params,
            parallel=self.parallel,
            fd_scheme=self.fd_scheme,
            fd_eps=self.fd_eps,
            megatron_tp_patch=self.megatron_tp_patch or not self._has_tp_layers,
            math_sdpa=self.math_sdpa,
            input_setter=self.input_setter,
        )

    @property
    def dim(self) -> int:
        return self.backend.dim


class _FunctionalModel:
    """Calls ``model`` with substituted parameters (``torch.func.functional_call``) so that a
    ``loss_fn(model, batch)`` written for the module works unchanged under ``torch.func`` transforms."""

    def __init__(self, model: torch.nn.Module, pdict: dict, functional_call) -> None:
        self._model, self._pdict, self._call = model, pdict, functional_call

    def __call__(self, *args, **kwargs):
        return self._call(self._model, self._pdict, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _megatron_set_input(model: torch.nn.Module, inp: torch.Tensor | None) -> None:
    m: Any = model
    while not hasattr(m, "set_input_tensor") and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, "set_input_tensor"):
        raise ValueError(
            "pipeline-parallel HessianOperator needs model.set_input_tensor (megatron) or "
            "an input_setter=fn(model, tensor)"
        )
    m.set_input_tensor(inp)


class PreconditionedOperator:
    """Adam-preconditioned Hessian ``P^-1/2 H P^-1/2`` with ``P = diag(sqrt(v̂) + eps)``.

    ``v̂ = exp_avg_sq / (1 - beta2^step)`` is the optimizer's bias-corrected second moment. Its top
    eigenvalue is the "preconditioned sharpness" whose stability threshold under Adam with momentum
    ``beta1`` is ``(2 + 2 beta1) / ((1 - beta1) lr)`` (Cohen et al. 2022).

    Args:
        op: the Hessian operator.
        second_moments: per-parameter ``v̂`` tensors (already bias-corrected), in ``op``'s order; or use
            :meth:`from_optimizer`.
        eps: Adam's epsilon.
    """

    def __init__(
        self, op: HessianOperator, second_moments: Sequence[torch.Tensor], eps: float = 1e-8
    ) -> None:
        if len(second_moments) != len(op.params):
            raise ValueError(
                f"second_moments has {len(second_moments)} tensors, operator has {len(op.params)}"
            )
        self.op = op
        self.backend = op.backend
        self.scale = [
            (torch.sqrt(v.detach().to(op.backend.dtype).clamp_min(0)) + eps).rsqrt() for v in second_moments
        ]
        self.n_matvec = 0

    @classmethod
    def from_optimizer(cls, op: HessianOperator, optimizer: torch.optim.Optimizer) -> PreconditionedOperator:
        """Read ``exp_avg_sq``, ``step``, ``betas`` and ``eps`` from a torch Adam/AdamW optimizer."""
        vs: list[torch.Tensor] = []
        eps = None
        for p in op.params:
            group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
            if group is None:
                raise ValueError("a parameter of the operator is not in the optimizer's param_groups")
            if "betas" not in group:
                raise ValueError(
                    f"optimizer {type(optimizer).__name__} has no 'betas': only Adam-type "
                    "optimizers have the second moment needed for preconditioning"
                )
            eps = group.get("eps", 1e-8)
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                raise ValueError(
                    "optimizer has no exp_avg_sq for a parameter yet: take at least one "
                    "optimizer step before measuring the preconditioned spectrum"
                )
            step = float(st["step"])
            beta2 = group["betas"][1]
            vs.append(st["exp_avg_sq"] / (1 - beta2**step))
        return cls(op, vs, eps=float(eps if eps is not None else 1e-8))

    def matvec(self, v: Vector) -> Vector:
        self.n_matvec += 1
        w = self.op.matvec([vi * s for vi, s in zip(v, self.scale)])
        return [wi * s for wi, s in zip(w, self.scale)]

    __call__ = matvec
