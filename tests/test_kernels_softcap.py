"""Soft-capped and scaled logits (z = cap·tanh(scale·x/cap) before the temperature) in every kernel
function and backend against the naive float64 reference: values and gradients (hidden, weight,
bias), the student's and the teacher's (and the reference's) maps set separately, at irregular
shapes (prime vocabularies, rows no chunk or block divides, padded teacher heads, teacher hidden
sizes that differ), masks, ignore_index, temperatures, per token and reduced (weights=). The
torch backend, and the chunked backend with its Triton row kernel under TRITON_INTERPRET=1 (fp32).
Logits are large enough that the cap bends them (|x| up to several caps). And the reference itself
against torch's autograd of the formula, and the options' errors.
"""
import math

import pytest
import torch

from kernel_grads import run_with_grads

from fastdadpo.kernels import (fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs,
                               naive_linear_advantage, naive_linear_divergence, naive_linear_logprobs)
from fastdadpo.kernels.sweep import LogitMap

KINDS = ("forward_kl", "reverse_kl", "jsd")
# (student softcap, student scale, teacher softcap, teacher scale): Gemma-2-like caps on both, a
# scale alone (Cohere), a cap with a scale, the student capped and the teacher not.
MAPS = [(3.0, 1.0, 2.5, 1.0), (None, 0.4, None, 1.7), (2.0, 1.6, None, 1.0), (None, 1.0, 4.0, 0.6)]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "chunked"])
def impl(request, monkeypatch):
    if request.param == "chunked":  # several chunks of 7 rows, a ragged last one
        from fastdadpo.kernels import chunk_plan, chunked_backend

        monkeypatch.setattr(chunk_plan, "MIN_CHUNK_ROWS", 7)
        return dict(impl="chunked_triton", chunk_budget_mb=1e-6)
    return dict(impl="torch")


def _tensors(seed, n, hs, ht, vs, vt):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    # Weights scaled so raw logits reach ±10: well into the caps' bend.
    return dict(student_hidden=randn(n, hs), student_weight=randn(vs, hs, std=4 / hs**0.5),
                teacher_hidden=randn(n, ht), teacher_weight=randn(vt, ht, std=4 / ht**0.5),
                ref_hidden=randn(n, ht), ref_weight=randn(vt, ht, std=4 / ht**0.5), bias=randn(vs, std=1.0),
                upstream=randn(n), upstream2=randn(n), mask=torch.rand(n, generator=g) > 0.3,
                targets=torch.randint(0, vs, (n,), generator=g))


def _compare(fused, naive, leaves, upstreams, names=("hidden", "weight", "bias")):
    fused_out, fused_grads = run_with_grads(fused, leaves, upstreams, torch.float32)
    naive_out, naive_grads = run_with_grads(naive, leaves, upstreams, torch.float64)
    for i, (a, b) in enumerate(zip(fused_out, naive_out)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=3e-4, msg=lambda m: f"output {i}: {m}")
    for name, a, b in zip(names, fused_grads, naive_grads):
        assert a is not None, f"d {name}: no gradient"
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=3e-4, msg=lambda m: f"d {name}: {m}")
    return fused_out, naive_out


@pytest.mark.parametrize("softcap,scale", [(3.0, 1.0), (None, 0.35), (2.0, 1.8)])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("reduced", [False, True])
def test_logprobs(impl, softcap, scale, temperature, reduced):
    t = _tensors(0, n=23, hs=24, ht=8, vs=101, vt=101)
    targets = t["targets"].clone()
    targets[[3, 17]] = -100
    reduced_kw = dict(weights=t["upstream"].float()) if reduced else {}
    _compare(lambda h, w, b: fused_linear_logprobs(h, w, targets, bias=b, temperature=temperature, softcap=softcap,
                                                   logit_scale=scale, **impl, **reduced_kw),
             lambda h, w, b: naive_linear_logprobs(h, w, targets, bias=b, temperature=temperature,
                                                   logit_map=LogitMap(softcap, scale)),
             [t["student_hidden"], t["student_weight"], t["bias"]], [t["upstream"]])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("maps", MAPS)
@pytest.mark.parametrize("with_targets", [False, True])
def test_divergence(impl, kind, maps, with_targets):
    # Padded teacher head (vt > vs), divergence over the first 89 rows; temperatures on both outputs.
    t = _tensors(1, n=29, hs=16, ht=40, vs=97, vt=103)
    s_cap, s_scale, t_cap, t_scale = maps
    targets = t["targets"].clone()
    targets[[0, 9]] = -100
    extra = dict(targets=targets, logp_temperature=0.8) if with_targets else {}
    common = dict(kind=kind, beta=0.3, temperature=1.9, mask=t["mask"], vocab_size=89, **extra)
    th, tw = t["teacher_hidden"], t["teacher_weight"]
    ups = [t["upstream"], t["upstream2"]] if with_targets else [t["upstream"]]
    _compare(lambda h, w: fused_linear_divergence(h, w, th.float(), tw.float(), softcap=s_cap, logit_scale=s_scale,
                                                  teacher_softcap=t_cap, teacher_logit_scale=t_scale, **common,
                                                  **impl),
             lambda h, w: naive_linear_divergence(h, w, th, tw, student_map=LogitMap(s_cap, s_scale),
                                                  teacher_map=LogitMap(t_cap, t_scale), **common),
             [t["student_hidden"], t["student_weight"]], ups, names=("hidden", "weight"))


@pytest.mark.parametrize("kind", KINDS + ("advantage",))
def test_reduced_gradients(impl, kind):
    """Gradients formed in the forward sweep (reduced outputs) carry the chain rule too."""
    t = _tensors(2, n=21, hs=20, ht=12, vs=83, vt=83)
    maps = dict(softcap=2.5, logit_scale=1.3, teacher_softcap=3.5, teacher_logit_scale=0.9)
    names = ("hidden", "weight")
    if kind == "advantage":
        args = (t["teacher_hidden"], t["teacher_weight"], t["ref_hidden"], t["ref_weight"])
        ref_map = dict(ref_softcap=1.5, ref_logit_scale=1.2)
        _compare(lambda h, w: fused_linear_advantage(h, w, *(a.float() for a in args), temperature=0.7,
                                                     mask=t["mask"], weights=t["upstream"].float(), **maps,
                                                     **ref_map, **impl),
                 lambda h, w: naive_linear_advantage(h, w, *args, temperature=0.7, mask=t["mask"],
                                                     student_map=LogitMap(2.5, 1.3), teacher_map=LogitMap(3.5, 0.9),
                                                     ref_map=LogitMap(1.5, 1.2)),
                 [t["student_hidden"], t["student_weight"]], [t["upstream"]], names)
        return
    args = (t["teacher_hidden"], t["teacher_weight"])
    _compare(lambda h, w: fused_linear_divergence(h, w, *(a.float() for a in args), kind=kind, temperature=1.4,
                                                  mask=t["mask"], targets=t["targets"],
                                                  weights=t["upstream"].float(),
                                                  logp_weights=t["upstream2"].float(), **maps, **impl),
             lambda h, w: naive_linear_divergence(h, w, *args, kind=kind, temperature=1.4, mask=t["mask"],
                                                  targets=t["targets"], student_map=LogitMap(2.5, 1.3),
                                                  teacher_map=LogitMap(3.5, 0.9)),
             [t["student_hidden"], t["student_weight"]], [t["upstream"], t["upstream2"]], names)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_advantage(impl, temperature):
    t = _tensors(3, n=31, hs=24, ht=36, vs=107, vt=113)
    args = (t["teacher_hidden"], t["teacher_weight"], t["ref_hidden"], t["ref_weight"])
    _compare(lambda h, w: fused_linear_advantage(h, w, *(a.float() for a in args), temperature=temperature,
                                                 mask=t["mask"], vocab_size=101, softcap=3.0, teacher_softcap=2.0,
                                                 ref_logit_scale=0.5, **impl),
             lambda h, w: naive_linear_advantage(h, w, *args, temperature=temperature, mask=t["mask"],
                                                 vocab_size=101, student_map=LogitMap(3.0, 1.0),
                                                 teacher_map=LogitMap(2.0, 1.0), ref_map=LogitMap(None, 0.5)),
             [t["student_hidden"], t["student_weight"]], [t["upstream"]], names=("hidden", "weight"))


def test_the_options_change_the_result(impl):
    """A cap that bends the logits changes the log-probs: the options reach the backend."""
    t = _tensors(4, n=9, hs=16, ht=8, vs=61, vt=61)
    h, w = t["student_hidden"].float(), t["student_weight"].float()
    plain = fused_linear_logprobs(h, w, t["targets"], **impl)
    capped = fused_linear_logprobs(h, w, t["targets"], softcap=2.0, **impl)
    assert (plain - capped).abs().max() > 0.1


def test_reference_is_the_formula():
    """The reference's map is cap·tanh(scale·x/cap) with autograd's own derivative."""
    x = torch.linspace(-50, 50, 101, dtype=torch.float64).requires_grad_()
    z = LogitMap(30.0, 0.5).apply(x)
    torch.testing.assert_close(z, 30.0 * torch.tanh(0.5 * x.detach() / 30.0))
    z.sum().backward()
    torch.testing.assert_close(x.grad, 0.5 * (1 - torch.tanh(0.5 * x.detach() / 30.0) ** 2))
    y = torch.linspace(-50, 50, 101, dtype=torch.float64)
    slope = LogitMap(30.0, 0.5).slope_into(LogitMap(30.0, 0.5).apply_(y.clone()), torch.empty_like(y))
    torch.testing.assert_close(slope, x.grad)


@pytest.mark.parametrize("bad", [dict(softcap=0.0), dict(softcap=-1.0), dict(softcap=math.inf),
                                 dict(logit_scale=0.0), dict(logit_scale=math.nan)])
def test_bad_options_are_clear_errors(bad):
    t = _tensors(5, n=4, hs=8, ht=8, vs=11, vt=11)
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        fused_linear_logprobs(t["student_hidden"], t["student_weight"], t["targets"], impl="torch", **bad)
    with pytest.raises(ValueError, match="teacher_" + name):
        fused_linear_divergence(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"],
                                impl="torch", **{"teacher_" + name: bad[name]})


def test_tile_fused_backend_refuses_them_by_name():
    t = _tensors(6, n=4, hs=16, ht=16, vs=32, vt=32)
    with pytest.raises(ValueError, match="teacher_softcap.*chunked, chunked_triton, torch, naive"):
        fused_linear_divergence(t["student_hidden"].float(), t["student_weight"].float(), t["teacher_hidden"].float(),
                                t["teacher_weight"].float(), teacher_softcap=30.0, impl="triton")
