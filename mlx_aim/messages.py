"""Wording shared by the messages of the library and the command line."""

from __future__ import annotations


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """``"1 file"``, ``"3 files"`` (``plural_noun`` for irregular nouns)."""
    return f"{count} {noun if count == 1 else plural_noun or noun + 's'}"


def accuracy(top1: float, top5: float | None, classes: int) -> str:
    """``top-1 92.50%  top-5 99.10%``; top-5 only with more than 5 classes (else always 100%)."""
    text = f"top-1 {100 * top1:.2f}%"
    if top5 is not None and classes > 5:
        text += f"  top-5 {100 * top5:.2f}%"
    return text
