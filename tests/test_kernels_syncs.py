"""No host sync inside a kernel call, forward or backward, on any backend.

A host sync is what ``.item()``, ``.tolist()``, ``bool(tensor)`` and ``float(tensor)`` dispatch to:
``aten._local_scalar_dense``. On CUDA each one stalls the host until the GPU's queue drains, so it
is counted here, on CPU, under a ``TorchDispatchMode`` that sees every aten op the call issues.
Dropping the rows a mask excludes is a data-dependent shape (``nonzero``), the one sync worth its
price: at most one per call.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdadpo.kernels import (BACKENDS, fused_linear_advantage, fused_linear_divergence, fused_linear_logprobs)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(seed=0, n=23, hs=16, ht=24, vocab=53):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::4] = -100
    return dict(
        hidden=torch.randn(n, hs, generator=g).requires_grad_(), weight=(torch.randn(vocab, hs, generator=g) * 0.3)
        .requires_grad_(), teacher=(torch.randn(n, ht, generator=g), torch.randn(vocab, ht, generator=g) * 0.3),
        ref=(torch.randn(n, ht, generator=g), torch.randn(vocab, ht, generator=g) * 0.3), targets=targets,
        mask=torch.rand(n, generator=g) > 0.3, weights=torch.rand(n, generator=g))


def _calls(t, impl):
    """(name, fn returning a scalar loss) for every function, per row and reduced."""
    h, w, teacher, ref, targets, mask, weights = (t[k] for k in ("hidden", "weight", "teacher", "ref", "targets",
                                                                    "mask", "weights"))
    common = dict(impl=impl, chunk_budget_mb=0.004)  # several chunks
    return {
        "logprobs per row": lambda: fused_linear_logprobs(h, w, targets, **common).sum(),
        "logprobs reduced": lambda: fused_linear_logprobs(h, w, targets, weights=weights, **common).loss,
        "divergence per row": lambda: fused_linear_divergence(h, w, *teacher, kind="jsd", mask=mask, **common).sum(),
        "divergence + logps reduced": lambda: fused_linear_divergence(
            h, w, *teacher, mask=mask, targets=targets, weights=weights, logp_weights=-weights, **common).loss,
        "divergence reduced, logps per row": lambda: (lambda r: r.loss + r.logps.sum())(fused_linear_divergence(
            h, w, *teacher, kind="reverse_kl", mask=mask, targets=targets, weights=weights, **common)),
        "advantage reduced": lambda: fused_linear_advantage(h, w, *teacher, *ref, mask=mask, weights=weights,
                                                            **common).loss,
        "advantage per row, no mask": lambda: fused_linear_advantage(h, w, *teacher, *ref, **common).sum(),
    }


@pytest.mark.parametrize("impl", list(BACKENDS))
def test_no_host_sync_in_any_call(impl):
    t = _inputs()
    for name, call in _calls(t, impl).items():
        with _CountOps() as ops:
            loss = call()
            loss.backward()
        syncs = ops.counts.get("_local_scalar_dense", 0)
        assert syncs == 0, f"{impl}, {name}: {syncs} host syncs (aten._local_scalar_dense)"
        assert ops.counts.get("nonzero", 0) <= 1, f"{impl}, {name}: {ops.counts.get('nonzero')} nonzero calls"
        t["hidden"].grad = t["weight"].grad = None


def test_the_counter_sees_a_sync():
    """The test above can fail: the same mode counts one ``.item()`` and one ``bool(tensor)``."""
    with _CountOps() as ops:
        x = torch.ones(3)
        x.sum().item()
        bool(x.any())
    assert ops.counts.get("_local_scalar_dense") == 2
