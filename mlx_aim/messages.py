"""Wording shared by the messages of the library and the command line."""

from __future__ import annotations

import re

# C0 controls (ESC starts terminal escape sequences), DEL, C1 controls, and the Unicode marks
# that reorder the text shown around them (bidirectional overrides and isolates).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """``"1 file"``, ``"3 files"`` (``plural_noun`` for irregular nouns)."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"


def accuracy(top1: float, top5: float | None, classes: int) -> str:
    """``top-1 92.50%  top-5 99.10%``; top-5 only with more than 5 classes (else always 100%)."""
    text = f"top-1 {100 * top1:.2f}%"
    if top5 is not None and classes > 5:
        text += f"  top-5 {100 * top5:.2f}%"
    return text


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``, ``\\u202e``), so a file or
    member name cannot move the cursor, recolour the terminal or reorder what is printed."""
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text)
