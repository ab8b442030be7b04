"""Outputs appear whole or not at all.

Everything is written into a temporary folder beside the target and moved into place at the end, so a failed
or interrupted run leaves the target as it was; an existing target is replaced only with `force`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MixqError


def refuse_existing(targets: list[Path], force: bool) -> None:
    for target in targets:
        if target.exists() and not force:
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
def staged_dir(target: Path, force: bool, keep_on_error: bool = False):
    """Yield a temporary folder that becomes `target` when the block succeeds."""
    target = Path(target)
    refuse_existing([target], force)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = _make_stage(target)
    try:
        yield stage
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_path(stage, target)


@contextlib.contextmanager
def scratch_beside(target: Path):
    """A temporary folder beside `target` (same file system, so moves are renames), removed at the end."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = _make_stage(target)
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(files: list[Path], folder: Path, force: bool) -> list[Path]:
    """Move finished files into `folder` under their own names."""
    finals = [folder / f.name for f in files]
    refuse_existing(finals, force)
    for f, final in zip(files, finals):
        os.replace(f, final)
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
