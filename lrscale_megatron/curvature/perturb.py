"""Perturb parameters in place, ``theta <- theta + h v``, and restore them exactly without a copy.

A finite-difference product evaluates the gradient at ``theta + h v``. Keeping a copy of ``theta`` to
restore it afterwards costs one parameter-sized vector, the one that put the online measurement over
its memory budget (5 vectors). Instead, with ``d = fl(h * v)`` computed the same way twice:

* :func:`perturb_` writes ``t = fl(theta + d)`` and checks, before writing, that ``fl(t - d) == theta``
  element by element. The few elements where subtracting ``d`` again would not give ``theta`` back
  (``|h v_i|`` far above ``|theta_i|`` with ``theta_i`` carrying bits below the sum's last place; NaN or
  Inf) keep their original value in a sparse record (index and value), and a tensor that is not
  contiguous keeps a plain copy.
  Restored means bit for bit, except that a ``-0.0`` may come back as ``+0.0`` (an equal value).
* :func:`restore_` computes ``fl(t - d)`` (the very operation checked) and writes the recorded
  elements back: every element is restored exactly, and the check that proves it ran before the
  parameters were touched.

Work is done in groups of tensor slices of at most :data:`PERTURB_CHUNK` elements with ``torch._foreach``
ops, so the temporaries are chunk-sized and the Python overhead is a few calls per chunk, not per
element or per parameter. IEEE addition and subtraction are correctly rounded, so ``fl(t - d)`` is the
same number in the check and in the restore on any device, and two different finite numbers have a
nonzero difference (gradual underflow; with ``torch.set_flush_denormal(True)`` a difference below the
normal range, i.e. parameters of magnitude ~1e-30 and below, could read as zero).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

#: elements per group of slices (two temporaries of this size are alive at once: 512 KiB in float32)
PERTURB_CHUNK = 1 << 16


@dataclass
class Saved:
    """What :func:`restore_` needs besides ``v`` and ``h``: the elements a subtraction cannot restore.

    ``sparse``: ``(slice, indices, values)``, or ``(slice, None, values)`` (a copy of the slice) where more
    than a third of a slice needs keeping (indices cost twice the values), so the record never exceeds
    a plain copy; ``copies``: whole non-contiguous parameters.
    """

    sparse: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def n_bytes(self) -> int:
        """Bytes kept: what the perturbation stores instead of a full copy of the parameters."""
        out = 0
        for _, i, vals in self.sparse:
            out += vals.numel() * vals.element_size() + (0 if i is None else i.numel() * i.element_size())
        return out + sum(c.numel() * c.element_size() for _, c in self.copies)


def _groups(
    params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], skip: set[int]
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Flat slices of (parameter, vector) pairs, grouped to at most ``PERTURB_CHUNK`` elements."""
    ps: list[torch.Tensor] = []
    vs: list[torch.Tensor] = []
    size = 0
    for i, (p, vi) in enumerate(zip(params, v)):
        if i in skip or p.numel() == 0:
            continue
        fp, fv = p.detach().view(-1), vi.reshape(-1)
        for s in range(0, fp.numel(), PERTURB_CHUNK):
            a, b = fp[s : s + PERTURB_CHUNK], fv[s : s + PERTURB_CHUNK]
            if size + a.numel() > PERTURB_CHUNK and ps:
                yield ps, vs
                ps, vs, size = [], [], 0
            ps.append(a)
            vs.append(b if b.dtype == a.dtype else b.to(a.dtype))
            size += a.numel()
    if ps:
        yield ps, vs


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], h: float) -> Saved:
    """In place: ``params += h * v`` (module docstring); returns what :func:`restore_` needs."""
    saved = Saved()
    skip = {i for i, p in enumerate(params) if not p.is_contiguous()}
    for i in skip:
        saved.copies.append((params[i], params[i].detach().clone()))
        params[i].detach().add_(v[i].to(params[i].dtype), alpha=h)
    for ps, vs in _groups(params, v, skip):
        d = torch._foreach_mul(vs, h)
        t = torch._foreach_add(ps, d)
        torch._foreach_sub_(d, t)  # d - t == -fl(t - d) exactly (negation is exact): two temporaries
        torch._foreach_add_(d, ps)  # 0 exactly where fl(t - d) == theta (NaN/Inf give NaN: kept)
        bad = torch.stack(torch._foreach_norm(d, float("inf")))
        if not bool((bad == 0).all()):
            for j in torch.nonzero(bad != 0).flatten().tolist():
                a = ps[j]
                idx = torch.nonzero(d[j]).flatten()  # d holds theta - fl(t - d): nonzero where it differs
                if 3 * idx.numel() > a.numel():
                    saved.sparse.append((a, None, a.clone()))
                else:
                    saved.sparse.append((a, idx, a[idx].clone()))
        del d
        torch._foreach_copy_(ps, t)
        del t
    return saved


@torch.no_grad()
def restore_(params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], h: float, saved: Saved) -> None:
    """Undo :func:`perturb_` exactly (module docstring)."""
    skip = {i for i, p in enumerate(params) if any(p is q for q, _ in saved.copies)}
    for ps, vs in _groups(params, v, skip):
        torch._foreach_sub_(ps, torch._foreach_mul(vs, h))
    for a, idx, vals in saved.sparse:
        if idx is None:
            a.copy_(vals)
        else:
            a[idx] = vals
    for p, c in saved.copies:
        p.detach().copy_(c)
