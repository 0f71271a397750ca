"""Identifiers: 26 lowercase Crockford base32 characters, sortable by creation time, URL-safe.

48 bits of milliseconds then 80 random bits (the ULID layout), so ids sort by age, any prefix is a
valid lookup key, and no two processes need to agree on a counter.
"""

from __future__ import annotations

import os
import time
import unicodedata

from convo.errors import InvalidInput

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
LENGTH = 26


def new_id(now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(LENGTH):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def normalize_prefix(prefix: str) -> str | None:
    """Lowercase and map Crockford's look-alikes; None when it cannot be the start of an id."""
    if not isinstance(prefix, str):
        return None
    p = prefix.strip().lower().replace("o", "0").replace("i", "1").replace("l", "1")
    if not p or len(p) > LENGTH or any(c not in ALPHABET for c in p):
        return None
    return p


def prefix_range(prefix: str) -> tuple[str, str]:
    """[low, high) bounds of every id starting with a normalized prefix, for an index range scan.

    Ids use only [0-9a-z], whose order is the same under byte and locale collations.
    """
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


BRANCH_NAME_MAX = 200


# Control characters, and line and paragraph separators: what splits a row of `branches` or
# `tree`, or rewrites the terminal. (Not str.isprintable(): it also refuses the joiners and
# marks that Persian, Devanagari or emoji sequences need, and characters newer than Python.)
_NOT_IN_A_NAME = frozenset(("Cc", "Cs", "Zl", "Zp"))  # (Cs: a lone surrogate, not text at all)
# Bidirectional overrides and isolates: they reorder what follows on screen, so a name could
# show as another one.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def is_text(value: str) -> bool:
    """Whether UTF-8 can carry `value`: no lone surrogate, as a stray byte decoded with
    surrogateescape (argv, a file name) leaves. Every store and the API refuse one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def without_controls(value: str) -> str:
    """`value` with each control character (C0, DEL, C1) replaced by U+FFFD: for identifiers a
    server hands convo (a stop reason, a request id), which it stores rather than refuses, and
    which must never carry a line break or a terminal escape into what convo prints."""
    if value.isprintable():
        return value
    return "".join("\ufffd" if _is_control(c) else c for c in value)


def has_controls(value: str) -> bool:
    """Whether `value` holds a control character (C0, DEL, C1); printable text is checked at
    C speed, and only text with some other unprintable character (a no-break space, a joiner:
    fine in a file name) character by character."""
    return not value.isprintable() and any(_is_control(c) for c in value)


def _is_control(c: str) -> bool:
    o = ord(c)
    return o < 0x20 or 0x7F <= o < 0xA0


def check_branch_name(name: str) -> None:
    """Refuse a branch name that cannot be shown on one line and typed back: no control
    characters or line breaks, no spaces at either end, at most BRANCH_NAME_MAX characters."""
    if not isinstance(name, str):
        raise InvalidInput(f"a branch name is a string, not {type(name).__name__}")
    if (
        not name.strip() or name != name.strip() or len(name) > BRANCH_NAME_MAX
        or any(unicodedata.category(c) in _NOT_IN_A_NAME or c in _BIDI_CONTROLS for c in name)
    ):
        raise InvalidInput(
            f"invalid branch name {name!r}: one line with no control characters, at most "
            f"{BRANCH_NAME_MAX} characters, no spaces at either end"
        )
