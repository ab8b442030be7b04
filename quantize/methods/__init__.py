"""The quantization methods, one module each, every one a `quantize_layer(ctx) -> {module: QuantizedWeight}` over
the layer context the engine hands it (runner.LayerContext): round-to-nearest, GPTQ, AWQ, and AWQ's scales with
GPTQ's solve (awq_gptq, runner.Settings.engine)."""

from __future__ import annotations

import importlib

from mixq.convert.errors import MixqError

METHODS = ("rtn", "gptq", "awq", "awq_gptq")


def layer_method(name: str):
    """The method's quantize_layer, imported when first asked for (AWQ and GPTQ pull in their solvers)."""
    if name not in METHODS:
        raise MixqError(f"unknown method {name!r} (choose from {', '.join(METHODS)})")
    return importlib.import_module(f"{__name__}.{name}").quantize_layer
