"""Kill and resume (slow: `pytest -m reliability`, `make test-reliability`).

A run is SIGKILLed at named points (vct/faults.py: after stage results are stored, inside a
content job, between a PNG and its sidecar, after some pairs, before run.json, between report
pages, before _SUCCESS, inside a local write before its rename and before an S3 PUT), on local
storage and on S3 (moto in this process outlives the killed one). The victim is the engine in a
subprocess (tests/kill_driver.py) and, for two points, a real `vct run` with embedded Prefect.
After each kill a rerun must leave:

- every output exactly once (each pair's PNG and sidecar, run.json, the report, _SUCCESS);
- no temp file (the rerun's sweep takes what the killed writer left: `VCT_TEMP_MAX_AGE_S=0`
  here, since nothing else writes);
- nothing recomputed that had finished (a stage result in the cache, verified, before the
  rerun is never in the rerun's `computed` lists of run.json; a pair whose verified output
  existed is `skipped`);
- PNGs byte-identical to an uninterrupted run (every process at one torch thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_image
from tests.test_embedded import embedded_env
from vct import report, storage
from vct.batch import engine, outputs
from vct.batch.jobs import load
from vct.cache import StageCache

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"concept": {"max_train_steps": 2, "batch_microsteps": True},
            "content": {"num_inference_steps": 4, "num_inner_steps": 1}, "threads": 1}
CLI_FLAGS = ["--max-train-steps", "2", "--batch-microsteps", "--num-inference-steps", "4",
             "--num-inner-steps", "1", "--threads", "1"]
DUPLICATES = 100  # identical rows: computed once, written 100 times, two report pages
RUN_ID = "k"


@dataclass(frozen=True)
class Case:
    point: str
    storage: str  # "local" or "s3"
    via: str = "engine"  # or "vct run"

    @property
    def id(self) -> str:
        return f"{self.point}-{self.storage}" + ("-cli" if self.via != "engine" else "")


CASES = [
    Case("concept.stored:1", "local"), Case("concept.stored:2", "s3"),
    Case("content.step:3", "local"), Case("content.step:5", "s3"),
    Case("content.stored:1", "s3"),
    Case("fusion.stored:1", "local"), Case("fusion.stored:1", "s3"),
    Case("output.png:1", "local"), Case("output.png:2", "s3"),
    Case("output.pair:40", "local"), Case("output.pair:60", "s3"),
    Case("run.json:1", "local"), Case("run.json:1", "s3"),
    Case("report.page:1", "local"), Case("report.page:1", "s3"),
    Case("success:1", "local"), Case("success:1", "s3"),
    Case("storage.rename:1", "local"), Case("storage.rename:9", "local"),
    Case("storage.rename:200", "local"), Case("storage.put:5", "s3"),
    Case("storage.put:150", "s3"),
    Case("fusion.stored:1", "local", via="vct run"),
    Case("output.pair:10", "s3", via="vct run"),
]


def _manifest(folder: Path) -> Path:
    """Three distinct pairs (two references, two sources: a fusion group of two concepts
    and one of one) and 100 copies of the first: 103 pairs, two report pages."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, kind in (("s1.png", 0), ("s2.png", 2), ("r1.png", 1), ("r2.png", 3)):
        make_image(kind, (64, 64)).save(folder / name)
    rows = ["s1.png,r1.png,p1", "s2.png,r1.png,p2", "s1.png,r2.png,p3"]
    rows += [f"s1.png,r1.png,dup{i:03d}" for i in range(DUPLICATES)]
    path = folder / "m.csv"
    path.write_text("source,reference,pair_id\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def local_manifest(tmp_path_factory) -> Path:
    return _manifest(tmp_path_factory.mktemp("kill-inputs"))


@pytest.fixture(scope="module")
def s3_manifest(s3_server, local_manifest) -> str:
    """The same manifest and images in a bucket (the manifest's paths are relative)."""
    import boto3

    bucket = f"kill-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(
        Bucket=bucket)
    for path in local_manifest.parent.iterdir():
        storage.write_bytes(f"s3://{bucket}/in/{path.name}", path.read_bytes())
    return f"s3://{bucket}/in/m.csv"


def _manifest_for(case: Case, request: pytest.FixtureRequest) -> str:
    if case.storage == "s3":
        return request.getfixturevalue("s3_manifest")
    return str(request.getfixturevalue("local_manifest"))


def _output_for(case: Case, manifest: str, tmp_path: Path, name: str) -> str:
    if case.storage == "s3":
        return manifest.rsplit("/in/", 1)[0] + f"/{name}-{uuid.uuid4().hex[:8]}"
    return str(tmp_path / name)


def _files(prefix: str) -> dict[str, bytes]:
    """Every object under prefix (relative name -> bytes), temp files included."""
    if storage.is_s3(prefix):
        return {u[len(prefix) + 1:]: storage.read_bytes(u) for u in storage.list_uris(prefix)}
    root = Path(prefix)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _temp_files(prefix: str) -> list[str]:
    if storage.is_s3(prefix):
        return [u for u in storage.list_uris(prefix) if u.endswith(".tmp")]
    root = Path(prefix)
    return [str(p) for p in root.rglob(".*.tmp")] if root.exists() else []


@pytest.fixture(scope="module")
def baselines(request, tiny_model_dir, tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """Uninterrupted runs, one per storage: the PNG bytes every resumed run must match."""
    out: dict[str, dict[str, bytes]] = {}
    for kind in ("local", "s3"):
        case = Case("none", kind)
        manifest = _manifest_for(case, request)
        output = _output_for(case, manifest, tmp_path_factory.mktemp("baseline"), "baseline")
        summary = engine.run(engine.prepare(manifest, output, str(tiny_model_dir), SETTINGS,
                                            RUN_ID))
        assert summary.status == "complete" and summary.counts["pairs_ok"] == 3 + DUPLICATES
        out[kind] = _pair_pngs(_files(storage.join(output, RUN_ID)))
    return out


def _pair_pngs(files: dict[str, bytes]) -> dict[str, bytes]:
    """The pairs' PNGs of a run folder (not the contact sheets or thumbnails, which show
    statuses: a resumed run's pairs are 'skipped')."""
    return {k: v for k, v in files.items()
            if k.endswith(".png") and "/" not in k and not report.is_reserved(k)}


def _kill(case: Case, manifest: str, output: str, model: str, tmp_path: Path) -> None:
    """Run the victim until it SIGKILLs itself at the case's point."""
    env_extra = {"VCT_TEST_KILL_AT": case.point}
    if case.via == "engine":
        spec = {"manifest": manifest, "output": output, "model": model, "settings": SETTINGS,
                "run_id": RUN_ID}
        argv = [sys.executable, "-m", "tests.kill_driver", json.dumps(spec)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    else:
        argv = [sys.executable, "-m", "vct.cli", "run", manifest, "--output", output,
                "--model", model, "--run-id", RUN_ID, *CLI_FLAGS]
        env = embedded_env(tmp_path, **env_extra)
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (
        f"{case.id}: the victim was not killed (exit {proc.returncode}):\n"
        f"{(proc.stdout + proc.stderr)[-3000:]}")


def _finished_before(request_: engine.RunRequest
                     ) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    """The jobs of an uninterrupted run (its fusion groups included), the ones whose verified
    result was in the cache when the kill came, and the pairs with a verified output then."""
    from vct.batch.plan import fusion_groups, fusion_job

    the_plan = engine.plan(request_)
    cache = StageCache(request_.cache_uri)
    jobs = {(kind, job.key) for kind in ("concept", "content") for job in the_plan.jobs(kind)}
    jobs |= {("fusion", job.key) for job in map(fusion_job, fusion_groups(the_plan.pairs))}
    entries = {(kind, key) for kind, key in jobs if load(cache, kind, key) is not None}
    pairs = {p.row.pair_id for p in the_plan.pairs
             if outputs.finished_sidecar(p.sidecar_uri, p.png_uri, p.output_key) is not None}
    return jobs, entries, pairs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_killed_run_resumes_to_the_same_outputs(case, request, baselines, tiny_model_dir,
                                                  tmp_path, monkeypatch):
    manifest = _manifest_for(case, request)
    output = _output_for(case, manifest, tmp_path, "out")
    model = str(tiny_model_dir)
    _kill(case, manifest, output, model, tmp_path)
    run = storage.join(output, RUN_ID)
    if case.point.startswith("storage.rename"):  # the kill came mid-write: a temp file is left
        assert _temp_files(output), "the kill point did not land inside a write"
    if case.point in ("success:1", "run.json:1", "report.page:1"):
        assert not storage.exists(storage.join(run, outputs.SUCCESS))

    rerun_request = engine.prepare(manifest, output, model, SETTINGS, RUN_ID)
    jobs, entries, finished_pairs = _finished_before(rerun_request)
    monkeypatch.setenv(storage.ENV_TEMP_MAX_AGE, "0")  # nothing else writes here
    summary = engine.run(rerun_request)

    assert summary.status == "complete", summary.message
    run_json = json.loads(storage.read_bytes(storage.join(run, outputs.RUN_JSON)))
    computed = {(kind, key) for kind, stage in run_json["details"]["stages"].items()
                for key in stage["computed"]}
    assert not computed & entries, f"{case.id}: recomputed {sorted(computed & entries)}"
    # and nothing else: only the uninterrupted run's jobs (a pair fused in another group than
    # before would be a job of its own, recomputing a fusion that had finished)
    assert computed <= jobs - entries, f"{case.id}: computed {sorted(computed - jobs)}"
    skipped = {p["pair_id"] for p in run_json["pairs"] if p["status"] == "skipped"}
    assert finished_pairs <= skipped, sorted(finished_pairs - skipped)
    assert not _temp_files(output), _temp_files(output)

    files = _files(run)
    pngs = _pair_pngs(files)
    expected = baselines[case.storage]
    assert len(expected) == 3 + DUPLICATES
    assert sorted(pngs) == sorted(expected)  # each output exactly once, nothing extra
    different = sorted(k for k in expected if pngs[k] != expected[k])
    assert not different, f"{case.id}: PNGs differ from the uninterrupted run: {different[:5]}"
    sidecars = {k for k in files if k.endswith(".json") and k != outputs.RUN_JSON}
    assert sidecars == {k[:-4] + ".json" for k in expected}
    for name in (outputs.RUN_JSON, "report.html", "report-2.html", "contact_sheet.png",
                 "contact_sheet-2.png", outputs.SUCCESS):
        assert name in files, name


def test_a_sigterm_crashes_the_incoming_run_and_releases_its_claim(tmp_path, tiny_model_dir):
    """A real restyle-incoming flow run in a subprocess (embedded Prefect) is sent SIGTERM
    while it works on a claimed manifest: Prefect crashes the run, and the claim is released
    (status `released`) instead of staying `running` until its lease expires."""
    import time

    incoming_dir = tmp_path / "incoming"
    _manifest(incoming_dir)
    marker = incoming_dir / "m.csv.processed"
    slow = {**SETTINGS, "concept": {"max_train_steps": 2000}}  # minutes: it is killed first
    code = ("import json, sys; from flows.restyle import restyle_incoming; "
            "restyle_incoming(**json.loads(sys.argv[1]))")
    args = {"incoming_uri": str(incoming_dir), "output_uri": str(tmp_path / "out"),
            "model": str(tiny_model_dir), "settings": slow, "lease_seconds": 600,
            "renew_seconds": 5}
    log = (tmp_path / "flow.log").open("wb")
    from vct.cli import EMBEDDED_PREFECT_SETTINGS  # a flow called directly: no `vct run`

    # Its own session: Prefect's temporary server (uvicorn, a child of the flow's process) is
    # not stopped when the flow process dies of a signal; the group is killed at the end.
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], cwd=ROOT,
                            env=embedded_env(tmp_path, **EMBEDDED_PREFECT_SETTINGS),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if marker.exists() and json.loads(marker.read_text())["status"] == "running":
                break
            time.sleep(0.5)
        time.sleep(5)  # the claimed manifest's run is planning or learning its first concept
        assert proc.poll() is None, (tmp_path / "flow.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of its group: the server
        log.close()
    record = json.loads(marker.read_text())
    assert record["status"] == "released", (record, (tmp_path / "flow.log").read_text()[-3000:])
    assert "TerminationSignal" in record["release_reason"] or \
        "Crashed" in record["release_reason"], record


def test_an_embedded_run_beside_two_busy_processes_completes(tiny_model_dir):
    """benchmarks/embedded_under_load.py: `vct run` (fresh PREFECT_HOME, so the server also
    migrates its database) while two processes spin, with vct's embedded settings."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "embedded_under_load.py"),
                           "--busy", "2", "--runs", "1", "--timeout", "600", "--model",
                           str(tiny_model_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=700,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "0 of 1 run(s) failed with 2 busy process(es)" in proc.stdout
