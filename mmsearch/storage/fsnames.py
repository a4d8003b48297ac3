"""File names as the catalog keeps them: losslessly, including names that are not valid UTF-8.

A Latin-1 `café.png` from an old camera or a Windows share is the bytes b'caf\\xe9.png'. Python hands it
to us as the str 'caf\\udce9.png' (os.fsdecode's surrogateescape), which opens the file again but cannot
be written to SQLite as text. The catalog stores every path as the exact bytes of its name in the
TEXT column (`CAST(? AS TEXT)` of those bytes: SQLite keeps TEXT as bytes and does not check UTF-8), so
a valid name is stored exactly as before and an odd one round-trips byte for byte. Paths are read back
as bytes (`CAST(path AS BLOB)`) and decoded with surrogateescape here; the order of the TEXT column is
the order of those bytes, which is also the order the folder walk yields (scan.py sorts by these bytes).

What users see is never a lone surrogate: `display` shows each undecodable byte as U+FFFD, and JSON
gets that readable form plus `path_b64`, the exact bytes, for names that need it.
"""
from __future__ import annotations

import base64
from typing import Any

ENCODING = "utf-8"
ERRORS = "surrogateescape"


def to_db(path: str) -> bytes:
    """The bytes a path is stored as (the file system's own bytes for a name that is not UTF-8)."""
    return path.encode(ENCODING, ERRORS)


def from_db(raw) -> str:
    """The path a stored value stands for (bytes from `CAST(path AS BLOB)`, or a str from older code)."""
    return raw if isinstance(raw, str) else bytes(raw).decode(ENCODING, ERRORS)


def is_exact(text: str) -> bool:
    """Whether `text` is valid Unicode (no surrogate standing for an undecodable byte)."""
    if text.isascii():
        return True
    try:
        text.encode(ENCODING)
    except UnicodeEncodeError:
        return False
    return True


def display(text: str) -> str:
    """`text` as a person can read it: each byte that is not UTF-8 becomes U+FFFD."""
    return text if is_exact(text) else text.encode(ENCODING, ERRORS).decode(ENCODING, "replace")


def path_fields(path: str, key: str = "path") -> dict:
    """{key: readable path} plus {key_b64: the exact bytes} when the name is not valid UTF-8."""
    if is_exact(path):
        return {key: path}
    return {key: display(path), f"{key}_b64": base64.b64encode(to_db(path)).decode("ascii")}


def json_safe(obj: Any) -> Any:
    """`obj` with every str that cannot go into UTF-8 JSON made readable; a dict's "path" also gains
    "path_b64" (the exact bytes). Valid data is returned unchanged (the same objects)."""
    if isinstance(obj, str):
        return display(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(v, str) and not is_exact(v) and k in ("path", "folder", "name"):
                out.update(path_fields(v, k))
            else:
                out[k] = json_safe(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
