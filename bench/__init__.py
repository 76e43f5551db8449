"""fastdadpo's benchmark suites (pytest-benchmark): the fused kernels against the materialized
reference and the peers (Liger-Kernel, Cut Cross-Entropy), and a `fastdadpo train` step against the
same step with materialized logits. See bench/README.md for the commands.

A package so that the memory probes (fresh processes, see ``bench.memory``) can import
``bench.registry`` by name.
"""
