"""A helper the kernel tests share: run a kernel function on fresh leaves and backpropagate given
upstream gradients, so every backend is compared with the float64 reference the same way."""


def run_with_grads(fn, leaves64, upstreams, dtype):
    """``fn`` on copies of ``leaves64`` in ``dtype`` (each requiring grad); the loss is
    Σ out·upstream over its outputs. Returns (the outputs, each leaf's gradient)."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in leaves64]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum((o.double() * u).sum() for o, u in zip(outs, upstreams)).backward()
    return outs, [leaf.grad for leaf in leaves]
