"""The engine layer: the one interface the training loop talks to (``interface``), checkpoints and
state files every engine writes the same way, and the engines behind it (``deepspeed``)."""
