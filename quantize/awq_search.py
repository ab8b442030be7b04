"""AWQ's searches (Lin et al., 2023, as AutoAWQ 0.2.9 runs them): the per-channel scale of a group of linears that
read one activation, folding that scale into the layer without changing its function, and the clipping threshold
of each weight group. The layer-by-layer flow that feeds them is methods/awq.py.
"""

from __future__ import annotations

import torch

from mixq.convert.architecture import plan

from .quantizer import Scheme, as_searched_by_minmax, fake_quantize

CLIP_TOKENS = 512        # AutoAWQ's n_sample_token
CLIP_SHRINK = 0.5        # AutoAWQ's max_shrink: clipping thresholds down to half the group maximum
CLIP_BATCH_BYTES = 2 ** 23   # fp32 weights searched at once (each step holds a few copies of them)


def search_scale(chunks: list[torch.Tensor], weights: dict, modules: tuple[str, ...], inspect, settings,
                 device) -> torch.Tensor:
    """The per-input-channel scale for `modules` that minimises the mean squared error of `inspect`'s output.

    `chunks` are the group's inputs a chunk at a time (wherever they live; each is brought to `device` when used)
    and `inspect(weights, chunk)` the output of the module the group feeds on one chunk, so the working set is one
    chunk whatever the calibration size; the unquantized outputs are kept beside their chunks. `inspect` None: the
    group is one linear judged by its own output (o_proj after v, each expert's w2), whose error is a quadratic form
    of its weight error (own_output_loss), so the grid never runs it over the tokens."""
    scheme: Scheme = as_searched_by_minmax(settings.scheme)
    rows = sum(c.reshape(-1, c.shape[-1]).shape[0] for c in chunks)
    x_mean = sum(c.to(device).reshape(-1, c.shape[-1]).abs().float().sum(0) for c in chunks) / rows
    stacked = torch.cat([weights[f"{m}.weight"] for m in modules], dim=0).float()
    groups = stacked.abs().reshape(-1, scheme.group_size)
    w_mean = (groups / (groups.amax(dim=1, keepdim=True) + 1e-6)).reshape(stacked.shape).mean(0)
    del stacked, groups
    if inspect is None:
        (module,) = modules
        loss_of = own_output_loss(chunks, weights, f"{module}.weight", settings.grid, device)
    else:
        loss_of = output_loss(chunks, weights, inspect, device)
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
            trial[f"{m}.weight"] = fake_quantize(weight * s.to(weight.dtype), scheme).div_(s.to(weight.dtype))
        loss = loss_of(trial)
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    if best is None:
        raise RuntimeError(f"AWQ found no finite loss for {', '.join(modules)}")
    return best


def output_loss(chunks: list[torch.Tensor], weights: dict, inspect, device):
    """trial weights -> the mean squared difference of `inspect`'s output from the unquantized one, over the chunks:
    AutoAWQ's loss, one forward of the inspected module per chunk and trial."""
    reference = [inspect(weights, c.to(device)).float().to(c.device) for c in chunks]

    def loss(trial: dict) -> float:
        total = count = 0
        for c, ref in zip(chunks, reference):
            out = inspect(trial, c.to(device)).float()
            total += float((ref.to(device) - out).pow(2).sum())
            count += out.numel()
        return total / count
    return loss


def own_output_loss(chunks: list[torch.Tensor], weights: dict, key: str, trials: int, device):
    """output_loss for the linear `key` judged by its own output, as a quadratic form: over the tokens X,
    |X W^T - X Q^T|^2 = sum((Q - W) G * (Q - W)) with G = X^T X, taken once; the search then costs
    tokens x in^2 + trials x out x in^2 products instead of (trials + 1) x tokens x in x out (Mixtral's w2 at
    128 x 2048 tokens, 65k routed tokens against 14336 columns, 20 trials: 2.7x fewer), and the error is formed from
    the weights, without the cancellation of subtracting two outputs. Where that costs more (few tokens), the
    outputs are compared as output_loss does."""
    rows = sum(c.reshape(-1, c.shape[-1]).shape[0] for c in chunks)
    out_features, in_features = weights[key].shape
    if (rows + trials * out_features) * in_features >= (trials + 1) * rows * out_features:
        return output_loss(chunks, weights, lambda ws, c: c @ ws[key].T, device)
    gram = 0
    for c in chunks:
        x = c.to(device).reshape(-1, c.shape[-1]).float()
        gram = gram + x.T @ x
    original = weights[key].float()

    def loss(trial: dict) -> float:
        d = trial[key].float() - original
        return float(((d @ gram) * d).sum()) / (rows * out_features)
    return loss


def clip_rows(chunks: list[torch.Tensor], device) -> torch.Tensor:
    """Every (rows // CLIP_TOKENS)-th row of the chunks' rows taken together, on `device`: the tokens AutoAWQ's
    clip search samples from all of them."""
    rows = sum(c.reshape(-1, c.shape[-1]).shape[0] for c in chunks)
    step = max(1, rows // CLIP_TOKENS)
    picked, offset = [], 0
    for c in chunks:
        flat = c.reshape(-1, c.shape[-1])
        picked.append(flat[(-offset) % step::step].to(device))
        offset += flat.shape[0]
    return torch.cat(picked)


def apply_scales(weights: dict, spec, scales: dict[str, torch.Tensor], scale_router: bool = True) -> None:
    """Fold searched scales (by smoothing key) into the layer: what precedes a group is divided by s, the group
    multiplied by s, the router (never quantized) multiplied too unless told not to, so the layer computes the same
    function."""
    def fold(name: str, s: torch.Tensor, into: str) -> None:
        w = weights[f"{name}.weight"]
        s = s.to(w.dtype)
        weights[f"{name}.weight"] = w * s if into == "columns" else w / s[:, None] if into == "rows" else w / s

    for group in plan(spec).smoothings:
        if group.key not in scales:
            continue
        fold(group.before, scales[group.key], group.into)
        for module in group.linears + (group.also if scale_router else ()):
            fold(module, scales[group.key], "columns")


def group_gram(inputs: torch.Tensor, group: int) -> torch.Tensor:
    """G = X^T X / T per group of input columns [groups, g, g] of the rows clip_rows sampled: what clip reads of
    them (one for all the linears that read the same rows: every expert's w1 and w3)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    x = x.reshape(x.shape[0], -1, group).transpose(0, 1)                     # [groups, tokens, g]
    return x.transpose(1, 2) @ x / x.shape[1]


def clip(weight: torch.Tensor, gram: torch.Tensor, scheme: Scheme, grid: int = 20) -> torch.Tensor:
    """Clip each group of `weight` to the threshold (down to CLIP_SHRINK of its max) whose quantized output on the
    rows `gram` was formed from (group_gram) is closest to the unquantized one: AutoAWQ's _search_best_clip.

    A group's output error over the tokens is a quadratic form of its weight error d: mean_t (x_t . d)^2 =
    d^T G d, so every threshold costs g products per weight instead of one per token (4x fewer at 512 tokens,
    group 128), without the cancellation of subtracting two outputs."""
    out_features, in_features = weight.shape
    group = scheme.group_size
    scheme = as_searched_by_minmax(scheme)
    w_all = weight.float().reshape(out_features, -1, group)                  # [out, groups, g]
    batch = max(1, CLIP_BATCH_BYTES // (4 * in_features))   # rows at a time: a few temporaries of this size
    limits = []
    for start in range(0, out_features, batch):
        w = w_all[start:start + batch]
        original_max = w.abs().amax(dim=-1, keepdim=True)                     # [b, groups, 1]
        best = original_max.clone()
        min_err = torch.full_like(original_max, float("inf"))
        for step in range(int(CLIP_SHRINK * grid)):
            max_val = original_max * (1 - step / grid)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
            d = (fake_quantize(clipped.reshape(-1, in_features), scheme).reshape(w.shape) - w).transpose(0, 1)
            err = ((d @ gram) * d).sum(-1).transpose(0, 1)[..., None]         # [b, groups, 1]
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        limits.append(best)
    limit = torch.cat(limits)
    return torch.maximum(torch.minimum(w_all, limit), -limit).reshape(out_features, in_features).to(weight.dtype)
