"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's error over the
columns not yet quantized through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.convert.errors import MixqError

from .quantizer import QuantizedWeight, Scheme, codes, group_params


class Hessian:
    """H = 2/n * sum(x x^T) over the n input rows seen, accumulated in fp32 on the inputs' device."""

    def __init__(self, columns: int, device):
        self.h = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.T, x)
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.rows == 0:
            return self.h.clone()
        return self.h * (2.0 / self.rows)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    losses: torch.Tensor  # per row: sum over columns of (w - q)^2 / Hinv_ii^2 / 2, GPTQ's own error measure
    damp: float           # the damping that made H positive definite

    @property
    def loss(self) -> float:
        return float(self.losses.sum())


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping, raising the damping until H is positive definite."""
    mean_diag = torch.mean(torch.diag(h))
    eye = torch.arange(h.shape[0], device=h.device)
    while damp < 1.0:
        damped = h.clone()
        damped[eye, eye] += damp * mean_diag
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper, damp
        damp += 0.01
    raise MixqError(f"{name}: the Hessian is not positive definite even with damping 1.0")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                  name: str = "") -> GPTQResult:
    w = weight.float().clone()
    h = hessian.float().clone()
    rows, cols = w.shape
    group = scheme.group_size
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = None
    if static_groups:  # parameters of each group from the weights before any update, in column order
        static = [group_params(w[:, g:g + group], scheme) for g in range(0, cols, group)]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = _inverse_cholesky(h, damp, name)
    q = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    n_groups = cols // group
    scales = torch.zeros(rows, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.zeros(rows, n_groups, dtype=torch.float32, device=w.device)
    g_idx = torch.zeros(cols, dtype=torch.int64, device=w.device)
    losses = torch.zeros(rows, device=w.device)
    block_size = max(block_size, group) // group * group  # groups never straddle blocks
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            original = int(perm[col]) if perm is not None else col
            if static is not None:
                gid = original // group
                scale, zero = static[gid]
            else:
                gid = col // group
                if col % group == 0:
                    scale, zero = group_params(w1[:, i:i + group], scheme)
                    scales[:, gid], zeros[:, gid] = scale[:, 0], zero[:, 0]
            g_idx[original] = gid
            column = w1[:, i]
            c = codes(column[:, None], scale, zero, scheme.maxq)
            q[:, col] = c[:, 0].to(torch.uint8)
            dequant = ((c - zero) * scale)[:, 0]
            d = hinv1[i, i]
            losses += (column - dequant) ** 2 / d ** 2 / 2
            e = (column - dequant) / d
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if static is not None:
        for gid, (s, z) in enumerate(static):
            scales[:, gid], zeros[:, gid] = s[:, 0], z[:, 0]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    result = QuantizedWeight(q=q, scales=scales.half(), zeros=zeros.to(torch.int32), g_idx=g_idx.to(torch.int32))
    return GPTQResult(result, losses, damp)
