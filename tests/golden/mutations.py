"""Break one formula of `vct/` at a time and check that the fidelity tests fail (docs/fidelity.md).

    PYTHONPATH=. python -m tests.golden.mutations                 # every mutation
    PYTHONPATH=. python -m tests.golden.mutations loss_sign lr_const

`tests/golden/mutations.json` lists each mutation as exact text replacements in `vct/`. For each
one this copies `vct/` and `tests/` into a scratch folder, applies the edits there (never in the
checkout, so an interrupted run cannot leave a broken formula behind), runs the fidelity test
files on the copy and prints the tests that failed with their assertion messages. A mutation
whose text no longer occurs once is reported as stale. It exits non-zero unless pytest finished
with failures for every mutation. Minutes of CPU: not part of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTATIONS = Path(__file__).with_name("mutations.json")
TESTS = ["tests/test_inversion.py", "tests/test_content.py", "tests/test_concept.py",
         "tests/test_fusion.py", "tests/test_fidelity_golden.py"]


def run(name: str, edits: list[dict]) -> bool:
    """True when pytest ran to its end on the mutated copy with at least one failure."""
    with tempfile.TemporaryDirectory(prefix=f"fidelity-mutant-{name}-") as tmp:
        copy = Path(tmp)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for part in ("vct", "tests"):
            shutil.copytree(ROOT / part, copy / part, ignore=ignore)
        shutil.copy2(ROOT / "pyproject.toml", copy / "pyproject.toml")  # pytest's settings
        for edit in edits:
            path = copy / edit["file"]
            text = path.read_text()
            if text.count(edit["old"]) != 1:
                print(f"### {name}: stale (the text to replace is not in {edit['file']} once)")
                return False
            path.write_text(text.replace(edit["old"], edit["new"]))
        env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--rootdir", str(copy), "--tb=line", "-rf", *TESTS], cwd=copy,
                              env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    summary = [line for line in lines if " passed" in line or " failed" in line]
    print(f"### {name}: {summary[-1] if summary else 'no summary'} (pytest exit "
          f"{proc.returncode})", flush=True)
    for line in lines:
        if line.startswith("FAILED") or line.startswith("E   "):
            print("   ", line[:300], flush=True)
    if proc.returncode not in (0, 1):  # interrupted, internal error, crash: not a verdict
        print("    pytest did not finish normally:", proc.stderr[-300:], flush=True)
    return proc.returncode == 1


def main(argv: list[str]) -> int:
    table = json.loads(MUTATIONS.read_text())
    unknown = [name for name in argv if name not in table]
    if unknown:
        print(f"unknown mutations: {', '.join(unknown)}; known: {', '.join(table)}")
        return 2
    missed = [name for name in (argv or list(table)) if not run(name, table[name])]
    print("caught every mutation" if not missed else
          f"NOT caught (or stale, or pytest did not finish): {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
