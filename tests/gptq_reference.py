"""GPTQ as the paper writes it (Frantar et al., 2022, Algorithm 1 with AutoGPTQ's act-order and static groups), in
float64, one column at a time, every update applied at once: the oracle the engine's blocked, batched fp32 solver
is held to. Only the quantization grid (group parameters and codes) is mixq's own, tested on its own."""

import torch

from mixq.quantize.quantizer import Scheme, codes, group_params


def gptq_reference(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, damp: float = 0.01, act_order: bool = False,
                   static_groups: bool = False) -> tuple[torch.Tensor, float]:
    """(codes [rows, cols] in the original column order, GPTQ's loss: sum of err^2 / 2)."""
    w, h = w.double().clone(), h.double().clone()
    rows, cols = w.shape
    group = scheme.group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = [group_params(w[:, g:g + group].float(), scheme) for g in range(0, cols, group)]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(rows, cols)
    loss = 0.0
    for j in range(cols):
        if static_groups:
            scale, zero = static[int(perm[j]) // group]
        elif j % group == 0:
            scale, zero = group_params(w[:, j:j + group].float(), scheme)
        column = w[:, j:j + 1].float()
        c = codes(column, scale, zero, scheme.maxq)
        q[:, j] = c[:, 0]
        err = (w[:, j] - ((c - zero) * scale)[:, 0].double()) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
        loss += float(err.pow(2).sum()) / 2
    out = torch.empty_like(q)
    out[:, perm] = q
    return out, loss
