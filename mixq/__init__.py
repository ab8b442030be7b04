"""mixq: Mixtral-family checkpoints converted, quantized and checked.

The Python API (mixq.api): mixq.convert(...), mixq.quantize(...), mixq.check(...), mixq.prepare_calibration(...);
the subpackages mixq.convert, mixq.quantize and mixq.calibration hold the machinery.
"""

import importlib

from .api import check, prepare_calibration

__version__ = "0.1.0"
__all__ = ["check", "convert", "prepare_calibration", "quantize"]


def __getattr__(name: str):
    """The subpackages load on first use (they import torch): `mixq.convert` is both the package and, callable,
    the conversion function."""
    if name in ("convert", "quantize", "calibration"):
        return importlib.import_module(f"mixq.{name}")
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")
