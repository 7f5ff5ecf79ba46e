"""Error text on one line: the product's messages end up in task logs, summaries, MLflow tags
and a terminal, and each must read as one line whatever the library underneath printed."""

from __future__ import annotations


def one_line(value: object, limit: int | None = None) -> str:
    """`value` (an exception or text) with its whitespace runs, newlines included, made single
    spaces, cut to `limit` characters when one is given; an exception without a message gives
    its type's name."""
    text = " ".join(str(value).split())
    if not text:
        text = type(value).__name__ if isinstance(value, BaseException) else "no detail"
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
