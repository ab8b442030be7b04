"""GPTQ on a decoder layer, stage by stage: q/k/v, o, the MLP inputs (every expert's w1/w3 from all tokens), then
each down projection. With true-sequential (the default) each stage is calibrated on the outputs of the stages
already quantized; without it, every stage sees the unquantized layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import model as arch
from .forward import attention_context, rms_norm
from .gptq import Hessian, gptq_quantize
from .quantizer import QuantizedWeight


def quantize_layer(ctx) -> dict:
    s, spec, w = ctx.settings, ctx.spec, ctx.weights
    src = w if s.true_sequential else dict(w)   # the weights stage inputs are computed with
    eps = spec.rms_norm_eps
    quantized, losses, damps = {}, {}, {}

    def run(modules, hessian: Hessian) -> None:
        """GPTQ on linears that share one input: rows are independent given H, so they run as one matrix
        (q/k/v together, every expert's w1/w3 together) and are split afterwards."""
        weights = [w[f"{m}.weight"] for m in modules]
        result = gptq_quantize(torch.cat(weights), hessian.value(), s.scheme, s.damp, s.desc_act, s.static_groups,
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

    def attention_in(x):
        return rms_norm(x, src["input_layernorm.weight"], eps)

    hess = Hessian(spec.hidden_size, ctx.x.device)
    for chunk in ctx.chunks():
        hess.add(attention_in(ctx.x[chunk]))
    run(arch.ATTENTION_IN, hess)

    hess = Hessian(spec.num_heads * spec.head_dim, ctx.x.device)
    for chunk in ctx.chunks():
        hess.add(attention_context(attention_in(ctx.x[chunk]), src, spec, ctx.rope))
    run(arch.ATTENTION_OUT, hess)

    hess = Hessian(spec.hidden_size, ctx.x.device)
    mlp_inputs = []
    for chunk in ctx.chunks():
        x = ctx.x[chunk]
        resid = x + attention_context(attention_in(x), src, spec, ctx.rope) @ src["self_attn.o_proj.weight"].T
        mlp_inputs.append(rms_norm(resid, src["post_attention_layernorm.weight"], eps))
        hess.add(mlp_inputs[-1])
    run(arch.mlp_in(spec), hess)   # every expert's w1/w3 from all tokens: one Hessian serves them all

    downs = ([(arch.expert_out(e), *arch.expert_in(e)) for e in range(spec.num_experts)] if spec.is_moe
             else [("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj")])
    for down, gate, up in downs:
        hess = Hessian(spec.intermediate_size, ctx.x.device)
        for h in mlp_inputs:
            hess.add(F.silu(h @ src[f"{gate}.weight"].T) * (h @ src[f"{up}.weight"].T))
        run((down,), hess)
    ctx.stats["gptq_loss"] = losses
    raised = {m: d for m, d in damps.items() if d != s.damp}
    if raised:  # the damping those solves used: more than requested, H was not positive definite with it
        ctx.stats["damp_raised"] = raised
    del mlp_inputs
    return quantized
