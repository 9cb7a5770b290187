"""sha256 of files, memoised by (size, mtime) in a small JSON file.

A Stable Diffusion checkpoint is 2-4 GB: hashing it for the model's identity takes seconds, and
the CLI, the planner and every worker process each need that identity. The memo makes it one
hash per file version. The memo is only an optimisation: one that cannot be written (a read-only
model folder) costs a rehash next time, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """Hashes kept in `path` under a caller's key, each valid for one (size, mtime)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.memo = json.loads(path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.changed = False

    def sha256(self, file: Path, key: str) -> str:
        st = file.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        entry = self.memo.get(key)
        if not entry or entry[0] != stamp:
            entry = [stamp, sha256_file(file)]
            self.memo[key] = entry
            self.changed = True
        return str(entry[1])

    def save(self) -> None:
        """Write the memo (atomically) if a hash was added."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
            tmp.write_text(json.dumps(self.memo))
            os.replace(tmp, self.path)
            self.changed = False
        except OSError:
            pass  # a read-only folder only loses the memo
