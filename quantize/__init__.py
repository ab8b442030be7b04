"""The quantization engine: layer streaming, round-to-nearest, GPTQ, AWQ, and the AWQ-GEMM / GPTQ formats."""

from .quantizer import Scheme
from .runner import Settings, quantize_model

__all__ = ["Scheme", "Settings", "quantize_model"]

from mixq.api import callable_package  # noqa: E402

callable_package(__name__, "quantize")  # mixq.quantize(...) is mixq.api.quantize(...)
