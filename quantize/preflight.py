"""What a pipeline will need, checked before its first step.

`make release` runs AWQ, GPTQ and their checks (hours on a real Mixtral) before its first GGUF; a missing
llama-cpp extra, an unresolvable evaluation text or a full disk must stop it before the work, in one line.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from mixq.convert import open_checkpoint
from mixq.convert.architecture import plan
from mixq.convert.errors import MixqError
from mixq.convert.ggufio import GGUF_PY_TYPES, LLAMA_CPP_TYPES
from mixq.convert.hub import resolve_model
from mixq.convert.imatrix import read_imatrix
from mixq.convert.llama_quantize import refuse_without_imatrix

from .formats import FORMATS

# bits per weight of each GGUF type, as llama.cpp's quantize tool lists them (K-quant mixes: their average)
GGUF_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0,
             "q2_k": 2.96, "q2_k_s": 2.96, "q3_k_s": 3.5, "q3_k_m": 3.91, "q3_k_l": 4.27, "q4_k_s": 4.58,
             "q4_k_m": 4.89, "q5_k_s": 5.54, "q5_k_m": 5.7, "q6_k": 6.56, "iq1_s": 1.56, "iq1_m": 1.75,
             "iq2_xxs": 2.06, "iq2_xs": 2.31, "iq2_s": 2.5, "iq2_m": 2.7, "iq3_xxs": 3.06, "iq3_xs": 3.3,
             "iq3_s": 3.44, "iq3_m": 3.66, "iq4_nl": 4.5, "iq4_xs": 4.25}
MARGIN = 1.1  # headers, tokenizer files, rounding of the estimates


def preflight(model: str | Path, out: str | Path, methods=(), outtypes=(), calib: str | None = None,
              eval_source: str | None = None, bits: int = 4, group_size: int = 128,
              device: str = "auto", name: str | None = None, imatrix: str | None = None) -> dict:
    """Refuse, before any work, a pipeline that would fail later; returns what was checked.

    methods: quantization methods whose repository will be made ("awq", "gptq"); outtypes: GGUF types; the
    disk estimate counts only the artifacts that do not exist yet under `out` (what make will build): the
    repositories OUT/METHOD and the files OUT/gguf/NAME-OUTTYPE.gguf (NAME: the model folder's name).
    """
    out = Path(out)
    model = resolve_model(model)
    ckpt = open_checkpoint(model)
    for method in methods:
        if method not in FORMATS:
            raise MixqError(f"unknown quantization method {method!r} (choose from {', '.join(FORMATS)})")
        if FORMATS[method].bits_problem(bits):
            raise MixqError(f"--bits {FORMATS[method].bits_problem(bits)}")
        if ckpt.layout != "hf":
            raise MixqError(f"{model}: quantization reads Hugging Face checkpoints, this is {ckpt.layout}")
    unknown = [t for t in outtypes if t not in GGUF_BITS]
    if unknown:
        raise MixqError(f"unknown GGUF outtype {unknown[0]!r} (choose from {', '.join(GGUF_BITS)})")
    k_quants = [t for t in outtypes if t in LLAMA_CPP_TYPES]
    refuse_without_imatrix(k_quants, imatrix)
    if imatrix not in (None, "auto"):
        read_imatrix(imatrix)
    if k_quants:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise MixqError(f"GGUF {', '.join(k_quants)} need llama.cpp's quantizer: make setup-llama-cpp "
                            f"(or pip install 'mixq[llama-cpp]')") from None
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise MixqError(f"--device {device}: no CUDA device is visible to torch")
    from mixq.calibration.sources import load_texts
    for source, evaluation in ((calib, False), (eval_source, True)):
        if source and not (Path(source).suffix == ".safetensors" and Path(source).is_file()):
            load_texts(source, evaluation=evaluation)
    need = _bytes_needed(ckpt, out, methods, outtypes, bits, group_size, name or Path(model).name)
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if need > free:
        from mixq.convert.progress import human_bytes
        raise MixqError(f"{out}: the outputs still to make need about {human_bytes(need)}, the disk has "
                        f"{human_bytes(free)} free")
    return {"model": str(model), "out": str(out), "methods": list(methods), "outtypes": list(outtypes),
            "llama_cpp": bool(k_quants), "bytes_needed": need, "bytes_free": free}


def _bytes_needed(ckpt, out: Path, methods, outtypes, bits: int, group_size: int, name: str) -> int:
    """Finished outputs plus the largest transient one: a quantization's work folder holds every layer
    beside the repository it assembles; a K-quant first writes a 16-bit GGUF."""
    spec = ckpt.spec
    quantized = spec.num_layers * sum(math.prod(lin.shape) for lin in plan(spec).linears)
    weights = sum(math.prod(ref.shape) for ref in ckpt.tensors.values())
    repo = (quantized * (bits + 16 / group_size + bits / group_size) + (weights - quantized) * 16) / 8
    total, transient = 0.0, 0.0
    for method in methods:
        if not (out / method / "config.json").exists():
            total += repo
            transient = max(transient, repo)
    for outtype in outtypes:
        if not (out / "gguf" / f"{name}-{outtype}.gguf").exists():
            total += weights * GGUF_BITS[outtype] / 8
            if outtype in LLAMA_CPP_TYPES or outtype not in GGUF_PY_TYPES:
                transient = max(transient, weights * 2)
    return int((total + transient) * MARGIN)


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path
