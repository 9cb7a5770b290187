"""What keeps every page, sheet and artifact bounded whatever a manifest holds: how many
failures are listed, how long a piece of user text may be, and :func:`clip`, which cuts it."""

from __future__ import annotations

from typing import Any

MAX_FAILURES_SHOWN = 200
"""Failures listed in ``report.html`` and the markdown artifact; ``run.json`` has them all."""

MAX_LABEL_CHARS = 32

# Text clipped in pages and artifacts (run.json keeps the full text). These bound a page's size
# whatever a CSV or an exception message contains: escaping can grow text ~6x.
CLIP_ID = 160
CLIP_URI = 240
CLIP_REASON = 400
CLIP_META = 500


def clip(text: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """One readable line of at most ``limit`` characters; also drops control characters."""
    clean = "".join(ch if ch.isprintable() else " " for ch in str("" if text is None else text))
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
