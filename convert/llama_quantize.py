"""The GGUF types llama.cpp's own quantizer makes (llama_model_quantize, through llama-cpp-python), with an
importance matrix when one is given, as llama.cpp's quantize tool passes it.

The quantizer reads a float GGUF and writes the quantized one; the importance matrix goes in as the C API's array
of (tensor name, values, count), each tensor's values its columns' mean squared activation (Imatrix.values), and
the file is stamped with the quantize.imatrix.* keys the tool writes, so llama.cpp and the Hub show what it was
calibrated on.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .errors import MixqError
from .imatrix import Imatrix
from .progress import is_quiet

# --outtype -> LlamaFileType name (llama.h's llama_ftype ids): the K-quant mixes and the i-quants
LLAMA_CPP_TYPES = {"q2_k": "MOSTLY_Q2_K", "q2_k_s": "MOSTLY_Q2_K_S", "q3_k_s": "MOSTLY_Q3_K_S",
                   "q3_k_m": "MOSTLY_Q3_K_M", "q3_k_l": "MOSTLY_Q3_K_L", "q4_k_s": "MOSTLY_Q4_K_S",
                   "q4_k_m": "MOSTLY_Q4_K_M", "q5_k_s": "MOSTLY_Q5_K_S", "q5_k_m": "MOSTLY_Q5_K_M",
                   "q6_k": "MOSTLY_Q6_K",
                   "iq1_s": "MOSTLY_IQ1_S", "iq1_m": "MOSTLY_IQ1_M", "iq2_xxs": "MOSTLY_IQ2_XXS",
                   "iq2_xs": "MOSTLY_IQ2_XS", "iq2_s": "MOSTLY_IQ2_S", "iq2_m": "MOSTLY_IQ2_M",
                   "iq3_xxs": "MOSTLY_IQ3_XXS", "iq3_xs": "MOSTLY_IQ3_XS", "iq3_s": "MOSTLY_IQ3_S",
                   "iq3_m": "MOSTLY_IQ3_M", "iq4_nl": "MOSTLY_IQ4_NL", "iq4_xs": "MOSTLY_IQ4_XS"}
# the types whose matrices llama.cpp refuses to quantize without an importance matrix (llama-quant.cpp's
# tensor_requires_imatrix on each file type's default tensor type)
NEED_IMATRIX = ("q2_k_s", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs")
# what llama.cpp's quantize tool writes into a file quantized with an importance matrix
IMATRIX_KEYS = {"file": "quantize.imatrix.file", "dataset": "quantize.imatrix.dataset",
                "entries": "quantize.imatrix.entries_count", "chunks": "quantize.imatrix.chunks_count"}


def _silent(level, text, user_data):
    return None


_SILENT_LOG = None   # made once: llama.cpp keeps calling the last callback installed, so it must never be freed


def _route_log(llama_cpp) -> None:
    """llama.cpp's log silenced when mixq is quiet, else llama-cpp-python's own logger (put back, since a quiet run
    before may have silenced it)."""
    global _SILENT_LOG
    from llama_cpp import _logger
    if _SILENT_LOG is None:
        _SILENT_LOG = llama_cpp.llama_log_callback(_silent)
    llama_cpp.llama_log_set(_SILENT_LOG if is_quiet() else _logger.llama_log_callback, None)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MixqError("K-quants and i-quants need llama.cpp's quantizer: pip install 'mixq[llama-cpp]' "
                        "(the llama-cpp extra, llama-cpp-python)") from None
    return llama_cpp


class Quantizer:
    """llama.cpp's quantizer with one importance matrix (or none) for every type it is asked for."""

    def __init__(self, imatrix: Imatrix | None = None, imatrix_name: str = "auto"):
        self.llama_cpp = llama_cpp = _llama_cpp()
        self._keep = []     # the arrays the C structures point into, alive as long as the quantizer
        self._imatrix = self._overrides = None
        if imatrix is not None:
            values = imatrix.values()
            table = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()   # ends with a NULL name
            for row, (name, v) in zip(table, sorted(values.items())):
                self._keep.append(v)
                row.name, row.size = name.encode(), v.size
                row.data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            self._imatrix = table
            self._overrides = self._stamp({
                "file": imatrix_name, "dataset": imatrix.datasets[0] if imatrix.datasets else None,
                "entries": len(values), "chunks": imatrix.chunk_count or None})

    def _stamp(self, fields: dict):
        llama_cpp = self.llama_cpp
        fields = {k: v for k, v in fields.items() if v is not None}
        table = (llama_cpp.llama_model_kv_override * (len(fields) + 1))()        # ends with an empty key
        for row, (field, value) in zip(table, fields.items()):
            row.key = IMATRIX_KEYS[field].encode()
            if isinstance(value, str):
                row.tag, row.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
            else:
                row.tag, row.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        return table

    def __call__(self, src: Path, dst: Path, outtype: str) -> None:
        llama_cpp = self.llama_cpp
        _route_log(llama_cpp)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = int(getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[outtype]}"))
        params.nthread = os.cpu_count() or 1
        if self._imatrix is not None:
            params.imatrix = ctypes.cast(self._imatrix, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
            params.kv_overrides = ctypes.cast(self._overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        if rc != 0:
            raise MixqError(f"llama.cpp's quantizer failed making {outtype.upper()} from {src.name} (code {rc}; "
                            f"its log above says why)")


def refuse_without_imatrix(outtypes, imatrix) -> None:
    need = [t for t in outtypes if t in NEED_IMATRIX]
    if need and imatrix is None:
        raise MixqError(f"GGUF {', '.join(need)} need an importance matrix: add --imatrix auto (computed from "
                        f"calibration text) or --imatrix FILE (llama.cpp's imatrix .gguf or .dat)")
