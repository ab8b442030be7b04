"""AWQ then GPTQ (llm-compressor's AWQModifier followed by its GPTQModifier): AWQ's scales searched and folded
into the layer, its clipping applied, and the scaled weights quantized by GPTQ's solve instead of round-to-nearest,
GPTQ's Hessians taken from the scaled layer's own inputs. The output is either format: the scales live in the
norms and the weights, so the layer a consumer reads is an ordinary one."""

from __future__ import annotations

from . import awq, gptq


def quantize_layer(ctx) -> dict:
    awq.smooth(ctx)
    return gptq.quantize_layer(ctx)
