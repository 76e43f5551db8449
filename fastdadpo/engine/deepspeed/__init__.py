"""DeepSpeed ZeRO behind ``fastdadpo.engine.interface``: every DeepSpeed name of the project is in
this package."""
