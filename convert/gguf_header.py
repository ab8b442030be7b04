"""A GGUF header walked with every count, length and offset checked against the bytes that remain.

gguf-py's reader trusts the header: a uint8 array of 2^60 elements makes it loop forever, a string array costs
it ~200 bytes per element, a tensor count of 2^60 allocates before it fails. So mixq walks the header first,
without building anything, and hands gguf-py only a file whose every count fits in the file and in
`LIMITS`. The layout is GGUF v2/v3 (little-endian): magic, version u32, tensor count u64, metadata count u64,
the key/value pairs, the tensor infos, padding to `general.alignment`, the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .errors import MixqError

# value type id -> struct format of one element (None: string, array)
VALUE_TYPES = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 8: None, 9: None,
               10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
LIMITS = {
    "string array elements": 1 << 21,  # Gemma's 262k tokens and Llama-3's 280k merges fit ~8 times over
    "string bytes": 1 << 26,           # the longest strings are chat templates (tens of KB)
}


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> int:
        """Advance over `n` bytes, refusing to pass the end of the file; returns where they start."""
        if n > len(self.data) - self.pos:
            raise MixqError(f"{self.path}: {what} at byte {self.pos} needs {n} bytes but the file ends at "
                            f"{len(self.data)} (truncated or not a GGUF file)")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", f"length of {what}")
        if n > LIMITS["string bytes"]:
            raise MixqError(f"{self.path}: {what} at byte {self.pos - 8} claims {n} bytes, over the "
                            f"{LIMITS['string bytes']} a GGUF string may have here")
        start = self.take(n, what)
        return bytes(self.data[start:start + n])


def check_header(path: Path, tensor_types: dict[int, tuple[int, int]] | None = None) -> None:
    """Refuse, in one line, any GGUF whose header would make a reader read or allocate past the file.

    `tensor_types` maps each known ggml type id to its (block size, bytes per block); by default gguf-py's.
    """
    if tensor_types is None:
        import gguf
        tensor_types = {t.value: gguf.GGML_QUANT_SIZES[t] for t in gguf.GGMLQuantizationType
                        if t in gguf.GGML_QUANT_SIZES}
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise MixqError(f"{path}: empty file, not a GGUF")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _walk(_Cursor(data, path), tensor_types)


def _walk(c: _Cursor, tensor_types: dict[int, tuple[int, int]]) -> None:
    path = c.path
    if bytes(c.data[:4]) != b"GGUF":
        raise MixqError(f"{path}: not a GGUF file (magic {bytes(c.data[:4])!r}, expected b'GGUF')")
    c.take(4, "magic")
    version = c.unpack("<I", "version")
    if version & 0xFFFF == 0:
        raise MixqError(f"{path}: big-endian GGUF is not supported")
    if version not in (2, 3):
        raise MixqError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    # the smallest key/value pair is 13 bytes, the smallest tensor info 32: counts beyond that cannot fit
    for count, least, what in ((n_kv, 13, "metadata pairs"), (n_tensors, 32, "tensors")):
        if count * least > len(c.data) - c.pos:
            raise MixqError(f"{path}: header claims {count} {what}, more than a file of {len(c.data)} bytes "
                            f"can hold")
    keys: set[str] = set()
    alignment = 32
    for _ in range(n_kv):
        key = _unique(c, keys, "metadata key")
        kind = c.unpack("<I", f"type of {key}")
        value = _skip_value(c, kind, key)
        if key == "general.alignment":
            if kind != 4 or not value or value & (value - 1):
                raise MixqError(f"{path}: general.alignment must be a uint32 power of two, got {value!r}")
            alignment = value
    tensors = []
    names: set[str] = set()
    for _ in range(n_tensors):
        name = _unique(c, names, "tensor name")
        n_dims = c.unpack("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise MixqError(f"{path}: tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = [c.unpack("<Q", f"dimensions of {name}") for _ in range(n_dims)]
        type_id = c.unpack("<I", f"type of {name}")
        if type_id not in tensor_types:
            raise MixqError(f"{path}: tensor {name} has unknown ggml type id {type_id}")
        offset = c.unpack("<Q", f"offset of {name}")
        block, block_bytes = tensor_types[type_id]
        elements = 1
        for d in dims:
            elements *= d
        if dims[0] % block:
            raise MixqError(f"{path}: tensor {name}: row of {dims[0]} is not a multiple of its type's block "
                            f"of {block}")
        tensors.append((name, offset, elements // block * block_bytes))
    data_start = -(-c.pos // alignment) * alignment
    for name, offset, nbytes in tensors:
        if offset % alignment or data_start + offset + nbytes > len(c.data):
            raise MixqError(f"{path}: tensor {name} at data offset {offset} ({nbytes} bytes) is misaligned or "
                            f"past the end of the file ({len(c.data)} bytes)")


def _skip_value(c: _Cursor, kind: int, key: str):
    """Step over one value; returns it when it is a number (for the few the walk needs), else None."""
    if kind not in VALUE_TYPES:
        raise MixqError(f"{c.path}: metadata {key} has unknown value type id {kind}")
    if kind == STRING:
        c.string(f"value of {key}")
        return None
    if kind != ARRAY:
        return c.unpack(VALUE_TYPES[kind], f"value of {key}")
    item = c.unpack("<I", f"element type of {key}")
    count = c.unpack("<Q", f"length of {key}")
    if item not in VALUE_TYPES or item == ARRAY:
        raise MixqError(f"{c.path}: metadata {key} is an array of unsupported type id {item}")
    if item == STRING:
        if count > LIMITS["string array elements"] or count * 8 > len(c.data) - c.pos:
            raise MixqError(f"{c.path}: metadata {key} claims {count} strings, over what this file or the "
                            f"limit of {LIMITS['string array elements']} allows")
        for _ in range(count):
            c.string(f"element of {key}")
        return None
    c.take(count * struct.calcsize(VALUE_TYPES[item]), f"{count} elements of {key}")
    return None


def _unique(c: _Cursor, seen: set[str], what: str) -> str:
    """The next string: a name that may appear only once in the file."""
    name = _text(c.string(what), c.path, what)
    if name in seen:
        raise MixqError(f"{c.path}: {what} {name} appears twice")
    seen.add(name)
    return name


def _text(raw: bytes, path: Path, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MixqError(f"{path}: {what} {raw[:40]!r} is not UTF-8") from None
