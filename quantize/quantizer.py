"""Group-wise integer quantization: the scheme, the per-group parameters, round-to-nearest.

Two rules for the parameters of a group, each matching the kernels of the format that names it (formats.py):
- "zero-in-range" (AutoGPTQ's Quantizer): 0 is kept inside the range; symmetric zero = 2^(bits-1). The GPTQ v1
  format stores zero - 1, which most kernels cannot decode for zero = 0, so an asymmetric group that would get
  zero 0 gets zero 1 and a scale that still reaches its maximum.
- "min-max" (AutoAWQ's pseudo_quantize_tensor): raw min/max, scale = (max - min) / maxq, zero = -round(min / scale).
Scales are rounded to fp16 before the codes are computed, so the codes are exact for the scales the files store.

Two searches for a group's range: "minmax" takes the rule's range as it is; "mse" (GPTQModel's `mse` option, the
MSE observer of llm-compressor) tries the range shrunk by 1, 0.99, ... 0.21 and keeps, per group, the one whose
rounding error sum |w - q|^2.4 is least: clipping a few outliers buys a finer grid for the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

FP16_TINY = 2.0 ** -24  # the smallest positive fp16 (subnormal)
RULES = ("zero-in-range", "min-max")
SEARCHES = ("minmax", "mse")
MSE_GRID, MSE_SHRINK, MSE_NORM = 100, 0.8, 2.4   # GPTQModel's Quantizer defaults: 80 ranges, 1 down to 0.21


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    rule: str = "zero-in-range"     # or "min-max": how a group's range becomes scale and zero (see above)
    search: str = "minmax"          # or "mse": how the range is chosen (see above)

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedWeight:
    """Codes and parameters of one linear weight W [out, in]: W ~ (q - zeros[:, g]) * scales[:, g], g = g_idx[k]."""
    q: torch.Tensor          # uint8 [out, in], 0..maxq
    scales: torch.Tensor     # fp16 [out, groups]
    zeros: torch.Tensor      # int32 [out, groups], 0..maxq
    g_idx: torch.Tensor      # int32 [in]

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out, cols = self.q.shape
        groups = self.scales.shape[1]
        g = self.g_idx.long()
        w = self.q.to(torch.float32, copy=True)
        if cols % groups == 0 and torch.equal(g, torch.arange(cols, device=g.device) // (cols // groups)):
            # groups in column order (every layout but act-order's dynamic groups): each group's parameters
            # broadcast over its columns, no full-size gather
            w = w.view(out, groups, -1)
            zeros, scales = self.zeros.float()[..., None], self.scales.float()[..., None]
        else:
            zeros, scales = self.zeros[:, g].float(), self.scales[:, g].float()
        return w.sub_(zeros).mul_(scales).view(out, cols).to(dtype)


def group_params(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [rows, group]; scale float32 holding fp16 values, zero float32 integers."""
    if scheme.search == "mse":
        return _searched(w.float(), scheme)
    if scheme.search not in SEARCHES:
        raise ValueError(f"unknown range search {scheme.search!r} (choose from {', '.join(SEARCHES)})")
    return _range_params(w.float(), scheme)


def _searched(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """The shrunk range whose rounding error is least, per group: the range rule applied to p * w is the range
    p * [min, max] (zero-in-range and min-max both scale with w), so each trial is the rule's own parameters."""
    def error(s, z):
        return codes(w, s, z, scheme.maxq).sub_(z).mul_(s).sub_(w).abs_().pow_(MSE_NORM).sum(1, keepdim=True)

    scale, zero = _range_params(w, scheme)
    best = error(scale, zero)
    for i in range(1, int(MSE_SHRINK * MSE_GRID)):
        s, z = _range_params(w * (1 - i / MSE_GRID), scheme)
        err = error(s, z)
        better = err < best
        scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
    return scale, zero


def as_searched_by_minmax(scheme: Scheme) -> Scheme:
    """The scheme for trial quantizations (AWQ's grid and clip searches run them by the thousand): the range as
    the rule gives it; the search, where asked for, is for the weights a method keeps."""
    return replace(scheme, search="minmax")


def _range_params(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = scheme.maxq
    if scheme.rule not in RULES:
        raise ValueError(f"unknown range rule {scheme.rule!r} (choose from {', '.join(RULES)})")
    if scheme.rule == "min-max":
        if scheme.sym:  # AutoAWQ without zero point: q in [-2^(b-1), 2^(b-1)-1], stored with zero 2^(b-1)
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / (2 ** (scheme.bits - 1) - 1)
            scale = _fp16(scale)
            return scale, torch.full_like(scale, 2 ** (scheme.bits - 1))
        hi, lo = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
        scale = _fp16((hi - lo).clamp(min=1e-5) / maxq)
        zero = (-torch.round(lo / scale)).clamp(0, maxq)
        return scale, zero
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    if scheme.sym:
        hi = torch.maximum(lo.abs(), hi)
        lo = torch.where(lo < 0, -hi, lo)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    if scheme.sym:
        scale = _fp16((hi - lo) / maxq)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    at_zero = zero < 1  # v1 stores zero - 1: keep zero >= 1, with the scale that still reaches hi
    scale = _fp16(torch.where(at_zero, hi / (maxq - 1), scale))
    zero = torch.where(at_zero, torch.ones_like(zero), torch.round(-lo / scale).clamp(1, maxq))
    return scale, zero


def _fp16(scale: torch.Tensor) -> torch.Tensor:
    return scale.to(torch.float16).float().clamp(min=FP16_TINY)


def codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """round(w / scale) + zero within [0, maxq], in one new tensor (each step in place: the grid searches run this
    on whole layers twenty times, and on a CPU a fresh tensor per step costs as much as the arithmetic)."""
    return torch.div(w.float(), scale).round_().add_(zero).clamp_(0, maxq)


def fake_quantize(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Quantize and dequantize w [out, in] group by group (round-to-nearest), in w's dtype."""
    out, cols = w.shape
    groups = w.float().reshape(out * (cols // scheme.group_size), scheme.group_size)
    scale, zero = group_params(groups, scheme)
    return codes(groups, scale, zero, scheme.maxq).sub_(zero).mul_(scale).reshape(out, cols).to(w.dtype)


def rtn(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest: the baseline every method is measured against."""
    out, cols = w.shape
    n = cols // scheme.group_size
    groups = w.float().reshape(out * n, scheme.group_size)
    scale, zero = group_params(groups, scheme)
    q = codes(groups, scale, zero, scheme.maxq)
    return QuantizedWeight(q=q.reshape(out, cols).to(torch.uint8), scales=scale.reshape(out, n).half(),
                           zeros=zero.reshape(out, n).to(torch.int32),
                           g_idx=torch.arange(cols, dtype=torch.int32) // scheme.group_size)
