"""One GGUF tensor written in parts: the one place that reaches into gguf-py's GGUFWriter.

gguf-py's public `GGUFWriter.write_tensor_data` takes a tensor's whole array. A stacked expert tensor
(Mixtral 8x7B's ffn_gate_exps is [8, 14336, 4096], 0.9 GB in bf16) would then be held whole beside its sources;
mixq writes it one expert at a time instead, which needs what write_tensor_data does inside: the writer's queue of
tensor infos (`tensors`), its open files (`fout`) and its state (`state`). Those are private to gguf-py and may
change in any release, so nothing else uses them; every writer is checked for them before a file is opened, by
their presence (a gguf outside VERIFIED that still has them is used as it is), and pyproject.toml pins VERIFIED.
"""

from __future__ import annotations

import contextlib
from importlib import metadata

from .errors import MixqError

# the gguf versions the GGUF tests passed with, 0.17.0 to 0.19.0 (0.16 writes the same bytes, but the tests' own
# rewriting of GGUF metadata needs add_key_value's sub_type, new in 0.17); pyproject.toml pins it (a test)
VERIFIED = ">=0.17,<0.20"
PRIVATE = ("tensors", "fout", "state")  # GGUFWriter's attributes used here


def check(writer) -> None:
    """Refuse, in one line, a gguf whose writer lacks the private state streamed through below."""
    from gguf import gguf_writer
    missing = [f"GGUFWriter.{name}" for name in PRIVATE if not hasattr(writer, name)]
    if not hasattr(getattr(gguf_writer, "WriterState", None), "WEIGHTS"):
        missing.append("gguf_writer.WriterState.WEIGHTS")
    if "nbytes" not in getattr(getattr(gguf_writer, "TensorInfo", None), "__dataclass_fields__", {}):
        missing.append("gguf_writer.TensorInfo.nbytes")
    if missing:
        try:
            version = metadata.version("gguf")
        except metadata.PackageNotFoundError:
            version = "(version unknown)"
        raise MixqError(f"gguf {version} lacks {', '.join(missing)}, through which mixq writes expert tensors one "
                        f"expert at a time: install gguf{VERIFIED}, the versions it was verified with")


def write_parts(writer, parts, nbytes: int, written=None) -> None:
    """GGUFWriter.write_tensor_data for the next planned tensor, arriving in (source name, array) parts: the same
    bytes, without holding the whole tensor; `written(name)` after each part."""
    from gguf.gguf_writer import WriterState
    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    fout = writer.fout[file_id]
    info = writer.tensors[file_id].pop(next(iter(writer.tensors[file_id])))
    writer.write_padding(fout, fout.tell())
    total = 0
    for name, part in parts:
        part.tofile(fout)
        total += part.nbytes
        del part
        if written is not None:
            written(name)
    if total != nbytes or info.nbytes != nbytes:
        raise AssertionError(f"wrote {total} bytes for a tensor of {info.nbytes}")
    writer.write_padding(fout, nbytes)
    writer.state = WriterState.WEIGHTS


def close_files(writer) -> None:
    """Close every file of a failed write, each despite the others' errors: GGUFWriter.close stops at the first
    (a full disk fails its flush), and a deleted file that stays open keeps its space."""
    for f in writer.fout or []:
        with contextlib.suppress(OSError):
            f.close()
