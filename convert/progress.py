"""Progress bars and notes on stderr, silenced for scripts (`--quiet`, `--json`)."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", unit_scale: bool = False,
        initial: int = 0):
    """A tqdm bar on stderr, with rate and ETA."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=_quiet,
                file=sys.stderr, dynamic_ncols=True, leave=False, initial=initial)


def note(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr)


def is_quiet() -> bool:
    return _quiet


def human_bytes(n: int) -> str:
    """1000-based, as file sizes are shown on model hubs."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)
