"""The summary of a release: every checked artifact under a folder with its numbers."""

from __future__ import annotations

from pathlib import Path

from mixq.convert.errors import MixqError

from ..check import CHECK_FILE, read_check


def artifact_bytes(path: Path) -> int:
    """Size of a GGUF file, or of a repository's weight files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".gguf"))


def release_summary(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MixqError(f"{folder}: no such folder")
    found = [(p.parent, p) for p in sorted(folder.rglob(CHECK_FILE))]
    found += [(p.with_name(p.name[: -len(".check.json")] + ".gguf"), p) for p in sorted(folder.rglob("*.check.json"))]
    if not found:
        raise MixqError(f"{folder}: no checked artifacts ({CHECK_FILE} or *.check.json)")
    rows = []
    for artifact, check_file in found:
        check = read_check(check_file)
        rows.append({"artifact": str(artifact.relative_to(folder)),
                     "bytes": artifact_bytes(artifact) if artifact.exists() else 0,
                     **{k: check.get(k) for k in ("perplexity", "reference_perplexity", "delta_percent", "kl",
                                                  "tokens", "method", "seqlen")}})
    return rows
