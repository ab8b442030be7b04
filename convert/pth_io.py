"""PyTorch pickles, read safely (weights_only) through mmap."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .errors import MixqError
from .pages import drop_file_pages


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.bin file, memory-mapped; anything but tensors is refused, not executed."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MixqError(f"{path}: refused to load: it holds more than tensors ({reason})") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MixqError(f"{path}: truncated or not a PyTorch checkpoint ({reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MixqError(f"{path}: holds a {type(state).__name__}, not a dictionary of tensors")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise MixqError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return state


def release(tensor: torch.Tensor) -> None:
    """Drop the file pages behind a tensor of a memory-mapped pickle."""
    drop_file_pages(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(state, path)
