"""On-disk formats of quantized linears: AutoAWQ's GEMM and AutoGPTQ's v1, packed and read back.

GPTQ v1: qweight [in*bits/32, out] int32, packed along the input (nibble j of qweight[r, o] = q[r*8 + j, o]);
qzeros [groups, out*bits/32] holding zero - 1, packed along the output; scales [groups, out] fp16; g_idx [in].
AWQ GEMM: qweight [in, out/8] int32, packed along the output in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7];
qzeros [in/group, out/8] holding the raw zeros, packed the same way; scales [in/group, out] fp16.
"""

from __future__ import annotations

import torch

from .quantizer import QuantizedWeight, Scheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _int32(x: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the int32 with the same bits."""
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)


def _pack_last(values: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """Pack the last dimension, 32/bits values per int32, value i of a word at bits [bits*i, bits*(i+1))."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(*values.shape[:-1], values.shape[-1] // per, per)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per, dtype=torch.int64, device=v.device) * bits
    return _int32((v << shifts).sum(-1))


def pack_gptq(qw: QuantizedWeight, scheme: Scheme) -> dict[str, torch.Tensor]:
    qweight = _pack_last(qw.q, scheme.bits).T                  # [out, in/per] -> [in/per, out]
    qzeros = _pack_last((qw.zeros.T.to(torch.int64) - 1) & scheme.maxq, scheme.bits)
    return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(),
            "scales": qw.scales.T.contiguous().half(), "g_idx": qw.g_idx.to(torch.int32).contiguous()}


def pack_awq(qw: QuantizedWeight, scheme: Scheme) -> dict[str, torch.Tensor]:
    if scheme.bits != 4:
        raise ValueError("the AWQ GEMM format holds 4-bit weights only")
    return {"qweight": _pack_last(qw.q.T.contiguous(), 4, AWQ_ORDER).contiguous(),
            "qzeros": _pack_last(qw.zeros.T.contiguous(), 4, AWQ_ORDER).contiguous(),
            "scales": qw.scales.T.contiguous().half()}


PACKERS = {"gptq": pack_gptq, "awq": pack_awq}
SUFFIXES = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales")}


def packed_shapes(fmt: str, out_features: int, in_features: int, scheme: Scheme) -> dict[str, tuple]:
    groups = in_features // scheme.group_size
    per = 32 // scheme.bits
    if fmt == "gptq":
        return {"qweight": ((in_features // per, out_features), torch.int32),
                "qzeros": ((groups, out_features // per), torch.int32),
                "scales": ((groups, out_features), torch.float16), "g_idx": ((in_features,), torch.int32)}
    return {"qweight": ((in_features, out_features // 8), torch.int32),
            "qzeros": ((groups, out_features // 8), torch.int32), "scales": ((groups, out_features), torch.float16)}


# ---- reading back (the check evaluates quantized repositories through these) ---------------------------------

def _unpack_last(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    v = (packed.to(torch.int64)[..., None] >> shifts) & (2 ** bits - 1)
    if order is not None:
        inverse = [list(order).index(i) for i in range(per)]
        v = v[..., inverse]
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def dequantize_gptq(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    q = _unpack_last(t["qweight"].T.contiguous(), bits).T              # [in, out]
    z = (_unpack_last(t["qzeros"], bits) + 1) & (2 ** bits - 1)        # [groups, out]
    g = t["g_idx"].long()
    return ((q.float() - z[g].float()) * t["scales"][g].float()).T.contiguous()


def dequantize_awq(t: dict[str, torch.Tensor], bits: int = 4) -> torch.Tensor:
    q = _unpack_last(t["qweight"], 4, AWQ_ORDER)                        # [in, out]
    z = _unpack_last(t["qzeros"], 4, AWQ_ORDER)                         # [groups, out]
    group = q.shape[0] // z.shape[0]
    return ((q.float() - z.repeat_interleave(group, 0).float())
            * t["scales"].float().repeat_interleave(group, 0)).T.contiguous()


DEQUANTIZERS = {"gptq": dequantize_gptq, "awq": dequantize_awq}
