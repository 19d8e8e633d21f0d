"""Text from clients and files made safe to print: one line, valid UTF-8, no terminal control, bounded length."""

from __future__ import annotations

import unicodedata

LIMIT = 200  # characters of a client-supplied name kept in a message; the rest is cut with "…"


def _escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe(text: object, limit: int | None = LIMIT) -> str:
    """`text` with control, format and surrogate characters (and backslashes before them) escaped, cut at `limit`."""
    value = text if isinstance(text, str) else str(text)
    if limit is not None and len(value) > limit:
        value = value[:limit] + "…"
    if value.isprintable():  # the common case: nothing to escape (isprintable is False for every Cc/Cf/Cs/Zl/Zp)
        return value
    return "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in value)


def is_control(ch: str) -> bool:
    """A character that must never reach a terminal or a log raw."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
