"""Checkpoint layouts: Mistral torrent, Hugging Face and GGUF, read and written tensor by tensor."""

from .api import convert_checkpoint, detect_layout, inspect_checkpoint, open_checkpoint
from .checkpoint import Checkpoint, TensorRef
from .errors import MixqError
from .spec import ModelSpec

__all__ = ["Checkpoint", "MixqError", "ModelSpec", "TensorRef", "convert_checkpoint", "detect_layout",
           "inspect_checkpoint", "open_checkpoint"]

from mixq.api import callable_package  # noqa: E402

callable_package(__name__, "convert")  # mixq.convert(...) is mixq.api.convert(...)
