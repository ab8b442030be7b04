"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's error over the
columns not yet quantized through the inverse Hessian of the layer's inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mixq.convert.errors import MixqError

from .quantizer import QuantizedWeight, Scheme, group_params

HALF = (torch.bfloat16, torch.float16)


class Hessian:
    """H = 2/n * sum(x x^T) over the n input rows seen, accumulated in fp32 on the inputs' device; with `cross`
    also C = 2/n * sum(x r^T), r the same rows as the unquantized model computes them (GPTAQ's asymmetric
    calibration: Sweep.add reads C - H as how far the quantized inputs have drifted).

    Half-precision inputs on CUDA are multiplied as they are, accumulating in fp32 into H (cuBLAS's fp32-output
    half GEMM): the product of two bf16 or fp16 numbers is exact in fp32, so this is the fp32 product of the same
    inputs up to the order of the sums, at the tensor cores' rate instead of fp32's (about 16x on an H100), and
    without an fp32 copy of every chunk. Elsewhere (and should a build lack that kernel) the inputs go to fp32."""

    half_products = True     # cleared for the process if the kernel is missing

    def __init__(self, columns: int, device, cross: bool = False):
        self.h = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.c = torch.zeros_like(self.h) if cross else None
        self.rows = 0

    def add(self, x: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Rows x (the inputs the quantized model gives the linear); with `cross`, `reference` the same rows from
        the unquantized model."""
        x = x.reshape(-1, x.shape[-1])
        self.rows += x.shape[0]
        self._product(self.h, x, x)
        if self.c is not None:
            self._product(self.c, x, reference.reshape(-1, reference.shape[-1]))

    @staticmethod
    def _product(into: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.is_cuda and x.dtype in HALF and Hessian.half_products:
            try:
                torch.addmm(into, x.T, y, out_dtype=torch.float32, out=into)
                return
            except (RuntimeError, TypeError, NotImplementedError):
                Hessian.half_products = False
        into.addmm_(x.T.float(), y.float())

    def value(self) -> torch.Tensor:
        return self._scaled(self.h)

    def cross(self) -> torch.Tensor | None:
        return None if self.c is None else self._scaled(self.c)

    def _scaled(self, m: torch.Tensor) -> torch.Tensor:
        return m.clone() if self.rows == 0 else m * (2.0 / self.rows)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    losses: torch.Tensor  # per row: sum over columns of (w - q)^2 / Hinv_ii^2 / 2, GPTQ's own error measure
    damp: float           # the damping that made H positive definite

    @property
    def loss(self) -> float:
        return float(self.losses.sum())


# how far toward the least-squares fit GPTAQ moves a weight: the reference implementation's alpha (its fasterquant's
# default). Measured on SmolLM2 (GPTQ sym, --search mse, KJV 16 x 512 -> Shakespeare): perplexity increase 9.7 at
# 0.25, 10.7 at 0.5 and 18.1 at 1 (the whole fit, against 11.0 without GPTAQ): 8k tokens over-fit the drift
GPTAQ_ALPHA = 0.25
INVERSE_BLOCK = 512   # columns of the triangular inverse solved at a time (each against its trailing factor only)


def inverse_cholesky(h: torch.Tensor, order: torch.Tensor, damp: float, out: torch.Tensor,
                     name: str = "") -> float:
    """The upper Cholesky factor U of H'^-1 (H'^-1 = U^T U) into `out`, H' being H with its rows and columns taken
    in `order` and damped, raising the damping until H' is positive definite; returns the damping used. `h` is
    scratch (overwritten) and `out` a matrix of its shape: the working set is those two matrices and a block.

    With J the reversal, J H' J = L L^T gives H'^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper triangular
    with a positive diagonal: the factor itself, from one Cholesky and one triangular inverse (2/3 n^3 operations)
    instead of a Cholesky, an inverse and a second Cholesky (4/3 n^3), each in place. L^-1 is lower triangular, so
    each block of its columns is solved against the trailing block of L alone and overwrites the columns of L it
    no longer needs. The reordering and the reversals are index_selects between the two matrices."""
    n = h.shape[0]
    backwards = torch.arange(n - 1, -1, -1, device=h.device)
    torch.index_select(h, 0, order[backwards], out=out)
    torch.index_select(out, 1, order[backwards], out=h)         # J H' J, undamped
    mean_diag = torch.mean(torch.diag(h))
    info = torch.empty((), dtype=torch.int32, device=h.device)
    block = torch.empty(n, min(INVERSE_BLOCK, n), dtype=h.dtype, device=h.device)
    while damp < 1.0:
        out.copy_(h)
        out.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(out, out=(out, info))
        if info == 0:
            for j in range(0, n, INVERSE_BLOCK):
                k = min(j + INVERSE_BLOCK, n)
                rhs = block[:n - j, :k - j]
                rhs.zero_()
                rhs.diagonal().fill_(1)
                torch.linalg.solve_triangular(out[j:, j:], rhs, upper=False, out=rhs)
                out[j:, j:k] = rhs
            torch.index_select(out, 0, backwards, out=h)
            torch.index_select(h, 1, backwards, out=out)            # J L^-1 J
            return damp
        damp += 0.01
    raise MixqError(f"{name}: the Hessian is not positive definite even with damping 1.0")


REFIT_BYTES = 2 ** 28   # refit_scales' temporaries at once
SUB = 16   # columns whose errors are spread element by element before one product spreads them on


class Sweep:
    """GPTQ on up to `count` matrices of one shape, each with its own Hessian, swept together: one column loop for
    all of them (Mixtral's eight down projections: 14336 column steps per layer instead of 8 x 14336).

    `add` prepares one matrix (dead columns, the static groups' parameters, the act-order permutation, the damped
    inverse Cholesky factor, raising the damping until H is positive definite) and frees its Hessian; `solve` runs
    the column loop on all of them at once. Every step is elementwise or a matrix product per matrix, so a matrix
    gets the same codes whether it is swept alone or with others (a test holds the batched path to that). With
    `refit` each matrix's weight and damped H are kept until `solve` has its codes, for refit_scales."""

    def __init__(self, count: int, shape: tuple[int, int], scheme: Scheme, device, damp: float = 0.01,
                 act_order: bool = False, static_groups: bool = False, block_size: int = 128, refit: bool = False):
        rows, cols = shape
        self.scheme, self.damp, self.act_order, self.static_groups = scheme, damp, act_order, static_groups
        self.kept = (torch.empty(count, rows, cols, device=device), torch.empty(count, cols, cols, device=device)
                     ) if refit else None
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

    def add(self, weight: torch.Tensor, hessian: torch.Tensor, name: str = "", cross: torch.Tensor | None = None
            ) -> None:
        """Prepare `weight` [rows, cols] with `hessian` [cols, cols] (taken over: modified in place). With `cross`
        (Hessian.cross: the quantized inputs against the unquantized model's) the weight swept is GPTAQ's: the
        least-squares fit of the unquantized outputs on the quantized inputs, W + W (C - H)^T H^-1, so the sweep
        minimises |W X - Q X~| instead of |(W - Q) X~| (the two differ by a constant once W is that fit); the
        step toward the fit is GPTAQ_ALPHA of it, as GPTAQ's own code takes."""
        i = len(self)
        w = self.w[i]
        w.copy_(weight)
        h = hessian if hessian.dtype == torch.float32 else hessian.float()
        rows, cols = w.shape
        group = self.scheme.group_size
        dead = torch.diag(h) == 0
        drift = None
        if cross is not None:
            drift = cross.float() - h
            drift[dead], drift[:, dead] = 0, 0
        h.diagonal()[dead] = 1
        w[:, dead] = 0
        order = torch.arange(cols, device=h.device)
        if self.perm is not None:
            order = torch.argsort(torch.diag(h), descending=True)
            self.perm[i] = order
        if self.kept is not None:   # H as inverted: inverse_cholesky damps its own copy by damp x mean diagonal
            self.kept[1][i] = h
            mean_diag = torch.mean(torch.diag(h))
        damp = inverse_cholesky(h, order, self.damp, self.hinv[i], name)
        self.damps.append(damp)
        if self.kept is not None:
            self.kept[1][i].diagonal().add_(damp * mean_diag)
        if drift is not None:   # in the swept order, H'^-1 = U^T U with U the factor just made
            u = self.hinv[i]
            wp = w[:, order]
            wp += GPTAQ_ALPHA * (wp @ drift[order][:, order].T @ u.T @ u)
            w[:, order] = wp
            del drift, wp
        if self.kept is not None:
            self.kept[0][i] = w
        if self.static is not None:  # parameters of each group from the weights before any update, in column order
            scale, zero = group_params(w.reshape(rows * (cols // group), group), self.scheme)
            self.static[0][i], self.static[1][i] = scale.view(rows, -1), zero.view(rows, -1)
        if self.perm is not None:
            w.copy_(w[:, order])

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
        if self.static is not None:   # the static groups' parameters by group: [n, groups, rows]
            static_t = [p.transpose(1, 2).contiguous() for p in (scales, zeros)]
            matrices = torch.arange(n, device=w.device)[:, None]
        for i1 in range(0, cols, self.block_size):
            i2 = min(i1 + self.block_size, cols)
            w1 = w[:, :, i1:i2].transpose(1, 2).contiguous()   # [n, k, rows]: each column contiguous
            err1 = torch.zeros_like(w1)
            codes1 = torch.empty_like(w1)
            hinv1 = hinv[:, i1:i2, i1:i2]
            # per column, views made once per block: the column, its codes, its error (also as [n, 1, rows] to
            # broadcast), its diagonal entry and its row of hinv1 as [n, k, 1]
            columns, column_codes, errors = w1.unbind(1), codes1.unbind(1), err1.unbind(1)
            spread_errors = err1[:, :, None].unbind(1)
            diags = hinv1.diagonal(dim1=1, dim2=2)[..., None].unbind(1)
            rows_of_hinv = hinv1[..., None].unbind(1)
            if self.static is not None:   # each column's group, in the original order, per matrix: [n, k, rows]
                gid = (perm[:, i1:i2] if perm is not None else torch.arange(i1, i2, device=w.device).expand(n, -1))
                block_scales, block_zeros = (p[matrices, gid // group].unbind(1) for p in static_t)
            k = i2 - i1
            for i in range(k):
                col = i1 + i
                if self.static is not None:
                    scale, zero = block_scales[i], block_zeros[i]
                elif col % group == 0:
                    scale, zero = group_params(w1[:, i:i + group].transpose(1, 2).reshape(n * rows, group), scheme)
                    scale, zero = scale.view(n, rows), zero.view(n, rows)
                    scales[:, :, col // group], zeros[:, :, col // group] = scale, zero
                column, c, e = columns[i], column_codes[i], errors[i]
                torch.div(column, scale, out=c).round_().add_(zero).clamp_(0, maxq)      # quantizer.codes
                torch.sub(c, zero, out=e).mul_(scale)
                torch.sub(column, e, out=e).div_(diags[i])
                end = min((i // SUB + 1) * SUB, k)     # the error reaches the rest of its sub-block now
                if i + 1 < end:
                    w1[:, i + 1:end] -= rows_of_hinv[i][:, i + 1:end] * spread_errors[i]
                elif end < k:                          # and the rest of the block once per sub-block
                    start = end - SUB
                    w1[:, end:].baddbmm_(hinv1[:, start:end, end:].transpose(1, 2), err1[:, start:end], alpha=-1)
            q[:, :, i1:i2] = codes1.transpose(1, 2)
            err1 = err1.transpose(1, 2).contiguous()
            losses += err1.pow(2).sum(-1) / 2     # (w - q)^2 / Hinv_ii^2 / 2 per column
            w[:, :, i2:] -= err1 @ hinv[:, i1:i2, i2:]
        g_idx = torch.arange(cols, device=w.device) // group
        if perm is not None:
            inverse = torch.argsort(perm, dim=-1)
            q = q.gather(2, inverse[:, None, :].expand(n, rows, cols))
            g_idx = g_idx.expand(n, -1) if self.static is not None else g_idx[inverse]   # dynamic: column order's
        else:
            g_idx = g_idx.expand(n, -1)
        results = [GPTQResult(QuantizedWeight(q=q[b], scales=scales[b].half(), zeros=zeros[b].to(torch.int32),
                                              g_idx=g_idx[b].to(torch.int32)), losses[b], self.damps[b])
                   for b in range(n)]
        if self.kept is not None:
            for b, r in enumerate(results):
                r.weight = refit_scales(r.weight, self.kept[0][b], self.kept[1][b], scheme)
        return results


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                  name: str = "") -> GPTQResult:
    """GPTQ on one matrix: a sweep of one."""
    sweep = Sweep(1, tuple(weight.shape), scheme, weight.device, damp, act_order, static_groups, block_size)
    sweep.add(weight, hessian.float().clone(), name)
    return sweep.solve()[0]


def refit_scales(qw: QuantizedWeight, target: torch.Tensor, h: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """The group scales that, with the codes and zeros GPTQ chose kept, minimise its own loss
    (W - Q) H (W - Q)^T row by row: Q = A s per row, A's column k being (q_k - z) in its group's slot, so s solves
    the normal equations (A^T H A) s = A^T H w, a system of groups x groups per row. GPTQ picks each group's scale
    before the errors of the columns after it have moved them; solved once all codes are known, the scales fit the
    codes as they ended. A row keeps its old scales where the fp16-rounded solution does not lower that loss.

    Cost: rows x cols^2 multiply-adds (one product per group), REFIT_BYTES of temporaries a chunk of rows at a
    time; the working set beyond that is the target weight and H, which the sweep keeps for it."""
    rows, cols = target.shape
    group = scheme.group_size
    groups = cols // group
    zeros_at = qw.g_idx.long().to(target.device)
    order = torch.argsort(zeros_at, stable=True)   # each group's columns contiguous
    hp = h.float()[order][:, order]
    chunk = max(1, REFIT_BYTES // (4 * (2 * cols + groups * groups)))
    scales = []
    for r0 in range(0, rows, chunk):
        r = slice(r0, min(r0 + chunk, rows))
        a = (qw.q[r].float() - qw.zeros[r].float()[:, zeros_at])[:, order]
        n = a.shape[0]
        m = torch.empty(n, groups, groups, dtype=torch.float32, device=a.device)
        for g in range(groups):
            cols_g = slice(g * group, (g + 1) * group)
            m[:, g] = (a[:, cols_g] @ hp[cols_g]).mul_(a).view(n, groups, group).sum(-1)
        b = (target[r].float()[:, order] @ hp).mul_(a).view(n, groups, group).sum(-1)
        del a
        old = qw.scales[r].float()
        new, info = torch.linalg.solve_ex(m, b[..., None])
        new = new[..., 0]
        new = torch.where(torch.isfinite(new) & (new > 0) & (info[:, None] == 0), new, old).half().float()

        def loss(s):   # s^T M s - 2 b^T s: the loss up to the constant w^T H w
            return (s[:, None, :] @ m @ s[..., None])[:, 0, 0] - 2 * (b * s).sum(-1)

        scales.append(torch.where((loss(new) < loss(old))[:, None], new, old).half())
    return QuantizedWeight(q=qw.q, scales=torch.cat(scales), zeros=qw.zeros, g_idx=qw.g_idx)
