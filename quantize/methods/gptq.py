"""GPTQ on a decoder layer, stage by stage in the architecture's order: the linears that read one activation
(q/k/v; o; every expert's w1/w3, from all tokens; each down projection) share one Hessian and are solved as one
matrix. With true-sequential (the default) each stage is calibrated on the outputs of the stages already
quantized; without it, every stage sees the unquantized layer. The experts' down projections depend on nothing
but the gate and up projections, all quantized before them: they are swept together, `ctx.sweep` at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixq.convert.architecture import ATTN_CONTEXT, ATTN_NORM, MLP_NORM, plan

from ..forward import attention_context, rms_norm
from ..gptq_solver import Hessian, Sweep
from ..quantizer import QuantizedWeight

STAGES = (ATTN_NORM, ATTN_CONTEXT, MLP_NORM)   # what the stages before the down projections read


def quantize_layer(ctx) -> dict:
    s, spec, w = ctx.settings, ctx.spec, ctx.weights
    layer_plan = plan(spec)
    src = w if s.true_sequential else dict(w)   # the weights stage inputs are computed with
    eps = spec.rms_norm_eps
    quantized, losses, damps = {}, {}, {}

    def sweep(count: int, modules) -> Sweep:
        rows = sum(layer_plan.shape(m)[0] for m in modules)
        return Sweep(count, (rows, layer_plan.shape(modules[0])[1]), s.scheme, ctx.device, s.damp, s.act_order,
                     s.static_groups, s.block_size)

    def add(batch: Sweep, modules, hessian: Hessian) -> None:
        """Rows are independent given H: linears that share one input are one matrix, split when solved."""
        weight = torch.cat([w[f"{m}.weight"] for m in modules])
        batch.add(weight, hessian.value(), name=f"model.layers.{ctx.index}.{'/'.join(modules)}")
        pending.append(modules)

    def solve(batch: Sweep) -> None:
        for modules, result in zip(pending, batch.solve()):
            start = 0
            for module in modules:
                weight = w[f"{module}.weight"]
                rows = slice(start, start + weight.shape[0])
                start = rows.stop
                part = QuantizedWeight(q=result.weight.q[rows], scales=result.weight.scales[rows],
                                       zeros=result.weight.zeros[rows], g_idx=result.weight.g_idx)
                quantized[module] = part
                losses[module] = round(float(result.losses[rows].sum()), 6)
                damps[module] = round(result.damp, 6)
                ctx.settle(module, part)   # the stages after it read it quantized
        pending.clear()

    pending = []          # the linears of the sweep being filled, in order
    downs = [(reads, modules) for reads, modules in layer_plan.groups.items() if reads not in STAGES]
    mlp_inputs = []   # the post-attention norm's outputs, kept for the down projections' inputs
    for reads, modules in layer_plan.groups.items():
        if reads not in STAGES:
            continue
        hess = Hessian(layer_plan.shape(modules[0])[1], ctx.device)
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
            h = rms_norm(x + context @ src["self_attn.o_proj.weight"].T, src["post_attention_layernorm.weight"], eps)
            hess.add(h)
            mlp_inputs.append(ctx.keep(h))
        batch = sweep(1, modules)
        add(batch, modules, hess)
        del hess
        solve(batch)
    batch = None
    for n, (reads, modules) in enumerate(downs):   # each reads silu(gate(h)) * up(h), from all tokens
        if batch is None:
            batch = sweep(min(ctx.sweep, len(downs) - n), modules)
        gate, up = layer_plan.gate_up(reads)
        hess = Hessian(layer_plan.shape(modules[0])[1], ctx.device)
        for h in mlp_inputs:
            h = h.to(ctx.device)
            hess.add(F.silu(h @ src[f"{gate}.weight"].T) * (h @ src[f"{up}.weight"].T))
        add(batch, modules, hess)
        del hess
        if batch.full:
            solve(batch)
            batch = None
    ctx.stats["gptq_loss"] = losses
    raised = {m: d for m, d in damps.items() if d != s.damp}
    if raised:  # the damping those solves used: more than requested, H was not positive definite with it
        ctx.stats["damp_raised"] = raised
    del mlp_inputs
    return quantized
