"""llama.cpp's importance matrix: one object, read from either of its two file formats, written in the current one.

An importance matrix holds, for every matrix multiplication of a model, the sum over calibration tokens of each
input column's square, and the number of tokens summed; llama.cpp's quantizer weighs each weight's rounding error
by its column's mean (sum / count), so the columns the activations use most are kept best. A stacked expert tensor
(ffn_*_exps, [experts, rows, cols]) has one row of sums and one count per expert, each from the tokens routed to it.

The formats, as llama.cpp 0.3.36's tools write and read them (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp):
- GGUF (the current one): general.type = "imatrix", imatrix.datasets (array of strings), imatrix.chunk_count and
  imatrix.chunk_size (u32; the quantizer refuses a file without all three); per entry NAME two F32 tensors,
  NAME.in_sum2 [cols, matrices] (ggml order) of raw sums and NAME.counts [1, matrices] of token counts.
- legacy .dat: i32 entry count; per entry i32 name length, the name, i32 ncall, i32 value count, f32 values
  (already divided by the tokens of one call and multiplied by ncall); then i32 chunk count, i32 length and the
  dataset name. The quantizer divides the values by ncall.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MixqError

SUMS, COUNTS = ".in_sum2", ".counts"
KEYS = {"datasets": "imatrix.datasets", "chunk_count": "imatrix.chunk_count", "chunk_size": "imatrix.chunk_size"}


@dataclass
class Entry:
    sums: np.ndarray      # float32 [matrices, cols]: sum of squares of each input column
    counts: np.ndarray    # float32 [matrices]: tokens summed into each row of `sums`


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)   # by GGUF tensor name (blk.N.attn_q.weight, ...)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def values(self) -> dict[str, np.ndarray]:
        """What llama.cpp's quantizer weighs with, per tensor: each matrix's sums over its count, flattened over
        the matrices; a matrix no token reached weighs every column as 1 (tools/quantize's load_imatrix)."""
        out = {}
        for name, e in self.entries.items():
            counts = e.counts[:, None]
            out[name] = np.where(counts > 0, e.sums / np.where(counts > 0, counts, 1), 1).astype(np.float32).ravel()
        return out

    def check_shapes(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """Refuse an importance matrix made for another model: llama.cpp's quantizer stops at the first tensor
        whose entry has the wrong size, after writing part of its output. `shapes`: GGUF name -> ggml shape
        (cols first). A matrix with no entry is quantized without one, as llama.cpp does; none at all is refused."""
        shared = [n for n in shapes if n in self.entries]   # in the model's order
        if not shared:
            raise MixqError(f"{source}: no entry of the importance matrix names a tensor of this model (it has "
                            f"{', '.join(sorted(self.entries)[:2]) or 'no entries'}, ...)")
        for name in shared:
            shape = shapes[name]
            need = shape[0] * (shape[2] if len(shape) > 2 else 1)
            got = self.entries[name].sums.size
            if got != need:
                raise MixqError(f"{source}: {name} has {got} values, the model's tensor {list(shape)} needs {need} "
                                f"(an importance matrix of another model?)")

    # ---- files ------------------------------------------------------------------------------------------

    def write(self, path: Path) -> None:
        """The GGUF format, as llama-imatrix writes it (general.architecture is written empty, as llama.cpp's
        own converter does: gguf-py's writer always adds it)."""
        import gguf
        writer = gguf.GGUFWriter(path, arch="")
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(KEYS["datasets"], list(self.datasets))
        writer.add_uint32(KEYS["chunk_count"], int(self.chunk_count))
        writer.add_uint32(KEYS["chunk_size"], int(self.chunk_size))
        for name, e in sorted(self.entries.items()):
            writer.add_tensor(name + SUMS, np.ascontiguousarray(e.sums, dtype=np.float32))
            writer.add_tensor(name + COUNTS, np.ascontiguousarray(e.counts, dtype=np.float32)[:, None])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def read_imatrix(path: str | Path) -> Imatrix:
    """Either format, refused in one line when it is neither or is damaged."""
    path = Path(path)
    if not path.is_file():
        raise MixqError(f"{path}: no such importance matrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except MixqError:
        raise
    except Exception as exc:   # gguf-py's reader on a damaged file: any error is the file's
        raise MixqError(f"{path}: not a readable importance matrix ({type(exc).__name__}: {exc})") from None


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    from .gguf_header import check_header
    check_header(path)   # every count checked against the file before gguf-py reads it
    reader = gguf.GGUFReader(path)
    fields = reader.fields

    def scalar(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    missing = [k for k in KEYS.values() if k not in fields]
    if missing:
        raise MixqError(f"{path}: GGUF without {', '.join(missing)}: not an importance matrix llama.cpp reads")
    tensors = {t.name: t for t in reader.tensors}
    entries = {}
    for name in tensors:
        if not name.endswith(SUMS):
            continue
        stem = name[: -len(SUMS)]
        sums, counts = tensors[name], tensors.get(stem + COUNTS)
        if counts is None:
            raise MixqError(f"{path}: {stem} has sums but no counts")
        if sums.tensor_type != gguf.GGMLQuantizationType.F32 or counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise MixqError(f"{path}: {stem}'s sums and counts must be F32")
        n = int(counts.n_elements)
        if n == 0 or int(sums.n_elements) % n:
            raise MixqError(f"{path}: {stem} has {int(sums.n_elements)} sums for {n} matrices")
        entries[stem] = Entry(np.array(sums.data, dtype=np.float32).reshape(n, -1),
                              np.array(counts.data, dtype=np.float32).reshape(n))
    if not entries:
        raise MixqError(f"{path}: an importance matrix with no entries")
    return Imatrix(entries, [str(d) for d in scalar(KEYS["datasets"])], int(scalar(KEYS["chunk_count"])),
                   int(scalar(KEYS["chunk_size"])))


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise MixqError(f"{path}: {what} at byte {pos} runs past the end of the file ({len(data)} bytes): "
                            f"truncated, or not an importance matrix (GGUF or llama.cpp's legacy .dat)")
        value = struct.unpack_from(fmt, data, pos)
        pos += size
        return value

    (count,) = take("<i", "the entry count")
    if not 0 < count <= 1 << 20:
        raise MixqError(f"{path}: not an importance matrix (GGUF or llama.cpp's legacy .dat)")
    entries = {}
    for i in range(count):
        (length,) = take("<i", f"entry {i}'s name length")
        if not 0 < length < 1024:
            raise MixqError(f"{path}: entry {i} has a name of {length} bytes: not an importance matrix")
        name = take(f"<{length}s", f"entry {i}'s name")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii", f"{name}'s counts")
        if nval < 1:
            raise MixqError(f"{path}: {name} has {nval} values")
        start = pos
        take(f"<{4 * nval}x", f"{name}'s {nval} values")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=start)
        # the legacy file's values are already sums / tokens-per-call x ncall: ncall is their count
        entries[name] = Entry(values.astype(np.float32).reshape(1, nval), np.array([ncall], dtype=np.float32))
    chunks, datasets = 0, []
    if pos < len(data):
        (chunks,) = take("<i", "the chunk count")
        if pos < len(data):
            (length,) = take("<i", "the dataset name's length")
            if length > 0:
                datasets.append(take(f"<{length}s", "the dataset name")[0].decode("utf-8", "replace"))
    return Imatrix(entries, datasets, chunks, 0)
