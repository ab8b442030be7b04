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


@contextlib.contextmanager
def staged_dir(target: Path, force: bool, keep_on_error: bool = False):
    """Yield a temporary folder that becomes `target` when the block succeeds."""
    target = Path(target)
    refuse_existing([target], force)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield stage
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    replace_path(stage, target)


@contextlib.contextmanager
def staged_files(targets: list[Path], force: bool):
    """Yield a temporary folder; each file named like a target in it is moved onto that target at the end."""
    refuse_existing(targets, force)
    parent = targets[0].parent
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{targets[0].name}.", suffix=".partial", dir=parent))
    try:
        yield stage
        for target in targets:
            os.replace(stage / target.name, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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
