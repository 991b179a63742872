"""Blocks of the Hessian: per-layer (per parameter group) spectra.

:class:`BlockOperator` is ``P H P`` for the coordinate projection ``P`` onto a block of parameters. Its
non-zero spectrum is the spectrum of the diagonal block ``H_BB`` (the Hessian restricted to the block,
the other parameters fixed). Working by projection keeps every rank in every product, so a block that
lives on one pipeline stage or one TP shard is handled by the same code as the whole model.

:func:`transformer_blocks` groups the parameters of a GPT by global layer: ``embedding``,
``layers.<i>`` and ``final`` (final norm and an untied output layer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from lrscale_megatron.curvature.backend import Vector, VectorBackend

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


def block_of(global_name: str) -> str:
    """The block a parameter belongs to, from its global name."""
    m = _LAYER.search(global_name)
    if m:
        return f"layers.{int(m.group(1))}"
    if "embed" in global_name or global_name.startswith(("wte", "wpe")):
        return "embedding"
    return "final"


def transformer_blocks(backend: VectorBackend) -> dict[str, list[int]]:
    """Block name -> indices of this rank's parameters in it, ordered embedding, layers.0.., final."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(backend.specs):
        out.setdefault(block_of(s.name), []).append(i)

    def key(n: str):
        return (
            (0, 0) if n == "embedding" else (1, int(n.split(".")[1])) if n.startswith("layers.") else (2, 0)
        )

    return dict(sorted(out.items(), key=lambda kv: key(kv[0])))


class _MaskedBackend(VectorBackend):
    def __init__(self, base: VectorBackend, keep: Sequence[bool]) -> None:
        super().__init__(base.specs, dtype=base.dtype, device=base.device, all_reduce=base._all_reduce)
        self.host, self.pin = base.host, base.pin  # vectors="host": the block's vectors stay in host memory
        self.keep = list(keep)

    def project(self, x: Vector) -> Vector:
        with self.allocation():
            return [xi if k else torch.zeros_like(xi) for xi, k in zip(x, self.keep)]

    def randn(self, seed: int) -> Vector:
        return self.project(super().randn(seed))

    def rademacher(self, seed: int) -> Vector:
        return self.project(super().rademacher(seed))

    @property
    def dim(self) -> int:
        n = torch.tensor(
            float(sum(torch.Size(s.shape).numel() for s, k in zip(self.specs, self.keep) if s.owned and k)),
            dtype=torch.float64,
            device=self.device,
        )
        if self._all_reduce is not None:
            self._all_reduce(n)
        return int(round(n.item()))


class BlockOperator:
    """``P H P`` for the parameters at ``indices`` of ``op`` (every rank must build it, even with none)."""

    returns_new_tensors = True  # project() keeps op's output tensors or makes zeros; copied if op reuses

    def __init__(self, op, indices: Sequence[int]) -> None:
        self.op = op
        wanted = set(indices)
        self.backend: VectorBackend = _MaskedBackend(
            op.backend, [i in wanted for i in range(len(op.backend.specs))]
        )
        self.n_matvec = 0

    def allow_anchor(self) -> bool:
        """Forwarded to the wrapped operator (``HessianOperator.allow_anchor``, :mod:`.anchor`): the anchor
        then covers all of its parameters (the memory of a whole-model solve), not the block only."""
        allow = getattr(self.op, "allow_anchor", None)
        return bool(allow()) if allow is not None else False

    def drop_anchor(self) -> None:
        """Forwarded to the wrapped operator (``HessianOperator.drop_anchor``)."""
        drop = getattr(self.op, "drop_anchor", None)
        if drop is not None:
            drop()

    def matvec(self, v: Vector) -> Vector:
        self.n_matvec += 1
        b = self.backend
        assert isinstance(b, _MaskedBackend)
        out = self.op.matvec(b.project(v))
        if not getattr(self.op, "returns_new_tensors", False):
            out = [t.clone() for t in out]
        return b.project(out)

    __call__ = matvec


def select_params(
    model: torch.nn.Module, params: Sequence[Any] | None, who: str
) -> list[tuple[str, torch.Tensor]]:
    """``model``'s trainable ``(name, parameter)`` pairs, in model order: all of them (``params=None``), or
    those named / given in ``params`` (a block of H). Unknown names are refused, naming ``who``."""
    named: list[tuple[str, torch.Tensor]] = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        return named
    chosen = list(params)
    if all(isinstance(x, str) for x in chosen):
        wanted = set(chosen)
        known = {n for n, _ in named}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(
                f"{who} params: no trainable parameter named {missing[:5]}; "
                f"known names start with {sorted(known)[:5]}"
            )
        return [(n, p) for n, p in named if n in wanted]
    ids = {id(p) for p in chosen}
    return [(n, p) for n, p in named if id(p) in ids]
