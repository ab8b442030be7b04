"""Outputs appear whole or not at all.

Everything is written into a temporary folder beside the target and moved into place at the end, so a failed
or interrupted run leaves the target as it was; an existing target is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MixqError


def refuse_existing(targets: list[Path], force: bool) -> None:
    for target in targets:
        if (target.exists() or target.is_symlink()) and not force:  # a dangling link is there too
            raise MixqError(f"{target} already exists (use --force to replace it)")


def refuse_overlap(inputs: list[Path], out: Path) -> None:
    """No output may equal, contain or lie inside an input: with --force, replacing it would delete the input."""
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source == target or target in source.parents or source in target.parents:
            how = "is" if source == target else "contains" if target in source.parents else "lies inside"
            raise MixqError(f"{out}: the output {how} the input {given}; choose an output outside it")


@contextlib.contextmanager
def staged_dir(target: Path, force: bool):
    """Yield a temporary folder that becomes `target` when the block succeeds."""
    target = Path(target)
    refuse_existing([target], force)
    with claim(target), scratch_beside(target) as stage:
        yield stage
        refuse_existing([target], force)  # what another program put there meanwhile is not replaced either
        replace_path(stage, target)


@contextlib.contextmanager
def scratch_beside(target: Path):
    """A temporary folder beside `target` (same file system, so moves are renames), removed at the end."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = _make_stage(target)
    try:
        yield stage
    except OSError as exc:  # named while the staging still fills the disk, then removed
        raise _named(exc, target) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def claim(target: Path):
    """Be the only mixq writing `target` for the block, and make write failures name it.

    A second writer refuses at once instead of racing the first to the final rename. The lock is flock(2) on a
    file beside the target, so it dies with its process; once it is held, staging left by a killed writer of
    the same target is swept. A failed write (a full or read-only disk) ends as one line naming the path.
    """
    target = Path(target)
    lock = target.parent / f".{target.name}.mixq-lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _named(exc, target) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(lock).st_ino:  # the holder finished and removed it meanwhile
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise MixqError(f"{target}: another mixq process is writing it (lock {lock})") from None
        for stale in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        try:
            yield
        except OSError as exc:
            raise _named(exc, target) from None
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _named(exc: OSError, target: Path) -> MixqError:
    why = exc.strerror or str(exc)
    if exc.errno is None and _disk_full(target):  # numpy's short write ("N requested and M written") has no errno
        why = f"{os.strerror(errno.ENOSPC)} ({why})"
    return MixqError(f"{exc.filename or target}: {why}")


def _disk_full(target: Path) -> bool:
    try:
        return shutil.disk_usage(target.parent).free < 1 << 16
    except OSError:
        return False


@contextlib.contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path` that becomes it when the block succeeds and is removed when it fails:
    a reader never sees half a file, and a failed write leaves the old one in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: Path, data: bytes | str) -> Path:
    """`path` holding `data`, written through `staged_file`."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def publish(files: list[Path], folder: Path, force: bool) -> list[Path]:
    """Move finished files into `folder` under their own names."""
    finals = [folder / f.name for f in files]
    refuse_existing(finals, force)
    for f, final in zip(files, finals):
        replace_path(f, final)
    return finals


def _make_stage(target: Path) -> Path:
    """mkdtemp's folder is private (0700); give it the permissions a plain mkdir would."""
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)
    return stage


def replace_path(new: Path, target: Path) -> None:
    """Move `new` onto `target`, removing what was there only once `new` is in place."""
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(new, target)
