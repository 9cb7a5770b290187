"""One manifest across a Prefect work pool, for real, on one machine (loopback only).

A `prefect server start` (own home, no services), the `vct-process` pool with every deployment
of infra/prefect.yaml, two `prefect worker start` processes (`worker-a`, `worker-b`, one flow
run at a time each, so both must take part), the moto S3 server as a subprocess holding inputs,
outputs and the cache, and the tiny model. The parent `restyle` flow runs in a driver process
against the server (as `vct run --shards 2` would); its shards are flow runs of
`restyle-shard/shard` that the workers pick up.

What is counted, never assumed: each shard's result (run.json `details.shards`: the keys it
computed and awaited, its worker), the flow-run records on the server (the worker's label), and
the bytes of every PNG against an unsharded run of the same manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.conftest import make_image
from tests.test_deployments import (  # noqa: F401 - prefect_env is a fixture
    PREFECT,
    PREFECT_FILE,
    REPO,
    _api,
    _cli,
    _free_port,
    _kill_tree,
    _stop,
    _tail,
    prefect_env,
)

pytestmark = pytest.mark.fleet

RUN_TIMEOUT_S = 420
LEASE_S = 10  # short leases, so a killed worker's work is taken over quickly
# threads: 1 in every process, so sharded and unsharded results are bit-identical.
SETTINGS = {
    "threads": 1, "device": "cpu",
    "concept": {"max_train_steps": 2, "batch_microsteps": True, "reference_resolution": 64},
    "content": {"num_inference_steps": 4, "num_inner_steps": 1, "resolution": 64},
}
DRIVER = """
import json, sys
from flows.restyle import restyle
args = json.loads(sys.argv[1])
state = restyle(**args, return_state=True)
print("DRIVER-STATE", state.type.value, flush=True)
"""


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[dict[str, str]]:
    """moto_server on a free loopback port; the AWS environment that talks to it."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    exe = Path(sys.executable).with_name("moto_server")
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for _ in range(400):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                    break
            if proc.poll() is not None:
                pytest.fail(f"moto_server exited:\n{_tail(log)}")
            time.sleep(0.1)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def pool(prefect_env, moto, tmp_path_factory, tiny_model_dir) -> dict[str, str]:  # noqa: F811
    """The pool with the project's deployments; the environment workers and drivers share."""
    env = {k: v for k, v in prefect_env.items() if not k.startswith("AWS_")}
    env.update(moto)
    env.update({"VCT_PROJECT_DIR": str(REPO), "VCT_HOME": str(tmp_path_factory.mktemp("home")),
                "VCT_CLAIM_LEASE_S": str(LEASE_S), "VCT_CLAIM_POLL_S": "0.5",
                "VCT_SHARD_POLL_S": "1", "PREFECT_WORKER_QUERY_SECONDS": "1",
                "VCT_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get(
                    "PYTHONPATH")) if p)})
    _cli(env, "work-pool", "create", "vct-process", "--type", "process")
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    assert _api(env, "deployments/name/restyle-shard/shard")["work_pool_name"] == "vct-process"
    return env


class Workers:
    """Two process workers on the pool, each taking ``limit`` flow runs at a time."""

    def __init__(self, env: dict[str, str], folder: Path, limit: int = 1):
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        for name in ("worker-a", "worker-b"):
            self.logs[name] = folder / f"{name}.log"
            with self.logs[name].open("wb") as fh:
                self.procs[name] = subprocess.Popen(
                    [*PREFECT, "worker", "start", "--pool", "vct-process", "--type", "process",
                     "--name", name, "--limit", str(limit), "--install-policy", "never"],
                    env=env, cwd=folder, stdin=subprocess.DEVNULL, stdout=fh,
                    stderr=subprocess.STDOUT)

    def sigkill(self, name: str) -> None:
        """SIGKILL the worker and the flow run it is running (a machine that died)."""
        import psutil

        root = psutil.Process(self.procs[name].pid)
        for p in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            _kill_tree(proc.pid)

    def tails(self) -> str:
        return "\n".join(f"--- {n}:\n{_tail(p, 3000)}" for n, p in self.logs.items())


@pytest.fixture
def workers(pool, tmp_path) -> Iterator[Workers]:
    w = Workers(pool, tmp_path)
    try:
        yield w
    finally:
        w.stop()


# ------------------------------------------------------------------------------ helpers
def _s3(env: dict[str, str]):
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _bucket(env: dict[str, str], name: str) -> str:
    _s3(env).create_bucket(Bucket=name)
    return f"s3://{name}"


def _put_manifest(env: dict[str, str], bucket: str, name: str, refs: list[int],
                  sources: list[int], tmp: Path) -> str:
    """refs x sources pairs; images named by their kind, so two manifests can share some."""
    client, b = _s3(env), bucket.removeprefix("s3://")
    rows = ["source,reference,pair_id"]
    for k in set(refs) | set(sources):
        path = tmp / f"img{k}.png"
        make_image(k, (64, 64)).save(path)
        client.put_object(Bucket=b, Key=f"inputs/img{k}.png", Body=path.read_bytes())
    for r in refs:
        for s in sources:
            rows.append(f"../inputs/img{s}.png,../inputs/img{r}.png,r{r}-s{s}")
    client.put_object(Bucket=b, Key=f"jobs/{name}.csv", Body="\n".join(rows).encode() + b"\n")
    return f"{bucket}/jobs/{name}.csv"


def _start_run(env, tmp: Path, name: str, manifest: str, output: str, model: Path,
               shards: int, cache: str | None = None,
               extra: dict | None = None) -> tuple[subprocess.Popen, Path]:
    settings = {**SETTINGS, "shards": shards, **({"cache_uri": cache} if cache else {}),
                **(extra or {})}
    args = {"manifest_uri": manifest, "output_uri": output, "model": str(model),
            "settings": settings}
    log = tmp / f"driver-{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env,
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT)
    return proc, log


def _finish(proc: subprocess.Popen, log: Path, workers: Workers) -> None:
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        pytest.fail(f"run did not finish in {RUN_TIMEOUT_S} s:\n{_tail(log)}\n"
                    f"{workers.tails()}")
    out = _tail(log, 6000)
    assert rc == 0 and "DRIVER-STATE COMPLETED" in out, f"{out}\n{workers.tails()}"


def _run_json(env, output: str) -> dict:
    """The one run folder's run.json under an output prefix."""
    client = _s3(env)
    bucket, prefix = output.removeprefix("s3://").split("/", 1)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
            .get("Contents", []) if o["Key"].endswith("/run.json")]
    assert len(keys) == 1, keys
    return json.loads(client.get_object(Bucket=bucket, Key=keys[0])["Body"].read())


def _pngs(env, run: dict) -> dict[str, bytes]:
    client = _s3(env)
    out = {}
    for pair in run["pairs"]:
        bucket, key = pair["output_uri"].removeprefix("s3://").split("/", 1)
        out[pair["pair_id"]] = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return out


def _claims_left(env, cache: str) -> list[str]:
    bucket, prefix = cache.removeprefix("s3://").split("/", 1)
    return [o["Key"] for o in _s3(env).list_objects_v2(
        Bucket=bucket, Prefix=f"{prefix}/_claims/").get("Contents", [])]


def _keys(row: dict, status: str) -> list[str]:
    """A shard's keys of one status (computed, awaited, cached, took_over), every kind."""
    return [k for stage in row["stages"].values() for k in stage[status]]


def _computed(rows: list[dict], phase: str) -> Counter[str]:
    return Counter(k for r in rows if r["phase"] == phase for k in _keys(r, "computed"))


# ------------------------------------------------------------------------------ the tests
def test_a_sharded_run_spreads_over_both_workers_and_matches_an_unsharded_one(
        pool, workers, tmp_path, tiny_model_dir):
    env = pool
    bucket = _bucket(env, "fleet-one")
    manifest = _put_manifest(env, bucket, "two-by-four", refs=[1, 3], sources=[0, 2, 4, 6],
                             tmp=tmp_path)
    sharded, plain = f"{bucket}/sharded", f"{bucket}/plain"
    proc, log = _start_run(env, tmp_path, "sharded", manifest, sharded, tiny_model_dir, 2)
    _finish(proc, log, workers)
    proc, log = _start_run(env, tmp_path, "plain", manifest, plain, tiny_model_dir, 1)
    _finish(proc, log, workers)

    run = _run_json(env, sharded)
    rows = run["details"]["shards"]
    assert run["status"] == "complete" and run["counts"]["pairs_ok"] == 8
    assert {(r["phase"], r["state"]) for r in rows} == {("stage", "COMPLETED"),
                                                        ("fusion", "COMPLETED")}
    assert sum(r["phase"] == "stage" for r in rows) == 2  # two shard flow runs per phase
    assert sum(r["phase"] == "fusion" for r in rows) == 2
    # Both workers took part: by the shards' own record and by the server's flow-run records.
    assert {r["worker"] for r in rows} == {"worker-a", "worker-b"}
    server_workers = {_api(env, f"flow_runs/{r['flow_run_id']}")["labels"].get(
        "prefect.worker.name") for r in rows}
    assert server_workers == {"worker-a", "worker-b"}
    assert all(r["busy_s"] > 0 for r in rows)
    # Each shard is the run's job pool: its record has the pool's per-rank utilization, and
    # the fusion shards wrote the pairs (each pair once).
    assert all(r["ranks"] and r["pool"]["min_utilization"] is not None for r in rows)
    written = Counter(p["pair_id"] for r in rows if r["phase"] == "fusion" for p in r["pairs"])
    assert len(written) == 8 and set(written.values()) == {1}
    # Every concept and content computed exactly once, fleet-wide; nothing left claimed.
    stage = _computed(rows, "stage")
    assert len(stage) == 2 + 4 and set(stage.values()) == {1}
    assert run["counts"]["concepts_computed"] == 2 and run["counts"]["contents_computed"] == 4
    assert set(_computed(rows, "fusion").values()) == {1}
    assert _claims_left(env, f"{sharded}/_cache") == []
    # Bit-identical to the unsharded run (its own cache: everything computed again there).
    plain_run = _run_json(env, plain)
    assert "shards" not in plain_run["details"]
    assert plain_run["counts"]["concepts_computed"] == 2
    pngs = _pngs(env, run)
    assert len(pngs) == 8 and pngs == _pngs(env, plain_run)


@pytest.fixture
def busy_workers(pool, tmp_path) -> Iterator[Workers]:
    """Two slots per worker: the four shards of two runs all run at the same time."""
    w = Workers(pool, tmp_path, limit=2)
    try:
        yield w
    finally:
        w.stop()


def test_two_overlapping_runs_compute_each_shared_key_once(pool, busy_workers, tmp_path,
                                                           tiny_model_dir):
    """Both runs' shards run at once and race for the shared reference and source (their
    concepts made slower, so the race is real): claims let one compute and the other await."""
    env, workers = pool, busy_workers
    bucket = _bucket(env, "fleet-two")
    cache = f"{bucket}/shared-cache"
    first = _put_manifest(env, bucket, "first", refs=[1, 3], sources=[0, 2], tmp=tmp_path)
    second = _put_manifest(env, bucket, "second", refs=[3, 5], sources=[2, 4], tmp=tmp_path)
    slow = {"concept": {**SETTINGS["concept"], "max_train_steps": 40}}
    runs = [_start_run(env, tmp_path, name, manifest, f"{bucket}/{name}", tiny_model_dir, 2,
                       cache=cache, extra=slow)
            for name, manifest in (("first", first), ("second", second))]
    for proc, log in runs:
        _finish(proc, log, workers)
    rows = [r for name in ("first", "second")
            for r in _run_json(env, f"{bucket}/{name}")["details"]["shards"]]
    stage = _computed(rows, "stage")
    # 3 references and 3 sources in all: each computed once, whichever run got to it first.
    assert len(stage) == 6 and set(stage.values()) == {1}, stage
    for name in ("first", "second"):
        run = _run_json(env, f"{bucket}/{name}")
        assert run["status"] == "complete"
        mine = {k for r in run["details"]["shards"] if r["phase"] == "stage"
                for s in ("computed", "awaited", "cached") for k in _keys(r, s)}
        assert len(mine) == 4  # its 2 concepts and 2 contents, computed here or elsewhere
    assert _claims_left(env, cache) == []


def test_a_worker_killed_mid_shard_costs_only_its_running_job(pool, workers, tmp_path,
                                                              tiny_model_dir):
    env = pool
    bucket = _bucket(env, "fleet-three")
    manifest = _put_manifest(env, bucket, "slow", refs=[1, 3, 5, 7], sources=[0],
                             tmp=tmp_path)
    output = f"{bucket}/out"
    slow = {**SETTINGS, "concept": {**SETTINGS["concept"], "max_train_steps": 150}}
    args = {"manifest_uri": manifest, "output_uri": output, "model": str(tiny_model_dir),
            "settings": {**slow, "shards": 2}}
    log = tmp_path / "driver-slow.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env,
                                cwd=REPO, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT)
    # Wait until worker-a holds a concept claim (it is computing that job), then kill it.
    client, b = _s3(env), bucket.removeprefix("s3://")
    killed_key = None
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while killed_key is None:
        assert proc.poll() is None and time.monotonic() < deadline, _tail(log)
        for o in client.list_objects_v2(Bucket=b, Prefix="out/_cache/_claims/concept/").get(
                "Contents", []):
            if not o["Key"].endswith(".json"):
                continue
            with contextlib.suppress(client.exceptions.NoSuchKey):
                claim = json.loads(client.get_object(Bucket=b, Key=o["Key"])["Body"].read())
                if claim["owner"]["worker"] == "worker-a":
                    killed_key = claim["key"]
                    break
        time.sleep(0.2)
    workers.sigkill("worker-a")
    _finish(proc, log, workers)

    run = _run_json(env, output)
    rows = run["details"]["shards"]
    assert run["status"] == "complete" and run["counts"]["pairs_ok"] == 4
    dead = [r for r in rows if r["state"] != "COMPLETED"]
    assert len(dead) == 1 and dead[0]["worker"] == "worker-a" and dead[0]["attempt"] == 0
    retry = [r for r in rows if r["phase"] == dead[0]["phase"]
             and r["shard"] == dead[0]["shard"] and r["attempt"] == 1]
    assert len(retry) == 1 and retry[0]["state"] == "COMPLETED"
    assert retry[0]["worker"] == "worker-b"  # the only worker left
    # Only the killed job was started twice: its claim is the one taken over; every concept
    # was computed to the end exactly once (the dead shard's finished ones were cached).
    took_over = [k for r in rows if r["phase"] == "stage" for k in _keys(r, "took_over")]
    assert took_over == [killed_key]
    assert killed_key in _keys(retry[0], "computed")
    finished = _computed(rows, "stage") + Counter(_keys(retry[0], "cached"))
    assert set(finished.values()) == {1} and len(finished) == 4 + 1


def _plan_keys(env: dict[str, str], monkeypatch, manifest: str, output: str, model: Path,
               settings: dict):
    """The keys a run of this manifest will use, planned here against the moto server."""
    from vct import storage
    from vct.batch import engine

    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    storage.reset_clients()
    return engine.plan(engine.prepare(manifest, output, str(model), settings))


def test_two_runs_held_at_a_shared_key_compute_it_once(pool, tmp_path, tiny_model_dir,
                                                       monkeypatch):
    """Deterministic overlap: a third owner (this test) holds the shared concept's claim until
    both runs are waiting for it, then lets go; they race for it, one computes it, the other
    awaits it. A run that ignored a live claim would have taken the gate over: checked."""
    from vct import storage
    from vct.batch.claims import Claims, Owner
    from vct.cache import StageCache

    env = pool
    bucket = _bucket(env, "fleet-gate")
    cache = f"{bucket}/shared-cache"
    first = _put_manifest(env, bucket, "first", refs=[1, 3], sources=[0], tmp=tmp_path)
    second = _put_manifest(env, bucket, "second", refs=[3, 5], sources=[0], tmp=tmp_path)
    settings = {**SETTINGS, "cache_uri": cache}
    try:
        plans = [_plan_keys(env, monkeypatch, m, f"{bucket}/{n}", tiny_model_dir, settings)
                 for n, m in (("first", first), ("second", second))]
        by_ref = {j.input_uri.rsplit("/", 1)[-1]: j.key for p in plans for j in p.concept_jobs}
        shared, others = by_ref["img3.png"], [by_ref["img1.png"], by_ref["img5.png"]]
        gate = Claims(cache, Owner(worker="gate"), lease_s=3600)
        held = gate.acquire("concept", shared)
        assert held is not None
        runs = [_start_run(env, tmp_path, n, m, f"{bucket}/{n}", tiny_model_dir, 1, cache=cache)
                for n, m in (("first", first), ("second", second))]
        # Each run computes its own concept, then can only wait for the held one: both are
        # then polling for it (a run does its concepts before its contents).
        entries = StageCache(cache)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not all(entries.contains("concept", k) for k in others):
            assert time.monotonic() < deadline and all(p.poll() is None for p, _ in runs), \
                "\n".join(_tail(log) for _, log in runs)
            time.sleep(0.2)
        assert not entries.contains("concept", shared)
        assert gate.renew(held), "a run took over a live claim"
        gate.release(held)
        for proc, log in runs:
            try:
                assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, _tail(log)
            except subprocess.TimeoutExpired:
                _kill_tree(proc.pid)
                pytest.fail(_tail(log))
            assert "DRIVER-STATE COMPLETED" in _tail(log, 6000), _tail(log)
        stages = [_run_json(env, f"{bucket}/{n}")["details"]["stages"]["concept"]
                  for n in ("first", "second")]
        computed = Counter(k for s in stages for k in s["computed"])
        assert computed[shared] == 1  # one of them computed it ...
        assert sum(shared in s["awaited"] for s in stages) == 1  # ... the other awaited it
        assert computed[others[0]] == computed[others[1]] == 1
        assert _claims_left(env, cache) == []
    finally:
        storage.reset_clients()


def test_shards_no_worker_takes_are_cancelled_and_the_run_fails_saying_why(
        pool, tmp_path, tiny_model_dir):
    """No worker on the pool at all: after the start timeout the parent cancels its shard flow
    runs on the server (not waiting forever), and the run ends Failed, each job failing with
    one line naming the deployment and the pool; the dispatch record and the label that the
    parent's cancellation hook reads are in place."""
    env = {**pool, "VCT_SHARD_START_TIMEOUT_S": "5"}
    bucket = _bucket(env, "fleet-idle")
    manifest = _put_manifest(env, bucket, "idle", refs=[1], sources=[0, 2], tmp=tmp_path)
    output = f"{bucket}/out"
    proc, log = _start_run(env, tmp_path, "idle", manifest, output, tiny_model_dir, 2)
    try:
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, _tail(log)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        pytest.fail(f"the parent waited for shards no worker takes:\n{_tail(log)}")
    assert "DRIVER-STATE FAILED" in _tail(log, 6000), _tail(log)
    run = _run_json(env, output)
    assert run["status"] == "failed" and run["counts"]["pairs_ok"] == 0
    rows = run["details"]["shards"]
    assert [(r["phase"], r["state"]) for r in rows] == [("stage", "CANCELLED")] * 2
    for r in rows:
        assert r["error"].startswith(f"no worker took stage shard {r['shard']} of "
                                     "restyle-shard/shard within 5 s")
        assert "pool 'vct-process'" in r["error"] and not _keys(r, "computed")
        assert _api(env, f"flow_runs/{r['flow_run_id']}")["state"]["type"] == "CANCELLED"
    parent = run["flow_run_id"]
    assert _api(env, f"flow_runs/{parent}")["labels"]["vct.run_uri"] == run["output_uri"]
    bucket_name, key = run["output_uri"].removeprefix("s3://").split("/", 1)
    record = json.loads(_s3(env).get_object(
        Bucket=bucket_name, Key=f"{key}/_plan/dispatched/{parent}.json")["Body"].read())
    assert sorted(r["flow_run_id"] for r in record["runs"]) == sorted(
        r["flow_run_id"] for r in rows)
