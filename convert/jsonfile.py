"""The one reader of the JSON files a user hands mixq (configs, indexes, params, reports): whatever is wrong
with one ends as a MixqError naming the file and the place, never as an internal error."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MixqError


def read_json(path: str | Path, missing_ok: bool = False) -> dict | None:
    """The JSON object in `path`; None when it does not exist and `missing_ok`."""
    path = Path(path)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise MixqError(f"{path}: missing") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise MixqError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise MixqError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise MixqError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(value, dict):
        raise MixqError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
