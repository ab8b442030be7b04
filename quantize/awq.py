"""AWQ (Lin et al., 2023), as AutoAWQ 0.2.9 runs it, with the MoE router kept exact.

Per layer: the inputs of every group of projections are taken from the unquantized layer; for each group a
per-channel scale s is searched on a grid (s = x_mean^a / w_mean^(1-a), a in 0, 1/grid, ...) minimising the error of
the module the group feeds; the scales are folded into the operation before the group (the norm, or v / w3), the
weights are clipped where that lowers their output error (q and k excepted), and quantized with AutoAWQ's
zero-point rule. Groups: q/k/v after the input norm (judged on the attention output); o after v when their shapes
allow (never with grouped-query attention); all experts' w1/w3 after the post-attention norm, judged on the whole
MoE block -- and the router, which reads the same norm, gets the same scales so its logits do not move (AutoAWQ
leaves it reading x/s); each expert's w2 after its w3, on the tokens routed to it.
"""

from __future__ import annotations

import torch

from . import model as arch
from .forward import attention_context, expert_forward, moe_forward, rms_norm, route
from .quantizer import Scheme, fake_quantize, rtn

CLIP_TOKENS = 512        # AutoAWQ's n_sample_token
CLIP_SHRINK = 0.5        # AutoAWQ's max_shrink: clipping thresholds down to half the group maximum
MIN_ROUTED = 1           # below this many routed tokens an expert's w2 is searched on all tokens


def quantize_layer(ctx) -> dict:
    s, spec, w = ctx.settings, ctx.spec, ctx.weights
    scheme = s.scheme
    x = ctx.x
    eps = spec.rms_norm_eps
    # inputs of each group, from the unquantized layer (as AutoAWQ takes them), over all calibration tokens
    h_attn = rms_norm(x, w["input_layernorm.weight"], eps)
    context = torch.cat([attention_context(h_attn[c], w, spec, ctx.rope) for c in ctx.chunks()])
    resid = x + context @ w["self_attn.o_proj.weight"].T
    h_mlp = rms_norm(resid, w["post_attention_layernorm.weight"], eps)
    scales = {}

    def attention_out(h, weights):
        return torch.cat([attention_context(h[c], weights, spec, ctx.rope) @ weights["self_attn.o_proj.weight"].T
                          for c in ctx.chunks()])

    scales["attn"] = search_scale(h_attn, w, arch.ATTENTION_IN, lambda ws: attention_out(h_attn, ws), s)
    if w["self_attn.v_proj.weight"].shape == w["self_attn.o_proj.weight"].shape:
        scales["o"] = search_scale(context, w, arch.ATTENTION_OUT,
                                   lambda ws: context @ ws["self_attn.o_proj.weight"].T, s)
    flat = h_mlp.reshape(-1, h_mlp.shape[-1])
    if spec.is_moe:
        scales["mlp"] = search_scale(flat, w, arch.mlp_in(spec), lambda ws: moe_forward(flat, ws, spec), s)
        _, _, chosen = route(flat, w[f"{arch.ROUTER}.weight"], spec.experts_per_tok)
        down_inputs = {}
        for e in range(spec.num_experts):
            gate, up = arch.expert_in(e)
            tokens = flat[(chosen == e).any(-1)]
            if tokens.shape[0] < MIN_ROUTED:
                tokens = flat
            act = torch.nn.functional.silu(tokens @ w[f"{gate}.weight"].T) * (tokens @ w[f"{up}.weight"].T)
            down = arch.expert_out(e)
            scales[f"down{e}"] = search_scale(act, w, (down,), lambda ws, a=act, d=down: a @ ws[f"{d}.weight"].T, s)
            down_inputs[down] = (act, scales[f"down{e}"])
    else:
        scales["mlp"] = search_scale(flat, w, arch.DENSE_IN, lambda ws: expert_forward(
            flat, ws["mlp.gate_proj.weight"], ws["mlp.up_proj.weight"], ws["mlp.down_proj.weight"]), s)
        act = torch.nn.functional.silu(flat @ w["mlp.gate_proj.weight"].T) * (flat @ w["mlp.up_proj.weight"].T)
        scales["down"] = search_scale(act, w, arch.DENSE_OUT, lambda ws: act @ ws["mlp.down_proj.weight"].T, s)
        down_inputs = {"mlp.down_proj": (act, scales["down"])}

    apply_scales(w, spec, scales, scale_router=s.scale_router)
    if s.clip:
        inputs = {m: h_attn / scales["attn"] for m in arch.ATTENTION_IN}
        inputs["self_attn.o_proj"] = context / scales["o"] if "o" in scales else context
        for m in arch.mlp_in(spec):
            inputs[m] = h_mlp / scales["mlp"]
        for m, (act, sc) in down_inputs.items():
            inputs[m] = act / sc
        for module in arch.linears(spec):
            if module in ("self_attn.q_proj", "self_attn.k_proj"):  # AutoAWQ: q/k feed a product, not clipped
                continue
            w[f"{module}.weight"] = clip(w[f"{module}.weight"], inputs[module], scheme)
    ctx.stats["awq_scale_ratio"] = {k: round(float(v.max() / v.min()), 3) for k, v in scales.items()}
    return {module: rtn(w[f"{module}.weight"], scheme) for module in arch.linears(spec)}


def search_scale(inputs: torch.Tensor, weights: dict, modules: tuple[str, ...], inspect, settings) -> torch.Tensor:
    """The per-input-channel scale for `modules` that minimises the error of `inspect`'s output."""
    scheme: Scheme = settings.scheme
    x_mean = inputs.reshape(-1, inputs.shape[-1]).abs().float().mean(0)
    stacked = torch.cat([weights[f"{m}.weight"] for m in modules], dim=0).float()
    groups = stacked.abs().reshape(-1, scheme.group_size)
    w_mean = (groups / (groups.amax(dim=1, keepdim=True) + 1e-6)).reshape(stacked.shape).mean(0)
    reference = inspect(weights).float()
    best, best_loss = None, float("inf")
    for step in range(settings.grid):
        ratio = step / settings.grid
        if settings.duo_scaling:
            s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1
        trial = dict(weights)
        for m in modules:
            weight = weights[f"{m}.weight"]
            trial[f"{m}.weight"] = (fake_quantize(weight * s.to(weight.dtype), scheme) / s.to(weight.dtype))
        loss = float((reference - inspect(trial).float()).pow(2).mean())
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    if best is None:
        raise RuntimeError(f"AWQ found no finite loss for {', '.join(modules)}")
    return best.to(stacked.device)


def apply_scales(weights: dict, spec, scales: dict[str, torch.Tensor], scale_router: bool = True) -> None:
    """Fold searched scales into the layer: what precedes a group is divided by s, the group multiplied by s,
    the router (never quantized) multiplied too, so the layer computes the same function."""
    def into_columns(module, s):
        weights[f"{module}.weight"] = weights[f"{module}.weight"] * s.to(weights[f"{module}.weight"].dtype)

    def into_rows(module, s):
        weights[f"{module}.weight"] = weights[f"{module}.weight"] / s.to(weights[f"{module}.weight"].dtype)[:, None]

    def into_norm(norm, s):
        weights[f"{norm}.weight"] = weights[f"{norm}.weight"] / s.to(weights[f"{norm}.weight"].dtype)

    if "attn" in scales:
        into_norm("input_layernorm", scales["attn"])
        for m in arch.ATTENTION_IN:
            into_columns(m, scales["attn"])
    if "o" in scales:
        into_rows("self_attn.v_proj", scales["o"])
        into_columns("self_attn.o_proj", scales["o"])
    if "mlp" in scales:
        into_norm("post_attention_layernorm", scales["mlp"])
        for m in arch.mlp_in(spec):
            into_columns(m, scales["mlp"])
        if spec.is_moe and scale_router:
            into_columns(arch.ROUTER, scales["mlp"])
    for e in range(spec.num_experts):
        if f"down{e}" in scales:
            into_rows(arch.expert_in(e)[1], scales[f"down{e}"])
            into_columns(arch.expert_out(e), scales[f"down{e}"])
    if "down" in scales:
        into_rows("mlp.up_proj", scales["down"])
        into_columns("mlp.down_proj", scales["down"])


def clip(weight: torch.Tensor, inputs: torch.Tensor, scheme: Scheme, grid: int = 20) -> torch.Tensor:
    """Clip each group of `weight` to the threshold (down to CLIP_SHRINK of its max) whose quantized output on
    `inputs` is closest to the unquantized one: AutoAWQ's _search_best_clip."""
    out_features, in_features = weight.shape
    group = scheme.group_size
    x = inputs.reshape(-1, in_features).float()
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)].reshape(-1, in_features // group, group)   # [tokens, groups, g]
    w_all = weight.float().reshape(out_features, -1, group)                                   # [out, groups, g]
    batch = 256 if out_features % 256 == 0 else 64 if out_features % 64 == 0 else out_features
    limits = []
    for start in range(0, out_features, batch):
        w = w_all[start:start + batch]
        original_max = w.abs().amax(dim=-1, keepdim=True)                                     # [b, groups, 1]
        best = original_max.clone()
        min_err = torch.full_like(original_max, float("inf"))
        original_out = torch.einsum("tgk,ogk->otg", x, w)
        for step in range(int(CLIP_SHRINK * grid)):
            max_val = original_max * (1 - step / grid)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
            quantized = fake_quantize(clipped.reshape(-1, in_features), scheme).reshape(w.shape)
            err = (torch.einsum("tgk,ogk->otg", x, quantized) - original_out).pow(2).mean(dim=1)[..., None]
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        limits.append(best)
    limit = torch.cat(limits)
    return torch.maximum(torch.minimum(w_all, limit), -limit).reshape(out_features, in_features).to(weight.dtype)
