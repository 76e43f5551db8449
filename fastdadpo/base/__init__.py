"""The ground floor above the kernels: user errors, files written whole, the content-addressed
cache, YAML files, and the collectives every layer above may call. Nothing here knows a model, a
config or an engine."""
