"""Hessian-vector products of a training loss, and the operators built on them.

:class:`HessianOperator` applies the Hessian of ``loss_fn(model, batch)`` (averaged over a fixed list of
micro-batches and over data-parallel replicas) to a per-parameter vector, in one of three modes:

* ``"exact"`` -- double backward (Pearlmutter 1994): ``Hv = ∂⟨∇L, v⟩/∂θ``. The first gradient is taken
  once with ``create_graph=True`` and its graph is reused by every product (as PyHessian does), so a
  product costs one backward through that graph (``reuse_graph``; re-taken when a parameter changes).
  Under pipeline parallelism: stage-wise double backward with the tangent sent between stages
  (:mod:`.pipeline`). A backward autograd cannot differentiate again (fused kernels, no-grad or
  ``once_differentiable`` backward) is refused, pointing to ``"fd"`` (:mod:`.autodiff`). Layers that
  need a patch to be twice differentiable (megatron TP) get it from the :class:`ParallelContext`
  (``ctx.autodiff_patch(model)``), around exact products only.
* ``"fd"`` -- finite differences of gradients: ``forward`` scheme ``(∇L(θ+hv) - ∇L(θ))/h`` reuses a
  cached base gradient (one gradient per product); ``central`` ``(∇L(θ+hv) - ∇L(θ-hv))/2h`` costs two
  and is O(h²). ``h = c·max(1, ||θ||)/||v||`` with ``c = 0.1·sqrt(u)`` (forward) or ``0.1·u^(1/3)``
  (central), ``u`` the float32 (float64 for float64 models) unit roundoff, rounded to the nearest power
  of two (``h v`` and ``1/h`` exact; the backward is seeded with ``1/h``, so the difference of
  gradients is one pass): the loss at ``θ+hv`` is
  evaluated on tensors the operator owns (:func:`.evaluation.substituted`), in float32 for bfloat16 /
  float16 parameters, so the perturbation is not rounded away (in bf16, 1,583 of 28,032 parameters
  moved and lambda was 30.6 for 11.47). No double backward: fd never enables the TP patch. With a user
  ``grad_fn`` (e.g. megatron's pipeline schedule) and for float32/float64 parameters, the parameters are
  perturbed in place and restored bit for bit. ``fd_restore="auto"`` (the default): inside a solve
  whose device has room for one parameter-sized vector (``lanczos`` with the host basis lends it,
  :meth:`HessianOperator.allow_anchor`, and takes it back when the solve ends), from the **anchor**, one
  copy of the parameters taken once per solve (:mod:`.anchor`: write ``θ0 + h v``, one pass a product;
  ``θ0`` is copied back lazily, before anything else evaluates or reads the parameters and when the
  solve ends or raises); otherwise by subtracting ``h v`` again, checked before perturbing
  (:mod:`.perturb`; no parameter copy). ``"subtract"`` always subtracts; ``"copy"`` copies the
  parameters in every product. bfloat16/float16 parameters are refused with a ``grad_fn``.
* ``"jvp"`` -- forward-over-reverse with ``torch.func.jvp(grad(L))``; plain PyTorch models only.

``vectors="host"`` (fd, bf16/fp16) keeps the solver's vectors in host memory, ``batch_split=n`` evaluates
a micro-batch in ``n`` parts: the device holds the fp32 substitutes and one part's fp32 fwd+bwd only. Every
evaluation of the loss is deterministic: dropout off, random generators fixed and restored
(:func:`.evaluation.deterministic_loss`). Vectors are float32 (float64 for float64 models) per-parameter
tensors. :class:`PreconditionedOperator` gives Adam's ``P^-1/2 H P^-1/2`` with ``P = diag(sqrt(v̂) +
eps)`` (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_map

from lrscale_megatron.curvature import hostvectors
from lrscale_megatron.curvature.anchor import AnchorLoan
from lrscale_megatron.curvature.backend import Vector, VectorBackend
from lrscale_megatron.curvature.batchsplit import accumulated_grads, microbatches
from lrscale_megatron.curvature.blocks import select_params
from lrscale_megatron.curvature.evaluation import (
    LOW_PRECISION,
    deterministic_loss,
    math_sdpa,
    megatron_set_input,
    substituted,
    upcast_rest,
)
from lrscale_megatron.curvature.operator_args import FD_RESTORE, FD_SCHEMES, MODES, check_args  # noqa: F401
from lrscale_megatron.curvature.preconditioned import PreconditionedOperator  # noqa: F401  (re-export)
from lrscale_megatron.curvature.solve_scope import DIRTY, settle_all

if TYPE_CHECKING:
    from lrscale_megatron.parallel import ParallelContext

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
GradFn = Callable[[], "tuple[float, list[torch.Tensor]]"]


class HessianOperator(AnchorLoan):
    """The Hessian of a loss over a fixed batch, applied to per-parameter vectors.

    Args:
        model: the module (this pipeline stage's module under PP).
        loss_fn: ``loss_fn(model, batch) -> loss`` (under PP: this stage's output; the received
            activation is fed through ``model.set_input_tensor`` or ``input_setter``).
        batch: one batch, or a ``list`` of micro-batches (the loss is their mean).
        mode: ``"exact"`` | ``"fd"`` | ``"jvp"`` (module docstring).
        params: parameters to differentiate (a block of H): ``None`` for all with ``requires_grad``, or
            names / parameter tensors.
        parallel: the job's :class:`~lrscale_megatron.parallel.ParallelContext` (default single process).
        fd_scheme: ``"forward"`` (cached base gradient) or ``"central"``.
        fd_eps: override the finite-difference constant ``c``.
        grad_fn: ``grad_fn() -> (loss, grads)`` of this rank's whole local batch at the current
            parameters (``mode="fd"`` only), e.g. megatron's pipeline schedule.
        megatron_tp_patch: use the context's twice-differentiable patch for exact products (default).
        math_sdpa: scaled-dot-product attention with the math kernel during products.
        input_setter: ``input_setter(model, tensor)`` for pipeline stages that are not megatron modules.
        eval_mode: evaluate the loss with the model in ``eval()`` mode (dropout off). ``False`` keeps
            the training mode; the random generators are fixed per evaluation either way.
        reuse_graph: exact mode: keep the first gradient's graph across products. Default: when there
            is one micro-batch and no pipeline parallelism (memory: one graph per micro-batch).
        fd_restore: how fd mode puts float32/float64 parameters back after evaluating at ``θ + h v``:
            ``"auto"`` (default): from the anchor (:mod:`.anchor`: one copy of the parameters for a solve,
            one pass a product, θ0 copied back lazily) while a solver has said the device has room for it
            (:meth:`allow_anchor`; ``lanczos`` with the host basis: 3 vectors on the device), else as
            ``"subtract"``; ``"subtract"`` subtracts ``h v`` again, exact by a check made before
            perturbing (:mod:`.perturb`; no parameter copy: the second-pass measurement stays within 4
            vectors); ``"copy"`` copies the parameters in every product (one more vector).
        vectors: ``"device"`` (default) or ``"host"``: the solver's vectors (``q``, products, the base
            gradient) in host memory, page-locked on CUDA (fd, bf16/fp16 parameters; :mod:`.hostvectors`).
        batch_split: evaluate each micro-batch in this many equal parts along dim 0 (:mod:`.batchsplit`;
            not with a ``grad_fn``).
    """

    returns_new_tensors = True

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
        eval_mode: bool = True,
        reuse_graph: bool | None = None,
        fd_restore: str = "auto",
        vectors: str = "device",
        batch_split: int = 1,
    ) -> None:
        check_args(mode, fd_scheme, fd_eps, fd_restore, grad_fn, batch_split)
        self.fd_restore = fd_restore
        self.model = model
        self.loss_fn = loss_fn
        self.microbatches = microbatches(batch, batch_split)
        self.mode = mode
        if parallel is None:
            from lrscale_megatron.parallel import ParallelContext

            parallel = ParallelContext.single()
        self.parallel = parallel
        self.fd_scheme = fd_scheme
        self.grad_fn = grad_fn
        self.math_sdpa = math_sdpa
        self.input_setter = input_setter
        self.eval_mode = eval_mode
        self.named_params = select_params(self.model, params, "HessianOperator")
        self.params = [p for _, p in self.named_params]
        if not self.params:
            raise ValueError("HessianOperator has no parameters: params selected none with requires_grad")
        pdtype = self.params[0].dtype
        self.upcast = pdtype in LOW_PRECISION
        if self.upcast and grad_fn is not None:
            raise ValueError(
                f"HessianOperator(mode='fd', grad_fn=...) with {pdtype} parameters: a grad_fn computes "
                f"gradients at the model's own {pdtype} weights, where the step h*v rounds away; pass "
                "grad_fn=None (the operator then evaluates the loss at float32 copies) or measure on a "
                "float32 model"
            )
        vdtype = torch.float64 if pdtype == torch.float64 else torch.float32
        self.backend: VectorBackend = self.parallel.backend(self.named_params, vdtype, self.params[0].device)
        hostvectors.place(self, vectors)  # checked; vectors="host": the backend keeps them in host memory
        self._tied = self.parallel.tied_embedding_indices(self.named_params)
        u = torch.finfo(vdtype).eps / 2
        self.fd_eps = (
            fd_eps if fd_eps is not None else 0.1 * (math.sqrt(u) if fd_scheme == "forward" else u ** (1 / 3))
        )
        patch = self.parallel.autodiff_patch(model)
        self._has_tp_layers = patch is not None
        self._tp_patch = patch if (megatron_tp_patch and mode == "exact") else None
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
        if reuse_graph is None:
            reuse_graph = self.parallel.pp_size == 1 and len(self.microbatches) == 1
        self.reuse_graph = reuse_graph and self.parallel.pp_size == 1
        self.n_matvec = 0
        self.n_grad = 0
        self._base: tuple[float, list[torch.Tensor]] | None = None
        self._base_version: int | None = None
        self._theta_norm: tuple[int, float] | None = None
        self._anchor_room, self._anchor = False, None  # room lent by a solver (allow_anchor); the fd anchor
        self._graph: tuple[int, list[tuple[float, list[torch.Tensor | None]]], list[torch.Tensor]] | None
        self._graph = None
        self.last_loss: float | None = None

    # ------------------------------------------------------------------ evaluation context
    @contextlib.contextmanager
    def _evaluation(self, leaves: list[torch.Tensor] | None = None) -> Iterator[None]:
        """Deterministic loss, the TP patch (exact only), the math SDPA kernel, and (``leaves``) the
        operator's own tensors in place of the selected parameters (float32 copies of the others when
        upcasting)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(deterministic_loss(self.model, self.eval_mode))
            if self._tp_patch is not None:
                stack.enter_context(self._tp_patch())
            if self.math_sdpa:
                stack.enter_context(math_sdpa())
            if leaves is not None:
                names = [n for n, _ in self.named_params]
                pdict = upcast_rest(self.model, set(names)) if self.upcast else {}
                pdict.update(zip(names, leaves))
                stack.enter_context(substituted(self.model, pdict))
            yield

    def _leaves(self, v: Vector | None = None, h: float = 0.0) -> list[torch.Tensor] | None:
        """Leaf tensors ``θ + h v`` (float32 when upcasting); ``None`` = the parameters themselves."""
        if v is None and not self.upcast:
            return None
        out = []
        for i, p in enumerate(self.params):
            t = p.detach()
            if self.upcast:
                t = t.float()
                if v is not None:
                    t.add_(v[i], alpha=h)
            elif v is not None:
                t = torch.add(t, v[i].to(t.dtype), alpha=h)
            out.append(t.requires_grad_(True))
        return out

    def _stage_fn(self, batch: Any, inp: torch.Tensor | None) -> torch.Tensor:
        if self.parallel.pp_size > 1:
            if self.input_setter is not None:
                self.input_setter(self.model, inp)
            else:
                megatron_set_input(self.model, inp)
        if self.upcast:  # float32 evaluation: bf16/fp16 floating inputs follow the parameters
            batch = tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW_PRECISION else t, batch
            )
        out = self.loss_fn(self.model, batch)
        if self.parallel.is_last_stage and out.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar loss on the last stage; got shape {tuple(out.shape)}"
            )
        return out

    def _finish(self, acc: list[torch.Tensor]) -> Vector:
        """Sum tied-embedding halves over pipeline stages, then average over data-parallel replicas."""
        self.parallel.sum_tied_embeddings(acc, self._tied)
        self.parallel.average_data_parallel(acc)
        return acc

    def _accumulate(
        self, acc: list[torch.Tensor] | None, ts: Sequence[torch.Tensor | None], n: int, fresh: bool = True
    ) -> list[torch.Tensor]:
        """``acc += ts / n`` in the vector dtype. The first call adopts ``ts`` when they are ``fresh`` (new
        autograd outputs; contiguous ones each once, also views such as a reshape): no extra buffer."""
        w, dtype = 1.0 / n, self.backend.dtype
        if acc is None:
            out: list[torch.Tensor] = []
            seen: set[int] = set()  # autograd may return one tensor for two inputs (both sides of an add)
            for t, p in zip(ts, self.params):
                if t is None:
                    out.append(torch.zeros(p.shape, dtype=dtype, device=self.backend.device))
                    continue
                t = t.detach() if t.requires_grad else t  # no new alias per tensor (~0.5 us each)
                if not fresh or not t.is_contiguous() or t.data_ptr() in seen:
                    t = t.to(dtype, copy=True).contiguous()
                elif t.dtype != dtype:
                    t = t.to(dtype)
                seen.add(t.data_ptr())
                out.append(t.mul_(w) if n > 1 else t)
            return out
        for a, t in zip(acc, ts):
            if t is not None:
                a.add_(t.detach().to(a.dtype), alpha=w)
        return acc

    # ------------------------------------------------------------------ gradients
    @property
    def can_scale_grad(self) -> bool:
        """Whether :meth:`loss_and_grad` applies ``grad_scale`` (not through a user ``grad_fn`` or the
        pipeline schedule)."""
        return self.grad_fn is None and self.parallel.pp_size == 1

    def loss_and_grad(
        self, leaves: list[torch.Tensor] | None = None, grad_scale: float = 1.0
    ) -> tuple[float, Vector]:
        """Mean loss (NaN on non-last pipeline stages) and the gradient, at the parameters or at
        ``leaves`` (tensors standing in for them). Where :attr:`can_scale_grad`, the gradient comes
        multiplied by ``grad_scale`` (the backward's seed: no extra pass; exact for a power of two)."""
        settle_all()  # at theta: no fd anchor left dirty by a product (:mod:`.anchor`, lazy restore)
        if self.backend.host and leaves is None:  # the gradient in host memory (:mod:`.hostvectors`)
            return hostvectors.host_gradient(self, grad_scale)
        return self._gradient(leaves, grad_scale)

    def _gradient(self, leaves: list[torch.Tensor] | None = None, grad_scale: float = 1.0):
        self.n_grad += 1
        if self.grad_fn is not None:
            with deterministic_loss(self.model, self.eval_mode):
                loss, g = self.grad_fn()
            self.last_loss = loss
            return loss, self._finish(self._accumulate(None, g, 1, fresh=False))
        if leaves is None:
            leaves = self._leaves()
        total, acc = accumulated_grads(self, leaves, grad_scale, self._accumulate)
        self.last_loss = total
        assert acc is not None
        return total, self._finish(acc)

    # ------------------------------------------------------------------ products
    def matvec(self, v: Vector) -> Vector:
        """H v (this rank's shards), averaged over micro-batches and data-parallel replicas."""
        self.n_matvec += 1
        if DIRTY:  # another operator's fd product left shared parameters perturbed (lazy restore)
            settle_all(keep=self._anchor)
        from lrscale_megatron.curvature import products

        if self.mode == "exact":
            return products.hvp_exact(self, v)
        if self.mode == "fd":
            from lrscale_megatron.curvature.autocast_guard import refuse_low_precision_autocast

            with refuse_low_precision_autocast():  # the step would round away in bf16/fp16 matmuls
                return products.hvp_fd(self, v)
        return products.hvp_jvp(self, v)

    __call__ = matvec

    def base_gradient(self, version: int | None = None) -> Vector | None:
        """The gradient at the parameters that the forward-difference product subtracts (the cached fd
        base gradient, computed now if not yet: the first product then reuses it), or ``None`` when this
        operator has none (``mode`` other than ``"fd"``, or ``fd_scheme="central"``). Do not modify it.
        ``version``: the parameters' version as the caller just read it (a hit skips reading it again)."""
        if self.mode != "fd" or self.fd_scheme != "forward":
            return None
        if self._base is None or (
            self._base_version != version and self._base_version != self._params_version()
        ):
            self._base = None
            self._base = self.loss_and_grad()
            self._base_version = self._params_version()
        return self._base[1]

    def release(self) -> None:
        """Free what the operator caches (the first gradient's graph, the fd base gradient, the fd anchor)."""
        self._graph = None
        self._base = None
        self.drop_anchor()

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
            eval_mode=self.eval_mode,
            reuse_graph=self.reuse_graph,
            fd_restore=self.fd_restore,
            vectors="host" if self.backend.host else "device",
        )

    @property
    def dim(self) -> int:
        return self.backend.dim
