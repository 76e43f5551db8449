"""Models: loading causal LMs and reaching their hidden states and LM head, the shared vocabulary,
LoRA, sampling, pruning, and a model directory's fingerprint. Nothing here knows a distributed
engine: one that shards weights passes its loading context in."""
