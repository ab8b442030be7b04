"""What a published file may say about where things came from: a Hub id (ORG/NAME) names a model or dataset for
every reader; a local path names nothing to them and tells them the publisher's folders. Reports written into
a repository keep the last part of each path, and carry what the source's own model card says (license,
languages) so that the card made later needs no path to find it."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import MixqError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# report fields that may hold a local path (a model, a reference, a calibration or evaluation file, a tokenizer)
PATH_FIELDS = ("model", "reference", "source", "tokenizer_name", "prepared_file")
CARD_FIELDS = ("license", "license_name", "language", "base_model")


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub id (ORG/NAME) and not a local folder, else None."""
    if not name or not HUB_ID.match(str(name)) or Path(name).exists():
        return None
    return str(name)


def public_name(name: str | None) -> str | None:
    """A local path (absolute, or one that exists here) as its last part; anything else (a Hub id, hf:ID,
    ORG/NAME:CONFIG, a built-in text) as it is."""
    if not name:
        return name
    path = Path(str(name))
    return path.name if path.is_absolute() or path.exists() else str(name)


def published(record):
    """`record` (a report: nested dicts and lists) with every path field reduced to its public name."""
    if isinstance(record, dict):
        return {k: public_name(v) if k in PATH_FIELDS and isinstance(v, str) else published(v)
                for k, v in record.items()}
    if isinstance(record, list):
        return [published(v) for v in record]
    return record


def source_card(model: str | Path | None) -> dict:
    """License, languages and the model it was made from (its base_model), from the front matter of a local
    model folder's README.md, and the card's text ("text", for the cards made from it); {} without one."""
    readme = Path(model) / "README.md" if model else None
    if readme is None or not readme.is_file():
        return {}
    from huggingface_hub import ModelCard
    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception as e:  # a malformed card is the source's problem; say which file
        raise MixqError(f"{readme}: unreadable model card front matter ({e})") from None
    fields = {k: data[k] for k in CARD_FIELDS if data.get(k)}
    text = readme.read_text(errors="replace")
    body = text.split("---\n", 2)[2] if text.startswith("---\n") and text.count("---\n") >= 2 else text
    return fields | ({"text": body.strip()} if body.strip() else {})
