"""The anchors (AutoAWQ 0.2.9, GPTQModel 7.6.0; a copy of shared/anchors) installed from their wheels into a
throw-away target, so this environment and its transformers stay as they are."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def anchor_env(anchors: Path, name: str, **extra: str) -> dict:
    """Environment for a child interpreter that imports anchor `name` (its wheels first on the path, then its stubs)."""
    anchors = anchors.resolve()
    wheels = sorted(str(p) for p in (anchors / name / "wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{anchors / name / 'wheels'}: no wheels (pass a copy of shared/anchors)")
    target = tempfile.mkdtemp(prefix=f"anchor-{name}-")
    atexit.register(shutil.rmtree, target, True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", target,
                    *wheels], check=True)
    return {**os.environ, **extra, "PYTHONPATH": f"{target}:{anchors / name / 'stub'}"}
