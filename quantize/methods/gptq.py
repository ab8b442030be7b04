"""GPTQ on a decoder layer, stage by stage in the architecture's order: the linears that read one activation
(q/k/v; o; every expert's w1/w3, from all tokens; each down projection) share one Hessian and are solved as one
matrix. With true-sequential (the default) each stage is calibrated on the outputs of the stages already
quantized; without it, every stage sees the unquantized layer. The experts' down projections depend on nothing
but the gate and up projections, all quantized before them: they are swept together, `ctx.sweep` at a time.
With GPTAQ each Hessian comes with the cross products of its inputs and the unquantized model's (ctx.x_ref)."""

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
                     s.static_groups, s.block_size, s.refit)

    def add(batch: Sweep, modules, hessian: Hessian) -> None:
        """Rows are independent given H: linears that share one input are one matrix, split when solved."""
        weight = torch.cat([w[f"{m}.weight"] for m in modules])
        batch.add(weight, hessian.value(), name=f"model.layers.{ctx.index}.{'/'.join(modules)}",
                  cross=hessian.cross())
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

    def stage_input(x, ws, reads):
        """What the stage reading `reads` sees of layer inputs x, computed with the weights ws."""
        h = rms_norm(x, ws["input_layernorm.weight"], eps)
        if reads == ATTN_NORM:
            return h
        context = attention_context(h, ws, spec, ctx.rope)
        if reads == ATTN_CONTEXT:
            return context
        return rms_norm(x + context @ ws["self_attn.o_proj.weight"].T, ws["post_attention_layernorm.weight"], eps)

    def down_input(h, ws, reads):
        gate, up = layer_plan.gate_up(reads)
        return F.silu(h @ ws[f"{gate}.weight"].T) * (h @ ws[f"{up}.weight"].T)

    # GPTAQ: the same stages as the unquantized model computes them, from its own inputs and this layer's weights
    # before any is quantized (AWQ's scales, where they were folded in, included: the inputs must match X~'s axes)
    reference = dict(w) if ctx.x_ref is not None else None
    pending = []          # the linears of the sweep being filled, in order
    downs = [(reads, modules) for reads, modules in layer_plan.groups.items() if reads not in STAGES]
    mlp_inputs, mlp_references = [], []   # the post-attention norm's outputs, for the down projections' inputs
    for reads, modules in layer_plan.groups.items():
        if reads not in STAGES:
            continue
        hess = Hessian(layer_plan.shape(modules[0])[1], ctx.device, cross=reference is not None)
        for chunk in ctx.chunks():
            seen = stage_input(ctx.inputs(chunk), src, reads)
            meant = stage_input(ctx.reference_inputs(chunk), reference, reads) if reference is not None else None
            hess.add(seen, meant)
            if reads == MLP_NORM:
                mlp_inputs.append(ctx.keep(seen))
                if meant is not None:
                    mlp_references.append(ctx.keep(meant))
        batch = sweep(1, modules)
        add(batch, modules, hess)
        del hess
        solve(batch)
    batch = None
    for n, (reads, modules) in enumerate(downs):   # each reads silu(gate(h)) * up(h), from all tokens
        if batch is None:
            batch = sweep(min(ctx.sweep, len(downs) - n), modules)
        hess = Hessian(layer_plan.shape(modules[0])[1], ctx.device, cross=reference is not None)
        for i, h in enumerate(mlp_inputs):
            meant = down_input(mlp_references[i].to(ctx.device), reference, reads) if reference is not None else None
            hess.add(down_input(h.to(ctx.device), src, reads), meant)
        add(batch, modules, hess)
        del hess
        if batch.full:
            solve(batch)
            batch = None
    ctx.stats["gptq_loss"] = losses
    raised = {m: d for m, d in damps.items() if d != s.damp}
    if raised:  # the damping those solves used: more than requested, H was not positive definite with it
        ctx.stats["damp_raised"] = raised
    del mlp_inputs, mlp_references
    return quantized
