"""A frozen student head (a LoRA student's: the weight does not require grad): values and hidden-state
and bias gradients still match the float64 reference, the weight gets no gradient, and no
[V, H]-shaped float tensor is ever allocated (no weight-gradient buffer, no dW GEMM), observed
through every aten op the call runs. Torch backend and the chunked backend (its Triton row kernel
under TRITON_INTERPRET=1, fp32), per token and reduced (weights=).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdadpo.kernels import (Reduced, fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs,
                               naive_linear_advantage, naive_linear_divergence, naive_linear_logprobs)

# Sizes no other operand shares: a [V, H] result can only be the student's weight gradient.
N, HS, HT, V = 19, 24, 40, 97


class _HeadShapedAllocations(TorchDispatchMode):
    """Records every op that produces a new float tensor of the student head's shape (views and
    in-place ops write into existing storage and are not allocations)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.seen = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = not func.is_view and not func._schema.name.endswith("_") and not any(
            a.is_out for a in func._schema.arguments)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if fresh and isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) == self.shape:
                self.seen.append(str(func))
        return out


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 11]] = -100
    return dict(hs=randn(N, HS), ws=randn(V, HS, std=2 / HS**0.5), bias=randn(V, std=0.3), ht=randn(N, HT),
                wt=randn(V, HT, std=2 / HT**0.5), hr=randn(N, HT), wr=randn(V, HT, std=2 / HT**0.5),
                mask=torch.rand(N, generator=g) > 0.3, targets=targets, up=randn(N), up2=randn(N))


def _leaves(t, dtype):
    """The inputs in ``dtype``, made before any observation: the weight frozen."""
    leaves = {k: t[k].to(dtype).clone() for k in ("hs", "ws", "bias", "ht", "wt", "hr", "wr")}
    leaves["hs"].requires_grad_()
    leaves["bias"].requires_grad_()
    return leaves


def _call(fn, t, leaves, reduced, impl):
    """(outputs, hidden grad, bias grad or None, weight) with a frozen weight, the loss Σ up·out."""
    hs, ws, bias, others = leaves["hs"], leaves["ws"], leaves["bias"], leaves
    kw = {} if impl is None else dict(impl=impl)
    if fn == "logprobs":
        f = fused_linear_logprobs if impl else naive_linear_logprobs
        extra = dict(weights=t["up"].float()) if reduced and impl else {}
        outs = f(hs, ws, t["targets"], bias=bias, temperature=1.3, **kw, **extra)
        ups = (t["up"],)
    elif fn == "divergence":
        f = fused_linear_divergence if impl else naive_linear_divergence
        extra = dict(weights=t["up"].float(), logp_weights=t["up2"].float()) if reduced and impl else {}
        outs = f(hs, ws, others["ht"], others["wt"], kind="jsd", beta=0.3, temperature=1.7, mask=t["mask"],
                 targets=t["targets"], **kw, **extra)
        ups, bias = (t["up"], t["up2"]), None
    else:
        f = fused_linear_advantage if impl else naive_linear_advantage
        extra = dict(weights=t["up"].float()) if reduced and impl else {}
        outs = f(hs, ws, others["ht"], others["wt"], others["hr"], others["wr"], temperature=0.8, mask=t["mask"],
                 **kw, **extra)
        ups, bias = (t["up"],), None
    if isinstance(outs, Reduced):  # weights = the upstreams: the loss is the call's own
        outs.loss.backward()
        outs = (outs.values,) + (() if outs.logps is None else (outs.logps,))
    else:
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum((o.double() * u).sum() for o, u in zip(outs, ups)).backward()
    return outs, hs.grad, None if bias is None else bias.grad, ws


@pytest.mark.parametrize("impl", ["torch", "chunked_triton"])
@pytest.mark.parametrize("fn", ["logprobs", "divergence", "advantage"])
@pytest.mark.parametrize("reduced", [False, True])
def test_frozen_head_forms_no_weight_gradient(monkeypatch, impl, fn, reduced):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    t = _tensors(3)
    expected, hidden64, bias64, _ = _call(fn, t, _leaves(t, torch.float64), reduced, None)
    leaves = _leaves(t, torch.float32)
    with _HeadShapedAllocations((V, HS)) as seen:
        outs, hidden, bias, weight = _call(fn, t, leaves, reduced, impl)
    assert seen.seen == [], f"{impl}: [V, H] float tensors allocated with a frozen head: {seen.seen}"
    assert weight.grad is None
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(hidden.double(), hidden64, atol=2e-5, rtol=2e-4)
    if bias64 is not None:
        torch.testing.assert_close(bias.double(), bias64, atol=2e-5, rtol=2e-4)


def test_the_observer_sees_a_trainable_heads_gradient(monkeypatch):
    """The same call with the weight trainable allocates its [V, H] gradient: the check above can fail."""
    t = _tensors(4)
    hs = t["hs"].float().requires_grad_()
    ws = t["ws"].float().requires_grad_()
    with _HeadShapedAllocations((V, HS)) as seen:
        fused_linear_logprobs(hs, ws, t["targets"], impl="torch").sum().backward()
    assert seen.seen and ws.grad is not None
