"""AWQ on a decoder layer, as AutoAWQ 0.2.9 runs it, with the MoE router kept exact.

The inputs of every smoothing group (convert/architecture.py: the linears reading one activation) are taken from
the unquantized layer; each group's scale is searched to minimise the error of the module the group feeds (q/k/v on
the attention output; o on its own output; all experts' w1/w3 on the whole MoE block; each expert's w2 on the
tokens routed to it), folded into the layer (the router, reading the same norm as the experts, gets the same scale
so its logits do not move; AutoAWQ leaves it reading x/s), the weights clipped where that lowers their output error
(q and k excepted), and quantized with AutoAWQ's zero-point rule.
"""

from __future__ import annotations

import torch

from mixq.convert.architecture import ATTN_CONTEXT, ATTN_NORM, MLP_NORM, plan

from ..awq_search import apply_scales, clip, search_scale
from ..forward import attention_context, expert_forward, moe_forward, rms_norm, route
from ..quantizer import rtn

MIN_ROUTED = 1           # below this many routed tokens an expert's w2 is searched on all tokens
UNCLIPPED = ("self_attn.q_proj", "self_attn.k_proj")   # AutoAWQ: q and k feed a product, they are not clipped


def quantize_layer(ctx) -> dict:
    s, spec, w = ctx.settings, ctx.spec, ctx.weights
    layer_plan = plan(spec)
    x, eps = ctx.x, spec.rms_norm_eps
    # inputs of each group, from the unquantized layer (as AutoAWQ takes them), over all calibration tokens
    h_attn = rms_norm(x, w["input_layernorm.weight"], eps)
    context = torch.cat([attention_context(h_attn[c], w, spec, ctx.rope) for c in ctx.chunks()])
    resid = x + context @ w["self_attn.o_proj.weight"].T
    flat = rms_norm(resid, w["post_attention_layernorm.weight"], eps).reshape(-1, spec.hidden_size)
    inputs = {ATTN_NORM: h_attn, ATTN_CONTEXT: context, MLP_NORM: flat}

    def attention_out(ws):
        return torch.cat([attention_context(h_attn[c], ws, spec, ctx.rope) @ ws["self_attn.o_proj.weight"].T
                          for c in ctx.chunks()])

    def mlp_out(ws):
        if spec.is_moe:
            return moe_forward(flat, ws, spec)
        return expert_forward(flat, ws["mlp.gate_proj.weight"], ws["mlp.up_proj.weight"], ws["mlp.down_proj.weight"])

    judged = {ATTN_NORM: attention_out, ATTN_CONTEXT: lambda ws: context @ ws["self_attn.o_proj.weight"].T,
              MLP_NORM: mlp_out}
    chosen = route(flat, w["block_sparse_moe.gate.weight"], spec.experts_per_tok)[2] if spec.is_moe else None
    scales = {}
    for group in layer_plan.smoothings:
        if group.reads not in judged:   # a down projection, on its expert's routed tokens (all when none are)
            (down,) = group.linears
            expert = layer_plan.linear(down).expert
            tokens = flat if expert is None else flat[(chosen == expert).any(-1)]
            if tokens.shape[0] < MIN_ROUTED:
                tokens = flat
            gate, up = layer_plan.gate_up(group.reads)
            act = torch.nn.functional.silu(tokens @ w[f"{gate}.weight"].T) * (tokens @ w[f"{up}.weight"].T)
            inputs[group.reads] = act
            judged[group.reads] = lambda ws, a=act, d=down: a @ ws[f"{d}.weight"].T
        scales[group.key] = search_scale(inputs[group.reads], w, group.linears, judged[group.reads], s)

    apply_scales(w, spec, scales, scale_router=s.scale_router)
    if s.clip:
        seen = dict(inputs)   # what each linear reads once its scale is folded in
        for group in layer_plan.smoothings:
            seen[group.reads] = inputs[group.reads] / scales[group.key]
        for lin in layer_plan.linears:
            if lin.module not in UNCLIPPED:
                w[f"{lin.module}.weight"] = clip(w[f"{lin.module}.weight"], seen[lin.reads], s.scheme)
    ctx.stats["awq_scale_ratio"] = {k: round(float(v.max() / v.min()), 3) for k, v in scales.items()}
    return {module: rtn(w[f"{module}.weight"], s.scheme) for module in layer_plan.modules}
