"""Where and in what precision mixq computes: one meaning of `--device auto` and `--compute-dtype auto` for
quantization and for the check alike, so a quantized model and its reference are computed the same way."""

from __future__ import annotations

import torch

from mixq.convert.checkpoint import LABEL_DTYPES
from mixq.convert.errors import MixqError

COMPUTE_DTYPES = ("auto", *LABEL_DTYPES)


def pick_device(name: str) -> torch.device:
    """auto: the CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MixqError(f"--device {name}: CUDA is not available on this machine")
    return device


def generation_dtype(label: str, device: torch.device) -> torch.dtype:
    """What `mixq check` generates its samples in: fp16 on a GPU unless a dtype was asked for, since that is what
    the runtimes serve AWQ and GPTQ in (vLLM, TGI, AutoAWQ), and greedy tokens computed in bf16 or fp32 part from
    theirs within a few dozen tokens; a CPU keeps the compute dtype."""
    return torch.float16 if label == "auto" and device.type == "cuda" else compute_dtype(label, device)


def compute_dtype(label: str, device: torch.device) -> torch.dtype:
    """auto: float32 on a CPU (its half-precision matmuls are slow and no more exact), bfloat16 on a GPU (the range
    of Mixtral's own weights; fp16 activations of large models overflow)."""
    if label == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if label not in LABEL_DTYPES:
        raise MixqError(f"unknown compute dtype {label!r} (choose from {', '.join(COMPUTE_DTYPES)})")
    return LABEL_DTYPES[label]
