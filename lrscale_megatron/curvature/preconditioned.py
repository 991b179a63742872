"""The Adam-preconditioned Hessian ``P^-1/2 H P^-1/2`` (Cohen et al. 2022, "Adaptive gradient methods at
the edge of stability"): the operator whose top eigenvalue the ``eos`` bound is stated for."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lrscale_megatron.curvature.backend import Vector

if TYPE_CHECKING:
    from lrscale_megatron.curvature.operators import HessianOperator

logger = logging.getLogger(__name__)

#: a coordinate whose ``sqrt(v̂)`` is below this many units of round-off (of the vector dtype) times the RMS of
#: ``sqrt(v̂)`` over the model has a gradient that never rose above the round-off of the gradients: it is
#: excluded from the operator (its ``P^-1/2`` entry set to 0)
ROUNDOFF_ULPS = 8.0

#: the finite-difference constant of a preconditioned fd measurement, as a fraction of the raw Hessian's:
#: ``P^-1/2`` is very uneven (1e3x on rarely seen embedding rows), so a step sized on ``||P^-1/2 v||``
#: concentrates in few coordinates and the forward difference's truncation error grows: on the megatron
#: ``tiny`` GPT (1000-10000 AdamW steps) the default step was refused by the true-residual check at 2 of 5
#: states (Ritz value +1.1 % / +0.4 % from exact, error growing with the step), a quarter of it converged at
#: all 11 states from step 2 to 10000 within 0.25 % of the exact preconditioned product
#: (docs/benchmarks.md, "Online adaptation overhead (issue 11, third pass)")
FD_STEP_FACTOR = 0.25


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

    Coordinates at the round-off floor are excluded (``P^-1/2`` set to 0 there; :attr:`n_excluded` counts
    them over all ranks): ``sqrt(v̂_i) < ROUNDOFF_ULPS · u · rms(sqrt(v̂))`` with ``u`` the vector dtype's
    machine epsilon. Such a coordinate's gradient was never more than round-off (an attention key bias:
    softmax is invariant to it, so its gradient and its Hessian row are zero in exact arithmetic), so
    ``P^-1/2 = (sqrt(v̂) + eps)^-1/2`` is ~``eps^-1/2`` = 1e4 there: a finite-difference product perturbs
    those coordinates ~1e4x harder than the rest and multiplies the round-off of their gradient difference
    by ~1e4 again, so the product is round-off noise (on the megatron-core ``tiny`` GPT after 1000 AdamW
    steps Lanczos ran to ``max_iter`` at a Ritz value 1.6x the exact one). The exact operator's top
    eigenvalue is unchanged by the exclusion wherever the excluded Hessian rows are zero
    (``tests/unit/test_preconditioned_roundoff.py``, against a float64 reference without the exclusion).
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
        with op.backend.allocation():  # the scale lives with the vectors (host memory: vectors="host")
            be = op.backend
            roots = [torch.sqrt(v.detach().to(be.device, be.dtype).clamp_min(0)) for v in second_moments]
        dim = self.backend.dim
        rms = self.backend.norm(roots) / math.sqrt(dim) if dim else 0.0
        floor = ROUNDOFF_ULPS * self.backend.eps * rms
        self.floor = floor
        self.scale = []
        for r in roots:  # in place: no second parameter-sized list
            low = r < floor
            self.scale.append(r.add_(eps).rsqrt_().masked_fill_(low, 0.0))
            del low
        del roots
        # owned entries counted here, summed over model-parallel ranks: no parameter-sized mask list
        zeros = [(s == 0).sum() for s, spec in zip(self.scale, self.backend.specs) if spec.owned]
        local = int(torch.stack(zeros).sum()) if zeros else 0  # one device sync
        self.n_excluded = int(round(self.backend.global_sum(local)))
        if self.n_excluded:
            logger.debug(
                "preconditioned operator: %d coordinates at the round-off floor (sqrt(v) < %.3g) excluded",
                self.n_excluded,
                floor,
            )
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

    def allow_anchor(self) -> bool:
        """Forwarded to the Hessian operator (:meth:`HessianOperator.allow_anchor`)."""
        return self.op.allow_anchor()

    def drop_anchor(self) -> None:
        """Forwarded to the Hessian operator (:meth:`HessianOperator.drop_anchor`)."""
        self.op.drop_anchor()

    def matvec(self, v: Vector) -> Vector:
        self.n_matvec += 1
        with self.backend.allocation():
            u = [vi * s for vi, s in zip(v, self.scale)]
        w = self.op.matvec(u)
        with self.backend.allocation():
            return [wi * s for wi, s in zip(w, self.scale)]

    __call__ = matvec
