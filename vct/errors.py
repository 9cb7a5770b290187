"""The one base class of the errors a user can fix.

Every exception that subclasses :class:`UserError` carries a complete one-line answer naming the
file, row, flag or field: the CLI prints it without a traceback (exit 2), and the batch engine
reports it against the row or job it belongs to. Anything else is a bug or an infrastructure
failure and keeps its type name in reports.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input of any kind: settings, model folders, images, files, manifests, storage
    locations, stage results that cannot be used."""
