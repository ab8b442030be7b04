"""Round-to-nearest: every linear quantized on its own weights, no calibration."""

from __future__ import annotations

from mixq.convert.architecture import plan

from ..quantizer import rtn


def quantize_layer(ctx) -> dict:
    return {module: rtn(ctx.w(module), ctx.settings.scheme) for module in plan(ctx.spec).modules}
