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


class Sweep:
    """GPTQ on up to `count` matrices of one shape, each with its own Hessian, swept together: one column loop for
    all of them (Mixtral's eight down projections: 14336 column steps per layer instead of 8 x 14336).

    `add` prepares one matrix (dead columns, the static groups' parameters, the act-order permutation, the damped
    inverse Cholesky factor, raising the damping until H is positive definite) and frees its Hessian; `solve` runs
    the column loop on all of them at once. Every step is elementwise or a matrix product per matrix, so a matrix
    gets the same codes whether it is swept alone or with others (a test holds the batched path to that)."""

    def __init__(self, count: int, shape: tuple[int, int], scheme: Scheme, device, damp: float = 0.01,
                 act_order: bool = False, static_groups: bool = False, block_size: int = 128):
        rows, cols = shape
        self.scheme, self.damp, self.act_order, self.static_groups = scheme, damp, act_order, static_groups
        self.block_size = max(block_size, scheme.group_size) // scheme.group_size * scheme.group_size
        self.w = torch.empty(count, rows, cols, dtype=torch.float32, device=device)
        self.hinv = torch.empty(count, cols, cols, dtype=torch.float32, device=device)
        groups = cols // scheme.group_size
        self.perm = torch.empty(count, cols, dtype=torch.int64, device=device) if act_order else None
        self.static = tuple(torch.empty(count, rows, groups, device=device) for _ in "sz") if static_groups else None
        self.damps: list[float] = []

    def __len__(self) -> int:
        return len(self.damps)

    @property
    def full(self) -> bool:
        return len(self) == self.w.shape[0]

    def add(self, weight: torch.Tensor, hessian: torch.Tensor, name: str = "") -> None:
        """Prepare `weight` [rows, cols] with `hessian` [cols, cols] (taken over: modified in place)."""
        i = len(self)
        w = self.w[i]
        w.copy_(weight)
        h = hessian if hessian.dtype == torch.float32 else hessian.float()
        rows, cols = w.shape
        group = self.scheme.group_size
        dead = torch.diag(h) == 0
        h.diagonal()[dead] = 1
        w[:, dead] = 0
        if self.static is not None:  # parameters of each group from the weights before any update, in column order
            scale, zero = group_params(w.reshape(rows * (cols // group), group), self.scheme)
            self.static[0][i], self.static[1][i] = scale.view(rows, -1), zero.view(rows, -1)
        if self.perm is not None:
            perm = torch.argsort(torch.diag(h), descending=True)
            self.perm[i] = perm
            w.copy_(w[:, perm])
            h = h[perm[:, None], perm]
        upper, damp = _inverse_cholesky(h, self.damp, name)
        self.hinv[i] = upper
        self.damps.append(damp)

    def solve(self) -> list[GPTQResult]:
        n = len(self)
        w, hinv, scheme = self.w[:n], self.hinv[:n], self.scheme
        _, rows, cols = w.shape
        group, maxq = scheme.group_size, scheme.maxq
        perm = self.perm[:n] if self.perm is not None else None
        q = torch.empty(n, rows, cols, dtype=torch.uint8, device=w.device)
        if self.static is not None:
            scales, zeros = self.static[0][:n], self.static[1][:n]
        else:
            scales = torch.zeros(n, rows, cols // group, device=w.device)
            zeros = torch.zeros_like(scales)
        losses = torch.zeros(n, rows, device=w.device)
        for i1 in range(0, cols, self.block_size):
            i2 = min(i1 + self.block_size, cols)
            w1 = w[:, :, i1:i2].clone()
            err1 = torch.zeros_like(w1)
            codes1 = torch.empty_like(w1)
            hinv1 = hinv[:, i1:i2, i1:i2]
            diag = hinv1.diagonal(dim1=1, dim2=2)[..., None]              # [n, k, 1]
            if self.static is not None:   # each column's group, in the original order, per matrix
                gid = (perm[:, i1:i2] if perm is not None else torch.arange(i1, i2, device=w.device).expand(n, -1))
                gid = (gid // group)[:, None, :].expand(n, rows, -1)
                block_scales, block_zeros = scales.gather(2, gid), zeros.gather(2, gid)
            for i in range(i2 - i1):
                col = i1 + i
                if self.static is not None:
                    scale, zero = block_scales[:, :, i], block_zeros[:, :, i]
                elif col % group == 0:
                    scale, zero = group_params(w1[:, :, i:i + group].reshape(n * rows, group), scheme)
                    scale, zero = scale.view(n, rows), zero.view(n, rows)
                    scales[:, :, col // group], zeros[:, :, col // group] = scale, zero
                column = w1[:, :, i]
                c = codes(column, scale, zero, maxq)
                codes1[:, :, i] = c
                e = (column - (c - zero) * scale) / diag[:, i]
                w1[:, :, i:] -= e[:, :, None] * hinv1[:, None, i, i:]
                err1[:, :, i] = e
            q[:, :, i1:i2] = codes1
            losses += err1.pow(2).sum(-1) / 2     # (w - q)^2 / Hinv_ii^2 / 2 per column
            w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]
        g_idx = torch.arange(cols, device=w.device) // group
        if perm is not None:
            inverse = torch.argsort(perm, dim=-1)
            q = q.gather(2, inverse[:, None, :].expand(n, rows, cols))
            g_idx = g_idx.expand(n, -1) if self.static is not None else g_idx[inverse]   # dynamic: column order's
        else:
            g_idx = g_idx.expand(n, -1)
        return [GPTQResult(QuantizedWeight(q=q[b], scales=scales[b].half(), zeros=zeros[b].to(torch.int32),
                                           g_idx=g_idx[b].to(torch.int32)), losses[b], self.damps[b])
                for b in range(n)]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                  name: str = "") -> GPTQResult:
    """GPTQ on one matrix: a sweep of one."""
    sweep = Sweep(1, tuple(weight.shape), scheme, weight.device, damp, act_order, static_groups, block_size)
    sweep.add(weight, hessian.float().clone(), name)
    return sweep.solve()[0]
