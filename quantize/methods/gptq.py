"""GPTQ on a decoder layer, stage by stage in the architecture's order: the linears that read one activation
(q/k/v; o; every expert's w1/w3, from all tokens; each down projection) share one Hessian and are solved as one
matrix. With true-sequential (the default) each stage is calibrated on the outputs of the stages already
quantized; without it, every stage sees the unquantized layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.convert.architecture import ATTN_CONTEXT, ATTN_NORM, MLP_NORM, plan

from ..forward import attention_context, rms_norm
from ..gptq_solver import Hessian, gptq_quantize
from ..quantizer import QuantizedWeight


def quantize_layer(ctx) -> dict:
    s, spec, w = ctx.settings, ctx.spec, ctx.weights
    layer_plan = plan(spec)
    src = w if s.true_sequential else dict(w)   # the weights stage inputs are computed with
    eps = spec.rms_norm_eps
    quantized, losses, damps = {}, {}, {}

    def run(modules, hessian: Hessian) -> None:
        """GPTQ on linears that share one input: rows are independent given H, so they run as one matrix and are
        split afterwards."""
        weights = [w[f"{m}.weight"] for m in modules]
        result = gptq_quantize(torch.cat(weights), hessian.value(), s.scheme, s.damp, s.act_order, s.static_groups,
                               s.block_size, name=f"model.layers.{ctx.index}.{'/'.join(modules)}")
        start = 0
        for module, weight in zip(modules, weights):
            rows = slice(start, start + weight.shape[0])
            start = rows.stop
            part = QuantizedWeight(q=result.weight.q[rows], scales=result.weight.scales[rows],
                                   zeros=result.weight.zeros[rows], g_idx=result.weight.g_idx)
            quantized[module] = part
            losses[module] = round(float(result.losses[rows].sum()), 6)
            damps[module] = round(result.damp, 6)
            w[f"{module}.weight"] = part.dequantize(weight.dtype).to(weight.device)

    mlp_inputs = []   # the post-attention norm's outputs, kept for the down projections' inputs
    for reads, modules in layer_plan.groups.items():
        hess = Hessian(layer_plan.shape(modules[0])[1], ctx.device)
        if reads in (ATTN_NORM, ATTN_CONTEXT, MLP_NORM):
            for chunk in ctx.chunks():
                x = ctx.inputs(chunk)
                h = rms_norm(x, src["input_layernorm.weight"], eps)
                if reads == ATTN_NORM:
                    hess.add(h)
                    continue
                context = attention_context(h, src, spec, ctx.rope)
                if reads == ATTN_CONTEXT:
                    hess.add(context)
                    continue
                h = rms_norm(x + context @ src["self_attn.o_proj.weight"].T, src["post_attention_layernorm.weight"],
                             eps)
                hess.add(h)
                mlp_inputs.append(ctx.keep(h))
        else:   # a down projection reads silu(gate(h)) * up(h), from all tokens
            gate, up = layer_plan.gate_up(reads)
            for h in mlp_inputs:
                h = h.to(ctx.device)
                hess.add(F.silu(h @ src[f"{gate}.weight"].T) * (h @ src[f"{up}.weight"].T))
        run(modules, hess)
    ctx.stats["gptq_loss"] = losses
    raised = {m: d for m, d in damps.items() if d != s.damp}
    if raised:  # the damping those solves used: more than requested, H was not positive definite with it
        ctx.stats["damp_raised"] = raised
    del mlp_inputs
    return quantized
