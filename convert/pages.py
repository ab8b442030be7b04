"""Give back the pages of a file-backed tensor once it has been consumed.

Pages of a memory-mapped file that a conversion has read stay in the process's resident set until the kernel
needs them, so a streaming conversion would otherwise end with the whole input counted in its RSS. The readers
call `drop_file_pages` on their own read-only (or copy-on-write, never written) mappings after each tensor;
the data stays valid, since the next access faults it in from the file again.
"""

from __future__ import annotations

import ctypes
import mmap

_PAGE = mmap.PAGESIZE
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _libc = False
    return _libc.madvise if _libc else None


def drop_file_pages(address: int, nbytes: int) -> None:
    """MADV_DONTNEED on the whole pages inside [address, address + nbytes) of an unmodified file mapping."""
    madvise = _madvise()
    if madvise is None or nbytes <= 0:
        return
    start = (address + _PAGE - 1) // _PAGE * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if end > start:
        madvise(start, end - start, getattr(mmap, "MADV_DONTNEED", 4))
