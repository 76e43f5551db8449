"""PyTorch FSDP2 behind ``fastdadpo.engine.interface``: ``engine: fsdp2``."""
