"""mixq: Mixtral-family checkpoints converted, quantized and checked."""

__version__ = "0.1.0"
