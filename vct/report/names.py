"""The names of the files a report writes in the run folder, and which names are reserved.

One place for the layout: the index ``report.html`` and its pages ``report-N.html``, the contact
sheets ``contact_sheet.png`` / ``contact_sheet-N.png``, the ``thumbs`` folder, ``run.json`` and
``_SUCCESS``; :func:`is_reserved` is what the engine asks before it names an output.
"""

from __future__ import annotations

import re

THUMBS_DIR = "thumbs"

RESERVED_NAMES: frozenset[str] = frozenset(
    {"run.json", "_SUCCESS", "report.html", "contact_sheet.png", THUMBS_DIR}
)
"""Fixed names the report writes at the top of the run folder (``thumbs`` is a folder). The
numbered pages ``report-N.html`` / ``contact_sheet-N.png`` are reserved too: see
:func:`is_reserved`, which is what the engine should ask."""

_RESERVED_NUMBERED = re.compile(r"(?:report-\d+\.html|contact_sheet-\d+\.png)", re.IGNORECASE)
_RESERVED_FOLDED = frozenset(n.casefold() for n in RESERVED_NAMES)


def is_reserved(name: str) -> bool:
    """Whether ``name`` (relative to the run folder) is, or is under, a file the report writes.

    The engine refuses output names for which this is true (for ``<name>.png`` and
    ``<name>.json``), so an output can never overwrite the report or vice versa. Compared
    ignoring case because a downloaded run folder may land on a case-insensitive file system.
    """
    clean = name.strip()
    while clean.startswith("./"):
        clean = clean[2:]
    folded = clean.casefold()
    if folded in _RESERVED_FOLDED or _RESERVED_NUMBERED.fullmatch(clean):
        return True
    return folded.startswith(THUMBS_DIR + "/")


def join_uri(base: str, name: str) -> str:
    """``base/name`` for a local path or an ``s3://`` URI alike (``/`` separators always)."""
    return f"{base.rstrip('/')}/{name}" if base else name


def page_name(number: int) -> str:
    """File name of HTML page ``number`` (1-based); page 1 is the index."""
    return "report.html" if number == 1 else f"report-{number}.html"


def sheet_name(number: int) -> str:
    """File name of contact sheet ``number`` (1-based)."""
    return "contact_sheet.png" if number == 1 else f"contact_sheet-{number}.png"
