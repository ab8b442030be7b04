"""The engine's I/O beside its compute: the next layer read while the current one is quantized, each finished layer
(and the resume checkpoint that names it) written while the next one is.

Each side is one worker thread with at most one task in flight, so what it holds is one layer more than the loop
(read ahead: the next layer's weights on the host, only when the host can spare them; written behind: the tensors
the loop has just finished with) and the order on disk is the order of the layers: a layer file is complete before
the progress that counts it is saved. A worker's error is raised in the loop at its next handoff.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable


class Behind:
    """Tasks run one after another on a worker thread, the caller waiting only for the one before."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"mixq-{name}")
        self._pending: Future | None = None

    def submit(self, task: Callable, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(task, *args)

    def wait(self) -> None:
        """Until the task in flight is done; its error raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, failing: bool = False) -> None:
        """Finish the task in flight (a write is never abandoned halfway: it is staged, then renamed); when the loop
        is already failing, the worker's own error gives way to the loop's."""
        try:
            self.wait()
        except BaseException:
            if not failing:
                raise
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "Behind":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(failing=kind is not None)


class Ahead(Behind):
    """`load(i)` for each i in order, the next one read on the worker while the caller works on the current one
    (read in turn by the caller when `enabled` is false: no room for a layer more)."""

    def __init__(self, load: Callable, indices: range, enabled: bool = True):
        super().__init__("reader")
        self._load, self._indices, self._enabled = load, indices, enabled

    def __iter__(self):
        if not self._enabled:
            yield from ((i, self._load(i)) for i in self._indices)
            return
        for i in self._indices:
            if self._pending is None:
                self._pending = self._pool.submit(self._load, i)
            loaded = self._pending.result()
            self._pending = self._pool.submit(self._load, i + 1) if i + 1 in self._indices else None
            yield i, loaded
