"""The core: data rows, tokenization, batches and their layout, the sampler, and the objectives with
what each declares it needs. Built on the kernels and ``fastdadpo.base`` only: no model loading, no
engine."""
