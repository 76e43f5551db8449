"""A helper the kernel tests share: run a kernel function on fresh leaves and backpropagate given
upstream gradients, so every backend is compared with the float64 reference the same way."""


from fastdadpo.kernels import Reduced


def run_with_grads(fn, leaves64, upstreams, dtype):
    """``fn`` on copies of ``leaves64`` in ``dtype`` (each requiring grad); the loss is
    Σ out·upstream over its outputs. Returns (the outputs, each leaf's gradient).

    A reduced call (``fn`` returns ``Reduced``, its weights the upstreams) is its own loss, plus
    Σ logps·upstream of log-probs it left per row."""
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in leaves64]
    out = fn(*leaves)
    if isinstance(out, Reduced):
        outs = (out.values,) + (() if out.logps is None else (out.logps,))
        loss = out.loss.double()
        if out.logps is not None and out.logps.requires_grad:
            loss = loss + (out.logps.double() * upstreams[1]).sum()
        loss.backward()
        return outs, [leaf.grad for leaf in leaves]
    outs = out if isinstance(out, tuple) else (out,)
    sum((o.double() * u).sum() for o, u in zip(outs, upstreams)).backward()
    return outs, [leaf.grad for leaf in leaves]
