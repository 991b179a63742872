"""The cheaper double backward of GELU / LayerNorm / softmax / linear / matmul (curvature/doublegrad.py) against PyTorch's own
double-backward formulas (float64), and the exact Hessian-vector product built on it against the stock one
and a dense Hessian."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

from lrscale_megatron.curvature import HessianOperator, doublegrad
from lrscale_megatron.curvature.doublegrad import cheap_double_backward
from lrscale_megatron.models.torch_gpt import TorchGPT, TorchGPTConfig, torch_gpt_loss


def _second(f, shapes, enabled, seed=0):
    """First gradient (create_graph) and the gradient of <g, v> of sum(f(inputs) * w) wrt every input."""
    g0 = torch.Generator().manual_seed(seed)
    ins = [torch.randn(s, dtype=torch.float64, generator=g0).requires_grad_(True) for s in shapes]
    with cheap_double_backward(enabled):
        out = f(*ins)
    w = torch.randn(out.shape, dtype=torch.float64, generator=g0)
    g = torch.autograd.grad((out * w).sum(), ins, create_graph=True)
    vs = [torch.randn(x.shape, dtype=torch.float64, generator=g0) for x in g]
    hv = torch.autograd.grad(g, ins, vs, allow_unused=True)
    return out, g, hv


def _names(out) -> set[str]:
    seen, stack = set(), [out.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or type(n).__name__ in seen:
            continue
        seen.add(type(n).__name__)
        stack.extend(nx for nx, _ in n.next_functions)
    return seen


CASES = [
    ("gelu", lambda x: F.gelu(x) ** 2, [(5, 7)], "_GeluBackward"),
    ("torch.softmax", lambda z: torch.softmax(z, -1) ** 2, [(3, 4, 6)], "_SoftmaxBackward"),
    ("Tensor.softmax", lambda z: z.softmax(1).sin(), [(3, 4, 6)], "_SoftmaxBackward"),
    ("F.softmax", lambda z: F.softmax(z, dim=0).cos(), [(3, 4, 6)], "_SoftmaxBackward"),
    (
        "layer_norm",
        lambda x, w, b: F.layer_norm(x, (6,), w, b).sin(),
        [(3, 4, 6), (6,), (6,)],
        "_LayerNormBackward",
    ),
    ("layer_norm no affine", lambda x: F.layer_norm(x, (6,)).sin(), [(3, 4, 6)], "_LayerNormBackward"),
    (
        "layer_norm 2-d shape",
        lambda x, w, b: F.layer_norm(x, (4, 6), w, b, 1e-3).sin(),
        [(3, 4, 6), (4, 6), (4, 6)],
        "_LayerNormBackward",
    ),
    ("nn.LayerNorm weight only", None, [(2, 5, 8)], "_LayerNormBackward"),
    (
        "layer_norm of a constant",  # dx unused: its cotangent is None in the second backward
        lambda w, b: F.layer_norm(
            torch.linspace(-1, 2, 24, dtype=torch.float64).reshape(4, 6).cos(), (6,), w, b
        ).sin(),
        [(6,), (6,)],
        "_LayerNormBackward",
    ),
    ("linear", lambda x, w, b: F.linear(x, w, b).sin(), [(3, 4, 6), (5, 6), (5,)], "_LinearBackward"),
    (
        "linear 2-d",
        lambda x, w, b: torch.tanh(F.linear(x, w, b)) ** 2,
        [(4, 6), (5, 6), (5,)],
        "_LinearBackward",
    ),
    (
        "linear of a constant",  # dx unused: its cotangent is None in the second backward
        lambda w, b: F.linear(torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(2, 2, 6), w, b).sin(),
        [(5, 6), (5,)],
        "_LinearBackward",
    ),
    (
        "linear into gelu",
        lambda x, w, b: F.gelu(F.linear(x, w, b)).cos(),
        [(2, 3, 6), (7, 6), (7,)],
        "_LinearBackward",
    ),
    ("matmul 3-d", lambda a, b: torch.matmul(a, b).sin(), [(3, 4, 5), (3, 5, 2)], "_BmmBackward"),
    (
        "attention core",  # q @ k^T on transposed views, softmax, @ v: strided inputs, reshaped copies
        lambda q, k, v: (
            (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1)).softmax(-1) @ v.transpose(1, 2)
        ).cos(),
        [(2, 5, 3, 4), (2, 5, 3, 4), (2, 5, 3, 4)],
        "_BmmBackward",
    ),
    (
        "Tensor.matmul of a constant",  # one operand constant: the other's cotangent is None
        lambda b: torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(2, 3, 4).cos().matmul(b).tanh(),
        [(2, 4, 5)],
        "_BmmBackward",
    ),
]


@pytest.mark.parametrize("name,f,shapes,node", CASES, ids=[c[0] for c in CASES])
def test_second_derivatives_equal_pytorchs(name, f, shapes, node):
    if f is None:  # a module whose weight requires grad, input x also differentiated
        ln = torch.nn.LayerNorm(8, bias=False).double()
        with torch.no_grad():
            ln.weight.uniform_(0.5, 1.5)

        def f(x):
            return ln(x).tanh() * ln.weight.sum()

    out0, g0, h0 = _second(f, shapes, enabled=False)
    out1, g1, h1 = _second(f, shapes, enabled=True)
    assert node in _names(out1) and node not in _names(out0)  # the route fired (and only when enabled)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)  # same forward kernels: bit for bit
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same first-backward kernels
    for a, b in zip(h1, h0):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_double_backward_passes_gradcheck():
    """Against finite differences too (independent of PyTorch's formulas)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, dtype=torch.float64, generator=g).requires_grad_(True)
    w = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_(True)

    def f(x, w, b):
        with cheap_double_backward(True):
            y = F.gelu(F.layer_norm(x, (4,), w, b)).softmax(-1)
            return (y.unsqueeze(0) @ y.t().unsqueeze(0)).squeeze(0)

    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_other_calls_go_to_pytorch_unchanged():
    x = torch.randn(4, 6, requires_grad=True)
    with cheap_double_backward(True):
        tanh_gelu = F.gelu(x, approximate="tanh")
        typed = torch.softmax(x, -1, dtype=torch.float64)
        with torch.no_grad():
            plain = F.gelu(x)
    w, b = torch.randn(5, 6, requires_grad=True), torch.randn(5, requires_grad=True)
    with cheap_double_backward(True):  # where at::linear would not run addmm on the flattened input
        no_bias = F.linear(x, w)
        strided = F.linear(torch.randn(6, 3, 4).transpose(0, 2), w, b)
    assert "_LinearBackward" not in _names(no_bias) | _names(strided)
    with cheap_double_backward(True):  # broadcasting or mixed dims: matmul's other paths
        bcast = torch.randn(2, 3, 4, 6, requires_grad=True) @ torch.randn(1, 3, 6, 5)
        mixed = torch.randn(3, 4, 6, requires_grad=True) @ torch.randn(6, 5)
    assert "_BmmBackward" not in _names(bcast) | _names(mixed)
    assert type(tanh_gelu.grad_fn).__name__ == "GeluBackward0"
    assert type(typed.grad_fn).__name__ == "SoftmaxBackward0"
    assert plain.grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's cast lists decide dtypes: no route
        with cheap_double_backward(True):
            cast = torch.softmax(F.layer_norm(x, (6,)), -1)
        stock = torch.softmax(F.layer_norm(x, (6,)), -1)
    assert cast.dtype == stock.dtype and not {"_LayerNormBackward", "_SoftmaxBackward"} & _names(cast)
    with cheap_double_backward(False):
        assert type(F.gelu(x).grad_fn).__name__ == "GeluBackward0"


def _gpt(dtype):
    cfg = TorchGPTConfig(vocab_size=32, seq_length=8, hidden_size=16, num_layers=2, num_heads=2)
    model = TorchGPT(cfg).to(dtype)
    model.init_weights(0)
    tok = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


@pytest.mark.parametrize("reuse", [True, False])
def test_exact_product_on_a_gpt_matches_stock_and_dense_hessian(reuse, monkeypatch):
    """float64 TorchGPT (LayerNorm, GELU, softmax attention): the default exact product equals the one with
    PyTorch's double backward to 1e-12 and H v from a dense Hessian of a parameter block to 1e-10."""
    model, batch = _gpt(torch.float64)
    op = HessianOperator(copy.deepcopy(model), torch_gpt_loss, batch, mode="exact", reuse_graph=reuse)
    monkeypatch.setattr(doublegrad, "ENABLED", False)
    stock = HessianOperator(copy.deepcopy(model), torch_gpt_loss, batch, mode="exact", reuse_graph=reuse)
    v = op.backend.randn(1)
    ref = stock.matvec(v)  # builds its graph with PyTorch's formulas
    monkeypatch.setattr(doublegrad, "ENABLED", True)
    hv = op.matvec(v)
    for a, b in zip(hv, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # dense Hessian of a block through every routed layer (torch.func.hessian: PyTorch's formulas, float64)
    names = ["blocks.0.ln1.weight", "blocks.0.ln2.bias", "blocks.1.fc1.bias"]
    block = op.restrict(names)
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]

    def loss_of(flat):
        parts = torch.split(flat, sizes)
        pd = {n: p.reshape(params[n].shape) for n, p in zip(names, parts)}
        return torch_gpt_loss_call(model, pd, batch)

    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    H = torch.func.hessian(loss_of)(flat)
    vb = block.backend.randn(2)
    hb = torch.cat([t.reshape(-1) for t in block.matvec(vb)])
    dense = H @ torch.cat([t.reshape(-1) for t in vb])
    torch.testing.assert_close(hb, dense, rtol=1e-10, atol=1e-10)


def torch_gpt_loss_call(model, pdict, batch):
    logits = torch.func.functional_call(model, pdict, (batch["tokens"],))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def _saved_bytes(model, batch, enabled):
    """Bytes of the saved tensors still alive once the first gradient's graph is built, and that graph's
    routed nodes (which must have dropped their input for the precomputed coefficients)."""
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    params = list(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with cheap_double_backward(enabled):
            out = torch_gpt_loss(model, batch)
        g = torch.autograd.grad(out, params, create_graph=True)
    alive = {}
    for r in refs:
        t = r()
        if t is not None:
            alive[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    nodes, stack, seen = [], [gi.grad_fn for gi in g], set()
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        nodes.append(n)
        stack.extend(nx for nx, _ in n.next_functions)
    return sum(alive.values()), nodes, g


def test_graph_holds_no_more_than_pytorchs_and_reused_products_match():
    """The precomputed coefficients replace the inputs they come from: the retained graph is no larger
    than with PyTorch's formulas (1 % for the row statistics); several products on one graph equal the
    stock ones (the coefficients are reused, not consumed)."""
    model, batch = _gpt(torch.float64)
    stock_bytes, _, gs = _saved_bytes(model, batch, False)
    ours_bytes, nodes, go = _saved_bytes(model, batch, True)
    assert ours_bytes <= 1.01 * stock_bytes, (ours_bytes, stock_bytes)
    routed = [n for n in nodes if type(n).__name__ in ("_GeluBackward", "_LayerNormBackward")]
    assert len(routed) == 2 + 2 * 2 + 1  # one GELU and two LayerNorms per block, the final LayerNorm
    assert not any(hasattr(n, "x") for n in routed)  # the input is dropped, its coefficient kept
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        vs = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
        ho = torch.autograd.grad(go, params, vs, retain_graph=True, allow_unused=True)
        hs = torch.autograd.grad(gs, params, vs, retain_graph=True, allow_unused=True)
        for a, b in zip(ho, hs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [F.gelu, lambda h: F.layer_norm(h, (6,))], ids=["gelu", "layer_norm"])
def test_input_changed_in_place_or_differentiated_twice_is_refused(fn):
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    with cheap_double_backward(True):
        y = fn(h)
    h.add_(1.0)  # autograd's saved-tensor check would catch this; the input kept on ctx must too
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sin().sum(), x)
    with cheap_double_backward(True):
        y = fn(x * 1.0).sin().sum()
    torch.autograd.grad(y, x, create_graph=True, retain_graph=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):  # its input is gone: refused, not wrong
        torch.autograd.grad(y, x, create_graph=True)
