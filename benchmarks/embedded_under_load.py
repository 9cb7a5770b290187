"""Reproduce (or rule out) the embedded-Prefect failure under CPU load, on demand.

`vct run` with embedded Prefect failed on a busy 2-core machine. This runs `vct run` on a small
manifest while N busy processes spin, each time with a fresh PREFECT_HOME (a first start also
migrates the database: the slowest start there is), and prints one line per run: exit code,
seconds, and the last error line. Compare:

    python benchmarks/embedded_under_load.py --busy 2 --runs 2                    # vct's settings
    python benchmarks/embedded_under_load.py --busy 2 --runs 2 --prefect-defaults # as before

`--prefect-defaults` sets Prefect's own defaults explicitly (start-up time-out 20 s, request
time-out 60 s, 5 client retries, sqlite time-outs 10 s / 5 s) and no reserved core, which `vct
run` then leaves alone: the behaviour before the fix. Measured on the project's 2-core machine
(other sessions' test runs kept its load average near 10), `--busy 2 --runs 1` each way: with
Prefect's defaults the run failed after 105 s, its server not up in time ("Timed out while
attempting to connect to ephemeral Prefect API server", now one line, exit 3); with vct's
settings the same run passed in 266 s. Every run is bounded by `--timeout`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "20",
                    "PREFECT_API_REQUEST_TIMEOUT": "60", "PREFECT_CLIENT_MAX_RETRIES": "5",
                    "PREFECT_SERVER_DATABASE_TIMEOUT": "10",
                    "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "5",
                    "VCT_RESERVED_CORES": "0"}
SPIN = "while True: pass"


def small_manifest(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_image

    for name, kind in (("s1.png", 0), ("s2.png", 2), ("r1.png", 1)):
        make_image(kind, (64, 64)).save(folder / name)
    (folder / "m.csv").write_text("source,reference\ns1.png,r1.png\ns2.png,r1.png\n")
    return folder / "m.csv"


def one_run(work: Path, model: str, prefect_defaults: bool, timeout: float) -> tuple[int, float,
                                                                                     str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    env.update({"PREFECT_HOME": str(work / "prefect-home"), "HF_HUB_OFFLINE": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(ROOT)})
    if prefect_defaults:
        env.update(PREFECT_DEFAULTS)
    argv = [sys.executable, "-m", "vct.cli", "run", str(small_manifest(work)), "--output",
            str(work / "out"), "--model", model, "--max-train-steps", "10",
            "--num-inference-steps", "8", "--num-inner-steps", "2"]
    start = time.monotonic()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = 124, str(exc.stderr or "")
    errors = [line for line in output.splitlines()
              if "error" in line.lower() or "Timed out" in line or "failed" in line.lower()]
    return code, time.monotonic() - start, (errors[-1] if errors else "")[:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=2, help="busy processes spinning meanwhile")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--prefect-defaults", action="store_true",
                        help="Prefect's default time-outs and retries, no reserved core")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.busy)]
    failures = 0
    try:
        for n in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="vct-load-") as tmp:
                code, seconds, last = one_run(Path(tmp), args.model, args.prefect_defaults,
                                              args.timeout)
            failures += code != 0
            print(f"run {n + 1}: exit {code} in {seconds:.0f} s"
                  + (f"  last error: {last}" if code else ""), flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print(f"{failures} of {args.runs} run(s) failed with {args.busy} busy process(es)"
          + (" (Prefect defaults)" if args.prefect_defaults else " (vct's embedded settings)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
