"""AWQ on a decoder layer, as AutoAWQ 0.2.9 runs it, with the MoE router kept exact.

The inputs of every smoothing group (convert/architecture.py: the linears reading one activation) are taken from
the unquantized layer, a chunk of calibration samples at a time, kept where the engine keeps the activations (and
cut to the rows the clip search samples once their group is searched); each group's scale is searched to minimise
the error of the module the group feeds (q/k/v on the attention output; o on its own output; all experts' w1/w3 on
the whole MoE block; each expert's w2 on the tokens routed to it), folded into the layer (the router, reading the
same norm as the experts, gets the same scale so its logits do not move; AutoAWQ leaves it reading x/s), the weights
clipped where that lowers their output error (q and k excepted), and quantized with AutoAWQ's zero-point rule.
"""

from __future__ import annotations

import torch

from mixq.convert.architecture import ATTN_CONTEXT, ATTN_NORM, MLP_NORM, plan

from ..awq_search import apply_scales, clip, clip_rows, group_gram, search_scale
from ..forward import attention_context, expert_forward, moe_forward, rms_norm, route
from ..quantizer import rtn

MIN_ROUTED = 1           # below this many routed tokens an expert's w2 is searched on all tokens
UNCLIPPED = ("self_attn.q_proj", "self_attn.k_proj")   # AutoAWQ: q and k feed a product, they are not clipped


def quantize_layer(ctx) -> dict:
    smooth(ctx)
    return {module: rtn(ctx.w(module), ctx.settings.scheme) for module in plan(ctx.spec).modules}


def smooth(ctx) -> None:
    """AWQ up to its last step: the scales searched and folded into `ctx.weights`, the weights clipped; what is
    left is to quantize them (round-to-nearest here, GPTQ's solve for --awq-gptq)."""
    s, spec, w = ctx.settings, ctx.spec, ctx.weights
    layer_plan = plan(spec)
    eps, device = spec.rms_norm_eps, ctx.device
    o_proj = "self_attn.o_proj.weight"
    # inputs of each group, from the unquantized layer (as AutoAWQ takes them), a chunk at a time, kept at home
    inputs = {ATTN_NORM: [], ATTN_CONTEXT: [], MLP_NORM: []}
    chosen = []   # each chunk's routed experts [tokens, k]
    for c in ctx.chunks():
        x = ctx.inputs(c)
        h = rms_norm(x, w["input_layernorm.weight"], eps)
        context = attention_context(h, w, spec, ctx.rope)
        flat = rms_norm(x + context @ w[o_proj].T, w["post_attention_layernorm.weight"], eps).reshape(-1, x.shape[-1])
        for reads, value in ((ATTN_NORM, h), (ATTN_CONTEXT, context), (MLP_NORM, flat)):
            inputs[reads].append(ctx.keep(value))
        if spec.is_moe:
            chosen.append(ctx.keep(route(flat, w["block_sparse_moe.gate.weight"], spec.experts_per_tok)[2]))
        del x, h, context, flat

    def mlp_out(ws, flat):
        if spec.is_moe:
            return moe_forward(flat, ws, spec)
        return expert_forward(flat, ws["mlp.gate_proj.weight"], ws["mlp.up_proj.weight"], ws["mlp.down_proj.weight"])

    # what judges each group's trials; None: the group's one linear, by its own output
    judged = {ATTN_NORM: lambda ws, h: attention_context(h, ws, spec, ctx.rope) @ ws[o_proj].T,
              ATTN_CONTEXT: None, MLP_NORM: mlp_out}
    scales = {}
    for group in layer_plan.smoothings:
        if group.reads not in judged:   # a down projection, on its expert's routed tokens (all when none are)
            (down,) = group.linears
            expert = layer_plan.linear(down).expert
            gate, up = (w[f"{m}.weight"] for m in layer_plan.gate_up(group.reads))
            routed = [(chosen[i] == expert).any(-1) for i in range(len(chosen))] if expert is not None else []
            use_all = expert is None or sum(int(r.sum()) for r in routed) < MIN_ROUTED
            acts = []
            for i, flat in enumerate(inputs[MLP_NORM]):
                tokens = flat.to(device) if use_all else flat[routed[i]].to(device)
                if tokens.shape[0]:
                    acts.append(ctx.keep(torch.nn.functional.silu(tokens @ gate.T) * (tokens @ up.T)))
            inputs[group.reads] = acts
            judged[group.reads] = None
        scales[group.key] = search_scale(inputs[group.reads], w, group.linears, judged[group.reads], s, device)
        if group.reads != MLP_NORM:   # only the clip search reads these again, from the rows it samples
            inputs[group.reads] = [ctx.keep(clip_rows(inputs[group.reads], device))]
    inputs[MLP_NORM] = [ctx.keep(clip_rows(inputs[MLP_NORM], device))]

    apply_scales(w, spec, scales, scale_router=s.scale_router)
    if s.clip:   # sampling the sampled rows again takes them all: what each linear reads once scaled
        seen = {reads: clip_rows(rows, device) for reads, rows in inputs.items()}
        for group in layer_plan.smoothings:
            seen[group.reads] = seen[group.reads] / scales[group.key]
        grams = {}     # one per input, shared by the linears that read it (every w1 and w3)
        for lin in layer_plan.linears:
            if lin.module not in UNCLIPPED:
                if lin.reads not in grams:
                    grams[lin.reads] = group_gram(seen[lin.reads], s.scheme.group_size)
                w[f"{lin.module}.weight"] = clip(w[f"{lin.module}.weight"], grams[lin.reads], s.scheme)
    ctx.stats["awq_scale_ratio"] = {k: round(float(v.max() / v.min()), 3) for k, v in scales.items()}
