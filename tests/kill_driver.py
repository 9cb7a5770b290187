"""The kill-and-resume harness's victim: ``python -m tests.kill_driver '<json>'`` runs the batch
engine once, exactly as ``vct run`` does minus Prefect (the harness also kills real ``vct run``
processes; this one starts in a few seconds instead of tens). ``VCT_TEST_KILL_AT`` in its
environment picks where it dies (vct/faults.py)."""

from __future__ import annotations

import json
import sys


def main() -> int:
    spec = json.loads(sys.argv[1])
    from vct.batch import engine

    request = engine.prepare(spec["manifest"], spec["output"], spec["model"], spec["settings"],
                             spec["run_id"])
    summary = engine.run(request)
    print(summary.message)
    return 0 if summary.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
