"""A model named by its Hub id, ORG/NAME[@REVISION], fetched once into mixq's cache: only what mixq reads
(safetensors shards and index, configs, tokenizer files, the model card for its license and languages), so a
repository's .bin or .gguf duplicates are not downloaded. A local folder of that name wins."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .errors import MixqError

HUB_MODEL = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "params.json",
         "tokenizer*", "special_tokens_map.json", "*.model", "chat_template*", "README.md"]


def cache_dir() -> Path:
    """$MIXQ_CACHE, else ~/.cache/mixq: downloads and built wheels, kept between runs."""
    path = Path(os.environ.get("MIXQ_CACHE") or Path.home() / ".cache" / "mixq")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(model: str | Path) -> str | Path:
    """`model` itself when it is a local path or no Hub id; else the local folder of its snapshot."""
    found = HUB_MODEL.match(str(model))
    if Path(model).exists() or not found:
        return model
    repo, revision = found["repo"], found["revision"]
    from huggingface_hub import snapshot_download
    dest = cache_dir() / "hub" / (repo + (f"@{revision}" if revision else ""))
    existed = dest.exists()
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=FILES, local_dir=dest))
    except Exception as e:  # offline, unknown, gated: the one line says what to do instead
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        raise MixqError(f"{model}: no such local folder, and the Hub did not give it ({type(e).__name__}: "
                        f"{reason}); download it (hf download {repo} --local-dir DIR) and pass DIR") from None
