"""The engines a config can name, and the one a command without a config uses."""
from __future__ import annotations

from fastdadpo.engine.deepspeed.engine import DeepSpeedEngine
from fastdadpo.engine.interface import Engine

ENGINES = {DeepSpeedEngine.name: DeepSpeedEngine}


def default_engine() -> Engine:
    """DeepSpeed with its defaults (ZeRO-3): what ``fastdadpo generate`` shards models with."""
    return DeepSpeedEngine()
