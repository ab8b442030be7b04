"""On-disk formats of quantized linears, one object each: AutoAWQ's GEMM and AutoGPTQ's v1.

A format knows everything its consumers assume: the bits their kernels unpack, how a layer's shapes must divide,
the packed tensors (names, shapes, dtypes), how to pack and unpack them, the min/max rule the codes were made for
and the `quantization_config` the loaders read. The engine, the repository reader, preflight and the card ask the
registered object (`FORMATS`, by `quant_method`), as compressed-tensors registers its compressors by name.

GPTQ v1: qweight [in*bits/32, out] int32, packed along the input (nibble j of qweight[r, o] = q[r*8 + j, o]);
qzeros [groups, out*bits/32] holding zero - 1, packed along the output; scales [groups, out] fp16; g_idx [in].
AWQ GEMM: qweight [in, out/8] int32, packed along the output in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7];
qzeros [in/group, out/8] holding the raw zeros, packed the same way; scales [in/group, out] fp16.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixq.convert.errors import MixqError

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


def _unpack_last(packed: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64, device=packed.device) * bits
    v = (packed.to(torch.int64)[..., None] >> shifts) & (2 ** bits - 1)
    if order is not None:
        inverse = [list(order).index(i) for i in range(per)]
        v = v[..., inverse]
    return v.reshape(*packed.shape[:-1], packed.shape[-1] * per)


class Format:
    """One quantized-linear format; subclasses fill in the facts."""
    name: str                        # quant_method in config.json
    title: str
    bits: tuple[int, ...]            # what the consumers' kernels unpack
    range_rule: str                  # the Scheme rule the consumers were written for (quantizer.group_params)
    suffixes: tuple[str, ...]        # the packed tensors of a linear, in the order they are written
    extra_files: tuple[str, ...] = ()

    def scheme(self, bits: int = 4, group_size: int = 128, sym: bool = False, search: str = "minmax") -> Scheme:
        return Scheme(bits=bits, group_size=group_size, sym=sym, rule=self.range_rule, search=search)

    def bits_problem(self, bits) -> str | None:
        """Why `bits` cannot be stored in this format, or None when it can."""
        if bits in self.bits and not isinstance(bits, bool):
            return None
        return f"{bits!r}: the {self.name.upper()} format holds {' or '.join(map(str, self.bits))}-bit weights"

    def out_multiple(self, bits: int) -> int:
        """What out_features must be a multiple of to pack."""
        return 32 // bits

    def layout_problem(self, shape: tuple[int, int], scheme: Scheme) -> str | None:
        """Why a linear of `shape` (out, in) cannot be stored with `scheme`, or None."""
        out_features, in_features = shape
        if in_features % scheme.group_size:
            return (f"in_features {in_features} is not a multiple of --group-size {scheme.group_size} (the "
                    f"{self.name.upper()} format's consumers require whole groups; nothing is padded)")
        if out_features % self.out_multiple(scheme.bits):
            return f"out_features {out_features} cannot be packed {self.out_multiple(scheme.bits)} to a 32-bit word"
        return None

    def shapes(self, out_features: int, in_features: int, scheme: Scheme) -> dict[str, tuple[tuple, torch.dtype]]:
        raise NotImplementedError

    def pack(self, qw: QuantizedWeight, scheme: Scheme) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """The dequantized weight [out, in] in float32."""
        raise NotImplementedError

    def quantization_config(self, settings, moe: bool) -> dict:
        raise NotImplementedError

    def read_config(self, qc: dict, where: Path) -> tuple[int, int]:
        """(bits, group size) of a repository's quantization_config, refused when the format cannot hold them."""
        bits, group_size = qc.get("bits", 4), qc.get("group_size", 128)
        if self.bits_problem(bits):
            raise MixqError(f"{where}: bits {self.bits_problem(bits)}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0 or group_size < -1:
            raise MixqError(f"{where}: group_size {group_size!r} is not a positive integer or -1")
        return bits, group_size

    def describe(self, qc: dict, settings: dict) -> str:
        """The settings column of a model card's file table."""
        raise NotImplementedError


class GptqV1(Format):
    name, title, bits, range_rule = "gptq", "GPTQ", (2, 4, 8), "zero-in-range"
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    extra_files = ("quantize_config.json",)   # AutoGPTQ's copy of the quantization_config

    def shapes(self, out_features, in_features, scheme):
        groups, per = in_features // scheme.group_size, 32 // scheme.bits
        return {"qweight": ((in_features // per, out_features), torch.int32),
                "qzeros": ((groups, out_features // per), torch.int32),
                "scales": ((groups, out_features), torch.float16), "g_idx": ((in_features,), torch.int32)}

    def pack(self, qw, scheme):
        qweight = _pack_last(qw.q, scheme.bits).T                  # [out, in/per] -> [in/per, out]
        qzeros = _pack_last((qw.zeros.T.to(torch.int64) - 1) & scheme.maxq, scheme.bits)
        return {"qweight": qweight.contiguous(), "qzeros": qzeros.contiguous(),
                "scales": qw.scales.T.contiguous().half(), "g_idx": qw.g_idx.to(torch.int32).contiguous()}

    def unpack(self, t, bits):
        q = _unpack_last(t["qweight"].T.contiguous(), bits).T              # [in, out]
        z = (_unpack_last(t["qzeros"], bits) + 1) & (2 ** bits - 1)        # [groups, out]
        g = t["g_idx"].long()
        return ((q.float() - z[g].float()) * t["scales"][g].float()).T.contiguous()

    def quantization_config(self, settings, moe):
        s = settings.scheme
        # act-order with static groups leaves g_idx in column order: to a kernel that is the plain layout
        return {"bits": s.bits, "group_size": s.group_size, "damp_percent": settings.damp,
                "desc_act": settings.act_order and not settings.static_groups,
                "static_groups": settings.static_groups, "sym": s.sym,
                "true_sequential": settings.true_sequential, "model_name_or_path": None,
                "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq",
                "modules_to_not_convert": ["gate"] if moe else None}

    def describe(self, qc, settings):
        return (f"{'symmetric' if qc.get('sym') else 'asymmetric'}, act-order "
                f"{'yes' if settings.get('act_order') else 'no'}"
                f"{' (static groups)' if settings.get('static_groups') else ''}, damp {qc.get('damp_percent')}")


class AwqGemm(Format):
    name, title, bits, range_rule = "awq", "AWQ", (4,), "min-max"
    suffixes = ("qweight", "qzeros", "scales")

    def out_multiple(self, bits):
        return 8   # eight 4-bit values per int32, interleaved

    def shapes(self, out_features, in_features, scheme):
        groups = in_features // scheme.group_size
        return {"qweight": ((in_features, out_features // 8), torch.int32),
                "qzeros": ((groups, out_features // 8), torch.int32), "scales": ((groups, out_features), torch.float16)}

    def pack(self, qw, scheme):
        if scheme.bits != 4:
            raise ValueError("the AWQ GEMM format holds 4-bit weights only")
        return {"qweight": _pack_last(qw.q.T.contiguous(), 4, AWQ_ORDER).contiguous(),
                "qzeros": _pack_last(qw.zeros.T.contiguous(), 4, AWQ_ORDER).contiguous(),
                "scales": qw.scales.T.contiguous().half()}

    def unpack(self, t, bits=4):
        q = _unpack_last(t["qweight"], 4, AWQ_ORDER)                        # [in, out]
        z = _unpack_last(t["qzeros"], 4, AWQ_ORDER)                         # [groups, out]
        group = q.shape[0] // z.shape[0]
        return ((q.float() - z.repeat_interleave(group, 0).float())
                * t["scales"].float().repeat_interleave(group, 0)).T.contiguous()

    def quantization_config(self, settings, moe):
        s = settings.scheme
        return {"quant_method": "awq", "zero_point": not s.sym, "group_size": s.group_size, "bits": s.bits,
                "version": "gemm", "modules_to_not_convert": ["gate"] if moe else None}

    def read_config(self, qc, where):
        if str(qc.get("version", "gemm")).lower() != "gemm":
            raise MixqError(f"{where}: AWQ version {qc.get('version')!r}; only GEMM is read")
        # AutoAWQ's own quant_config.json spells them w_bit / q_group_size
        return super().read_config({"bits": qc.get("bits", qc.get("w_bit", 4)),
                                    "group_size": qc.get("group_size", qc.get("q_group_size", 128))}, where)

    def describe(self, qc, settings):
        return f"zero point {'yes' if qc.get('zero_point') else 'no'}, GEMM"


FORMATS: dict[str, Format] = {f.name: f for f in (GptqV1(), AwqGemm())}


def get_format(name) -> Format:
    if name not in FORMATS:
        raise MixqError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[name]
