"""infra/prefect.yaml: its declared deployments, and a real deploy + run on a local server.

The end-to-end test does what infra/README.md tells a user to do, with the real CLI, offline:
start `prefect server start` on a free loopback port (own PREFECT_HOME, no UI, no background
services, so no schedule fires), create the `vct-process` pool, `prefect deploy --all` the
project file from the repository root, `prefect deployment run 'restyle/on-demand'` on a one-row
manifest, and let `prefect worker start --run-once` execute it. The flow run must be COMPLETED
and have written a `_SUCCESS` marker under output_uri.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "infra" / "prefect.yaml"
PREFECT = [sys.executable, "-m", "prefect"]  # the CLI of the interpreter running the tests

SERVER_START_TIMEOUT_S = 60
CLI_TIMEOUT_S = 90
RUN_TIMEOUT_S = 240

# Smallest settings that still run every stage of the real algorithm on the tiny model.
FAST_OVERRIDES = {
    "concept": {"max_train_steps": 2, "batch_microsteps": True, "reference_resolution": 64},
    "content": {"num_inference_steps": 4, "num_inner_steps": 1, "resolution": 64},
}


def _load_project() -> dict:
    return yaml.safe_load(PREFECT_FILE.read_text())


def _deployments() -> dict[str, dict]:
    return {d["name"]: d for d in _load_project()["deployments"]}


def _walk(node, key: str = ""):
    """Every (key, scalar value) of a parsed YAML tree; list items keep their parent's key."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)
    else:
        yield key, node


# --- the file itself ----------------------------------------------------------------------------


def test_prefect_yaml_declares_the_five_deployments():
    deps = _deployments()
    assert set(deps) == {"on-demand", "nightly", "frequent", "shard", "weekly"}

    weekly = deps["weekly"]  # cache-prune/weekly: inactive, a dry run until edited
    assert weekly["entrypoint"] == "flows/maintenance.py:cache_prune"
    assert weekly["parameters"]["dry_run"] is True
    assert weekly["parameters"]["older_than"] == "30d"
    assert weekly["parameters"]["cache_uri"].startswith("s3://")
    (prune,) = weekly["schedules"]
    assert prune["cron"] == "0 3 * * 0" and not prune["active"]

    shard = deps["shard"]  # what flows/fleet.py dispatches: restyle-shard/shard
    assert shard["entrypoint"] == "flows/restyle.py:restyle_shard"
    assert not shard.get("parameters") and not shard.get("schedules")

    on_demand = deps["on-demand"]
    assert on_demand["entrypoint"] == "flows/restyle.py:restyle"
    assert on_demand["parameters"] == {"model": ""}
    assert not on_demand.get("schedules")
    assert not on_demand.get("schedule")

    for name in ("nightly", "frequent"):
        dep = deps[name]
        assert dep["entrypoint"] == "flows/restyle.py:restyle_incoming"
        params = dep["parameters"]
        assert set(params) == {"incoming_uri", "output_uri", "model"}
        assert params["model"] == ""  # refuses to run until a platform engineer sets it
        assert all(not sched["active"] for sched in dep["schedules"])  # shipped inactive
        assert params["incoming_uri"].startswith("s3://") and params["incoming_uri"].endswith("/")
        assert params["output_uri"].startswith("s3://")

    (nightly,) = deps["nightly"]["schedules"]
    assert nightly["cron"] == "0 2 * * *"
    assert nightly["timezone"] == "UTC"
    (frequent,) = deps["frequent"]["schedules"]
    assert frequent["interval"] == 300
    assert "cron" not in frequent

    for dep in deps.values():
        assert dep["work_pool"]["name"] == "vct-process"


def test_prefect_yaml_pulls_from_the_project_dir_and_holds_no_secrets():
    project = _load_project()
    (step,) = project["pull"]
    assert step == {
        "prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $VCT_PROJECT_DIR }}",
        }
    }
    secret_keys = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                   "password", "secret", "token", "access_token", "api_key"}
    for key, value in _walk(project):
        assert key.lower() not in secret_keys, key
        assert "@" not in str(value) or "{{" in str(value), value  # no user:pass@ in URIs
    for entry in {d["entrypoint"] for d in project["deployments"]}:
        assert (REPO / entry.split(":")[0]).parent.is_dir()


# --- a real local server ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Start a throwaway Prefect API server; yield the environment that talks to it."""
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith("PREFECT_")  # no user profile, Cloud key or other server leaks in
    }
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    log = home / "server.log"
    with log.open("wb") as fh:
        server = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-services"],
            env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                            f"{_tail(log)}")
            time.sleep(0.25)
        yield env
    finally:
        _stop(server)


def _cli(env: dict[str, str], *args: str, cwd: Path = REPO,
         timeout: float = CLI_TIMEOUT_S) -> str:
    proc = subprocess.run(
        [*PREFECT, *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{out}"
    return out


def _kill_tree(pid: int) -> None:
    """Stop a process and all its descendants (the worker's flow-run child runs in a session of
    its own, so signalling the worker's process group would miss it)."""
    import psutil  # a dependency of accelerate

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def _run_logged(cmd: list[str], env: dict[str, str], cwd: Path, log: Path,
                timeout: float) -> tuple[int | None, str]:
    """Run cmd with its output in log; on timeout stop it and everything it started.
    Returns (exit code, None on timeout; the tail of the output)."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            _kill_tree(proc.pid)
            proc.wait(timeout=15)
    return rc, _tail(log, 12000)


def _api(env: dict[str, str], path: str) -> dict:
    """GET one object from the server's REST API (cheaper than a CLI call per check)."""
    with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/{path}", timeout=10) as resp:
        return json.load(resp)


def _write_manifest(folder: Path) -> Path:
    """One (source, reference) pair of small generated PNGs, next to the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, bg, fg, stripes in (("source", (200, 180, 40), (20, 60, 200), False),
                                  ("reference", (30, 30, 30), (240, 90, 10), True)):
        img = Image.new("RGB", (64, 64), bg)
        draw = ImageDraw.Draw(img)
        if stripes:
            for x in range(0, 64, 8):
                draw.rectangle((x, 0, x + 3, 63), fill=fg)
        else:
            draw.ellipse((12, 12, 52, 52), fill=fg)
        img.save(folder / f"{name}.png")
    manifest = folder / "manifest.csv"
    manifest.write_text("source,reference,pair_id\nsource.png,reference.png,pair-1\n")
    return manifest


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_on_demand_deployment_is_created_and_a_run_completes(prefect_env, tmp_path,
                                                             tiny_model_dir):
    env = prefect_env
    _cli(env, "work-pool", "create", "vct-process", "--type", "process")

    # The README's deploy command, from the repository root.
    _cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    deployments = {name: _api(env, f"deployments/name/{name}")
                   for name in ("restyle/on-demand", "restyle-incoming/nightly",
                                "restyle-incoming/frequent", "restyle-shard/shard")}
    for dep in deployments.values():
        assert dep["work_pool_name"] == "vct-process"
        assert dep["pull_steps"][0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": "{{ $VCT_PROJECT_DIR }}"}  # resolved on the worker, not at deploy time
    assert deployments["restyle/on-demand"]["schedules"] == []
    assert [s["schedule"]["cron"] for s in deployments["restyle-incoming/nightly"]["schedules"]
            ] == ["0 2 * * *"]
    frequent = deployments["restyle-incoming/frequent"]
    assert [s["schedule"]["interval"] for s in frequent["schedules"]] == [300.0]
    assert frequent["global_concurrency_limit"]["limit"] == 1
    for name, dep in deployments.items():
        if dep["schedules"]:
            assert not any(s["active"] for s in dep["schedules"]), name
        # typed, described parameters, the nested stage settings included (a Prefect form)
        schema = dep["parameter_openapi_schema"]
        assert schema["properties"]["model"]["type"] == "string"
        assert "model" in schema["required"] or dep["parameters"].get("model") == ""
        described = {k: v for k, v in schema["definitions"].items()
                     if k in ("RunSettings", "ConceptConfig", "ContentConfig", "FusionConfig")}
        assert len(described) == 4, sorted(schema["definitions"])
        for defn in described.values():
            assert all(p.get("description") for p in defn["properties"].values()), defn
        assert described["FusionConfig"]["properties"]["reweight_positions"]["enum"] == [
            "original", "concept_tokens"]
        assert described["RunSettings"]["properties"]["content_batch"]["minimum"] == 1

    manifest = _write_manifest(tmp_path / "job")
    output = tmp_path / "out"
    ran = _cli(
        env, "deployment", "run", "restyle/on-demand",
        "--param", f"manifest_uri={manifest}",
        "--param", f"output_uri={output}",
        "--param", f"model={tiny_model_dir}",  # the session's tiny model (conftest)
        "--param", "settings=" + json.dumps({**FAST_OVERRIDES,
                                             "cache_uri": str(tmp_path / "cache")}),
    )
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", ran)
    assert match, ran
    flow_run_id = match.group(1)

    # One poll of the pool: the worker picks the run up, runs it in a child process (which
    # chdirs to $VCT_PROJECT_DIR through the pull step) and exits when the run has finished.
    worker_env = {**env, "VCT_PROJECT_DIR": str(REPO), "VCT_HOME": str(tmp_path / "vct_home")}
    worker_rc, worker_out = _run_logged(
        [*PREFECT, "worker", "start", "--pool", "vct-process", "--type", "process",
         "--run-once", "--install-policy", "never"],
        env=worker_env, cwd=tmp_path, log=tmp_path / "worker.log", timeout=RUN_TIMEOUT_S,
    )

    flow_run = _api(env, f"flow_runs/{flow_run_id}")
    worker_status = (f"timed out after {RUN_TIMEOUT_S} s" if worker_rc is None
                     else f"exit {worker_rc}")
    assert flow_run["state_type"] == "COMPLETED", (
        f"flow run {flow_run['state_type']}: {(flow_run.get('state') or {}).get('message')}\n"
        f"worker ({worker_status}):\n{worker_out}"
    )
    markers = sorted(output.rglob("_SUCCESS"))
    assert markers, f"no _SUCCESS under {output}:\n{worker_out}"
