"""The `restyle` flow end to end: real Prefect, a real S3 server on loopback, the tiny model."""

from __future__ import annotations

import io
import json
import uuid

import boto3
import pytest
from PIL import Image

from tests.conftest import make_image
from vct import storage

FAST = {"concept": {"max_train_steps": 2, "batch_microsteps": True},
        "content": {"num_inference_steps": 4, "num_inner_steps": 1}}


def _png(kind: int, size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    make_image(kind, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    name = f"flow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


def _objects(prefix: str) -> dict[str, str]:
    """uri -> LastModified of everything under prefix (to prove nothing was rewritten: an
    ETag would not change when identical bytes are written again)."""
    client = storage.s3_client()
    out = {}
    for uri in storage.list_uris(prefix):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        out[uri] = str(client.head_object(Bucket=bucket, Key=key)["LastModified"])
    return out


@pytest.fixture(scope="module")
def s3_run(prefect_harness, tiny_model_dir, bucket):
    """Upload images and a manifest; two rows share a reference, one source exists under two
    names, one row repeats another exactly, one row is bad; then run the flow twice."""
    from flows.restyle import restyle

    for name, kind in (("a.png", 0), ("b.png", 2), ("ref1.png", 1), ("ref2.png", 3)):
        storage.write_bytes(f"{bucket}/in/{name}", _png(kind))
    storage.write_bytes(f"{bucket}/in/a-copy.png", storage.read_bytes(f"{bucket}/in/a.png"))
    storage.write_bytes(f"{bucket}/in/notes.png", b"this is not an image")
    manifest = ("source,reference,pair_id,cross_attention_injection_ratio\r\n"
                "../in/a.png,../in/ref1.png,a1,\r\n"
                "../in/b.png,../in/ref1.png,b1,\r\n"
                "../in/a-copy.png,../in/ref2.png,acopy2,0.3\r\n"
                "../in/a.png,../in/ref1.png,a1-again,\r\n"
                "../in/b.png,../in/missing.png,bad-missing,\r\n"
                "../in/notes.png,../in/ref1.png,bad-image,\r\n"
                "../in/b.png,../in/ref2.png,bad-ratio,7\r\n")
    storage.write_bytes(f"{bucket}/manifests/m1.csv", b"\xef\xbb\xbf" + manifest.encode())
    out = f"{bucket}/out"
    kwargs = {"manifest_uri": f"{bucket}/manifests/m1.csv", "output_uri": out,
              "model": str(tiny_model_dir), "settings": FAST}
    first = restyle(**kwargs)
    before = _objects(first.run_uri)
    second = restyle(**kwargs)
    after = _objects(first.run_uri)
    return {"first": first, "second": second, "before": before, "after": after, "out": out,
            "kwargs": kwargs}


GOOD = ("a1", "b1", "acopy2", "a1-again")


def test_every_output_lands_with_its_sidecar(s3_run):
    run = s3_run["first"].run_uri
    assert run.startswith(s3_run["out"] + "/")
    for pair_id in GOOD:
        img = Image.open(io.BytesIO(storage.read_bytes(f"{run}/{pair_id}.png")))
        assert img.size == (64, 64)
        meta = json.loads(storage.read_bytes(f"{run}/{pair_id}.json"))
        assert meta["pair_id"] == pair_id
        assert meta["source"]["uri"].startswith("s3://") and len(meta["source"]["sha256"]) == 64
        assert meta["model"]["identity"] and meta["versions"]["torch"]
        assert meta["config"]["content"]["num_inference_steps"] == 4
        assert set(meta["cache"]) == {"concept", "content", "fusion"}
        assert meta["flow_run_id"]
        assert "fusion" in meta["timings"] and meta["unet_evals"]["fusion"] > 0
    acopy = json.loads(storage.read_bytes(f"{run}/acopy2.json"))
    assert acopy["config"]["fusion"]["cross_attention_injection_ratio"] == 0.3
    for name in ("run.json", "report.html", "contact_sheet.png", "_SUCCESS"):
        assert storage.exists(f"{run}/{name}"), name
    html = storage.read_bytes(f"{run}/report.html").decode()
    assert all(pair_id in html for pair_id in GOOD) and "thumbs/" in html


def test_run_json_counts_and_failures(s3_run):
    summary = s3_run["first"]
    on_disk = json.loads(storage.read_bytes(f"{summary.run_uri}/run.json"))
    assert on_disk["counts"] == s3_run["second"].all_counts()  # the latest run of this folder
    counts = summary.counts
    assert counts["pairs_ok"] == 4 and counts["pairs_bad"] == 3 and counts["pairs_failed"] == 0
    assert summary.status == on_disk["status"] == "complete"  # bad rows do not fail a run
    assert counts["pairs_skipped"] == 0
    # ref1 and ref2 learned once each although ref1 serves three rows
    assert counts["concepts_computed"] == 2 and counts["concepts_cached"] == 0
    # a.png and a-copy.png are the same bytes: one content inversion for both (+ b.png)
    assert counts["contents_computed"] == 2 and counts["contents_cached"] == 0
    # a.png: {a1, a1-again} share one B* and one B branch; acopy2 has other fusion settings
    assert counts["fusions_computed"] == 3
    failures = {f.line: f.reason for f in summary.failures}
    assert set(failures) == {6, 7, 8}
    assert "missing.png" in failures[6]
    assert "notes.png" in failures[7] and "not a readable image" in failures[7]
    assert "cross_attention_injection_ratio" in failures[8]


def test_identical_rows_each_get_identical_outputs(s3_run):
    run = s3_run["first"].run_uri
    assert storage.read_bytes(f"{run}/a1.png") == storage.read_bytes(f"{run}/a1-again.png")


def test_second_run_recomputes_and_rewrites_nothing(s3_run):
    counts = s3_run["second"].counts
    assert counts["concepts_computed"] == 0 and counts["contents_computed"] == 0
    assert counts["concepts_cached"] == 2 and counts["contents_cached"] == 2
    assert counts["pairs_skipped"] == 4 and counts["pairs_ok"] == 0
    # a kept output still reports how it was made
    assert all(p.timings.get("fusion", 0) > 0 for p in s3_run["second"].planned)
    before, after = s3_run["before"], s3_run["after"]
    for uri, etag in before.items():
        if uri.endswith((".png", ".json")) and "/contact_sheet" not in uri \
                and not uri.endswith("run.json"):
            assert after[uri] == etag, f"{uri} was rewritten"


def test_a_corrupt_cache_entry_is_recomputed_not_trusted(s3_run, prefect_harness):
    from flows.restyle import restyle

    cache = f"{s3_run['out']}/_cache"
    entry = next(u for u in storage.list_uris(f"{cache}/content") if u.endswith(".safetensors"))
    good = storage.read_bytes(entry)
    storage.write_bytes(entry, good[:-10] + b"0123456789")
    # outputs gone: every content is needed again (a complete rerun reads no stage entry)
    for uri in storage.list_uris(s3_run["first"].run_uri):
        storage.delete(uri)
    result = restyle(**s3_run["kwargs"])
    assert result.counts["contents_computed"] == 1
    assert storage.read_bytes(entry) != good[:-10] + b"0123456789"


def test_strict_fails_before_model_work(prefect_harness, tiny_model_dir, bucket):
    from flows.restyle import restyle
    from vct.manifest import ManifestError

    storage.write_bytes(f"{bucket}/strict/m.csv", b"source,reference\nx.png,\n")
    with pytest.raises(ManifestError, match="line 2"):
        restyle(manifest_uri=f"{bucket}/strict/m.csv", output_uri=f"{bucket}/strict-out",
                model=str(tiny_model_dir), settings={**FAST, "strict": True})
    assert storage.list_uris(f"{bucket}/strict-out") == []


def test_incoming_prefix_processes_each_manifest_once(prefect_harness, tiny_model_dir, bucket):
    from flows.restyle import restyle_incoming

    storage.write_bytes(f"{bucket}/inc-img/s.png", _png(0))
    storage.write_bytes(f"{bucket}/inc-img/r.png", _png(1))
    storage.write_bytes(f"{bucket}/incoming/new.csv",
                        f"source,reference\n{bucket}/inc-img/s.png,{bucket}/inc-img/r.png\n"
                        .encode())
    kwargs = {"incoming_uri": f"{bucket}/incoming/", "output_uri": f"{bucket}/inc-out",
              "model": str(tiny_model_dir), "settings": FAST}
    first = restyle_incoming(**kwargs)
    assert [r["status"] for r in first] == ["done"]
    marker = json.loads(storage.read_bytes(f"{bucket}/incoming/new.csv.processed"))
    assert marker["status"] == "done" and marker["counts"]["pairs_ok"] == 1
    assert marker["owner"].startswith(marker["owner"].split("@")[0]) and marker["manifest_sha256"]
    assert restyle_incoming(**kwargs) == []
    assert len([u for u in storage.list_uris(f"{bucket}/inc-out") if u.endswith("_SUCCESS")]) == 1
    # the same name uploaded again with other rows: a new version, processed again
    storage.write_bytes(f"{bucket}/incoming/new.csv",
                        f"source,reference\n{bucket}/inc-img/r.png,{bucket}/inc-img/s.png\n"
                        .encode())
    third = restyle_incoming(**kwargs)
    assert [r["status"] for r in third] == ["done"] and third[0]["run_uri"] != first[0]["run_uri"]
    marker = json.loads(storage.read_bytes(f"{bucket}/incoming/new.csv.processed"))
    assert marker["reason"] == "changed" and marker["previous"]["status"] == "done"


def test_incoming_state_hooks_release_what_a_cancelled_or_crashed_run_holds(tmp_path):
    """Prefect calls these hooks in the flow run's process when it is cancelled or crashes
    (SIGTERM: tests/test_kill_resume.py runs that end to end); they release the library's
    leases held under the flow run's id."""
    from types import SimpleNamespace

    from flows.restyle import _incoming_ended, restyle_incoming
    from vct.batch import incoming

    for hooks in (restyle_incoming.on_cancellation_hooks, restyle_incoming.on_crashed_hooks,
                  restyle_incoming.on_failure_hooks):
        assert _incoming_ended in hooks
    (tmp_path / "m.csv").write_text("source,reference\na.png,b.png\n")
    candidate = incoming.poll(str(tmp_path)).candidates[0]
    assert incoming.claim(candidate, "owner", incoming.LeasePolicy(), key="flow-run-1")
    _incoming_ended(restyle_incoming, SimpleNamespace(id="flow-run-1"),
                    SimpleNamespace(name="Cancelled", message="cancelled by a user"))
    marker = json.loads((tmp_path / "m.csv.processed").read_text())
    assert marker["status"] == "released" and "Cancelled" in marker["release_reason"]


@pytest.mark.slow  # make test-slow (in make check): see pyproject.toml
def test_accelerate_fan_out_gives_the_same_outputs_as_in_process(prefect_harness, tiny_model_dir,
                                                                  tmp_path):
    """Two CPU ranks (gloo) serving one job pool vs this process, every process at 1 torch
    thread: CPU float reductions are bit-stable only for a fixed thread count."""
    from flows.restyle import restyle

    for name, kind in (("s1.png", 0), ("s2.png", 2), ("r1.png", 1), ("r2.png", 3)):
        (tmp_path / name).write_bytes(_png(kind))
    (tmp_path / "m.csv").write_text("source,reference\ns1.png,r1.png\ns2.png,r2.png\n"
                                    "s1.png,r2.png\n")
    common = {"manifest_uri": str(tmp_path / "m.csv"), "model": str(tiny_model_dir)}
    one = {**FAST, "threads": 1}  # the same count in this process and in each rank
    local = restyle(output_uri=str(tmp_path / "local"), settings=one, **common)
    fanned = restyle(output_uri=str(tmp_path / "acc"), **common, settings={
        **one, "executor": "accelerate", "num_processes": 2})
    assert fanned.counts["concepts_computed"] == 2 and fanned.counts["pairs_ok"] == 3
    # One pool, one launch: both ranks served it (which rank takes which job depends on who
    # finishes first), and each rank's busy time over its ready time is in run.json.
    stages = fanned.stages
    assert set().union(*(stages[k].ranks for k in ("concept", "content", "fusion"))) == {0, 1}
    ranks = fanned.details["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and sum(r["jobs"] for r in ranks) == 6
    assert all(r["jobs"] > 0 for r in ranks)
    assert all(0 < r["utilization"] <= 1 and r["load_s"] > 0 for r in ranks)
    for pair in local.planned:
        name = pair.png_name
        assert (tmp_path / "local" / local.run_id / name).read_bytes() == \
            (tmp_path / "acc" / fanned.run_id / name).read_bytes(), name


def test_transient_storage_errors_are_retried_by_the_task(prefect_harness, tiny_model_dir,
                                                          tmp_path, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    from flows.restyle import restyle

    (tmp_path / "s.png").write_bytes(_png(0))
    (tmp_path / "r.png").write_bytes(_png(1))
    (tmp_path / "m.csv").write_text("source,reference\ns.png,r.png\n")
    real_read = storage.reads.read_bytes
    calls = {"n": 0}

    def flaky_read(uri: str, max_bytes: int | None = None) -> bytes:
        calls["n"] += 1
        if calls["n"] == 1:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return real_read(uri, max_bytes)

    # Wherever read_bytes is looked up: callers (storage.read_bytes), read_input (the manifest
    # read, the first call) and read_versioned.
    for module in (storage, storage.reads, storage.cas):
        monkeypatch.setattr(module, "read_bytes", flaky_read)
    result = restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                     model=str(tiny_model_dir), settings=FAST)
    assert result.counts["pairs_ok"] == 1 and calls["n"] > 1


def test_prefect_artifacts_report_progress_table_and_summary(s3_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    runs = {s3_run[k].flow_run_id for k in ("first", "second")}
    with get_client(sync_client=True) as client:
        def of_these_runs(key: str):
            found = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]))) if str(a.flow_run_id) in runs]
            assert found, key
            return found
        assert {a.data for a in of_these_runs("restyle-progress")} == {100.0}  # ended at 100 %
        assert all("a1" in str(a.data) for a in of_these_runs("restyle-pairs"))
        assert all("pairs" in str(a.data) for a in of_these_runs("restyle-report"))


def _report_link(flow_run_id: str) -> str:
    """The URL of a flow run's link artifact to its report (exactly one per run)."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = [a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["restyle-report-link"])))
            if str(a.flow_run_id) == flow_run_id]
    assert len(found) == 1, found
    match = re.fullmatch(r"\[report of [^\]]+\]\((\S+)\)", found[0].data)
    assert match, found[0].data
    return match.group(1)


def test_the_report_link_on_s3_is_presigned_and_opens_the_report(s3_run):
    """The flow run's link artifact is a presigned URL for report.html's key, valid the
    default 7 days; fetched over HTTP without credentials, it is the report."""
    import urllib.request
    from urllib.parse import parse_qs, urlparse

    first = s3_run["first"]
    link = _report_link(first.flow_run_id)
    report = storage.join(first.run_uri, "report.html")
    key = report.removeprefix("s3://").partition("/")[2]
    query = parse_qs(urlparse(link).query)
    assert urlparse(link).path.endswith("/" + key) and query["X-Amz-Expires"] == ["604800"]
    with urllib.request.urlopen(link, timeout=10) as response:
        assert response.read() == storage.read_bytes(report)


def test_the_report_link_of_a_local_run_is_its_file_uri(prefect_harness, broken_model_dir,
                                                        tmp_path):
    """A local output gets the report's file:// URI, for a failed run too (its failures are
    what a lead opens it for)."""
    import urllib.request

    from flows.restyle import restyle

    for name, kind in (("s.png", 0), ("r.png", 1)):
        (tmp_path / name).write_bytes(_png(kind))
    (tmp_path / "m.csv").write_text("source,reference\ns.png,r.png\n")
    state = restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                    model=str(broken_model_dir), settings=FAST, return_state=True)
    summary = state.result(raise_on_failure=False).summary
    report = tmp_path / "out" / summary.run_id / "report.html"
    link = _report_link(summary.flow_run_id)
    assert link == report.resolve().as_uri()
    with urllib.request.urlopen(link) as response:
        assert response.read() == report.read_bytes()


def test_progress_moves_while_the_run_goes(prefect_harness, tiny_model_dir, tmp_path,
                                           monkeypatch):
    import flows.restyle as module

    seen: list[float] = []
    real_update = module.update_progress_artifact

    def record(artifact_id, progress, **kwargs):
        seen.append(progress)
        return real_update(artifact_id, progress=progress, **kwargs)

    monkeypatch.setattr(module, "update_progress_artifact", record)
    for name, kind in (("s1.png", 0), ("s2.png", 2), ("r.png", 1)):
        (tmp_path / name).write_bytes(_png(kind))
    (tmp_path / "m.csv").write_text("source,reference\ns1.png,r.png\ns2.png,r.png\n")
    summary = module.restyle(manifest_uri=str(tmp_path / "m.csv"),
                             output_uri=str(tmp_path / "out"), model=str(tiny_model_dir),
                             settings={**FAST, "content_batch": 2})  # both in one fit
    assert summary.counts["contents_computed"] == 2 and summary.counts["pairs_ok"] == 2
    from vct.artifacts import load_result

    entries = sorted((tmp_path / "out" / "_cache" / "content").rglob("*.safetensors"))
    assert [load_result("content", e.read_bytes()).provenance["batch_size"]
            for e in entries] == [2, 2]
    assert seen == sorted(seen) and seen[-1] == 100.0
    assert len({round(v, 3) for v in seen if 0 < v < 100}) >= 3  # concept, contents, fusion


def test_a_run_whose_pairs_all_fail_is_failed_and_leaves_no_success(prefect_harness,
                                                                    broken_model_dir, tmp_path):
    """Every job fails at compute time (the model's UNet weights are cut short: the layout,
    configs and identity pass every check before work, loading fails in the job): the flow
    run is Failed, its message gives the counts, run.json says failed, no _SUCCESS."""
    from flows.restyle import RunFailed, restyle

    for name, kind in (("s.png", 0), ("r.png", 1)):
        (tmp_path / name).write_bytes(_png(kind))
    (tmp_path / "m.csv").write_text("source,reference\ns.png,r.png\n")
    state = restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                    model=str(broken_model_dir), settings=FAST, return_state=True)
    assert state.is_failed() and "0 ok, 0 skipped, 1 failed" in state.message
    outcome = state.result(raise_on_failure=False)
    assert isinstance(outcome, RunFailed) and outcome.summary.status == "failed"
    run = tmp_path / "out" / outcome.summary.run_id
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    assert not (run / "_SUCCESS").exists()
    reasons = [p.reason for p in outcome.summary.pairs]
    assert reasons and all("could not load" in r for r in reasons), reasons
    with pytest.raises(RunFailed, match="1 failed"):  # a plain call raises with the counts
        restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                model=str(broken_model_dir), settings=FAST)


def test_the_flows_refuse_a_missing_model_and_bad_settings_before_any_write(
        prefect_harness, bucket, tmp_path):
    from flows.restyle import restyle, restyle_incoming
    from vct.config import ConfigError

    storage.write_bytes(f"{bucket}/nomodel/in/m.csv", b"source,reference\na.png,b.png\n")
    with pytest.raises(ConfigError, match="model .*a model is required"):
        restyle(manifest_uri=f"{bucket}/nomodel/in/m.csv", output_uri=f"{bucket}/nomodel/out",
                model="")
    with pytest.raises(ConfigError, match="model .*a model is required"):
        restyle_incoming(incoming_uri=f"{bucket}/nomodel/in/", output_uri=f"{bucket}/nomodel/out",
                         model="")
    assert storage.list_uris(f"{bucket}/nomodel/") == [f"{bucket}/nomodel/in/m.csv"]  # no claim
    for settings, field in (({"content_batch": 0}, "content_batch"),
                            ({"device": "gpu"}, "device"),
                            ({"fusion": {"self_attention_injection_ratio": 2}},
                             "self_attention_injection_ratio")):
        with pytest.raises(Exception, match=field):
            restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                    model="some/model", settings=settings)
    assert not (tmp_path / "out").exists()


def test_the_flows_refuse_an_unusable_output_and_a_tiny_size_before_any_claim(
        prefect_harness, tiny_model_dir, bucket, tmp_path):
    """A missing output bucket, and a working size the model cannot run at: refused by the
    library's preflight before the incoming flow claims a manifest or the restyle flow writes."""
    from flows.restyle import restyle, restyle_incoming
    from vct.config import ConfigError

    storage.write_bytes(f"{bucket}/pre/in/m.csv", b"source,reference\na.png,b.png\n")
    with pytest.raises(storage.OutputUnusable, match="bucket 'no-such-out-bucket' does not"):
        restyle_incoming(incoming_uri=f"{bucket}/pre/in/", output_uri="s3://no-such-out-bucket/o",
                         model=str(tiny_model_dir))
    assert storage.list_uris(f"{bucket}/pre/") == [f"{bucket}/pre/in/m.csv"]  # no claim
    (tmp_path / "s.png").write_bytes(_png(0))
    (tmp_path / "m.csv").write_text("source,reference\ns.png,s.png\n")
    with pytest.raises(ConfigError, match="content.resolution .*not a multiple"):
        restyle(manifest_uri=str(tmp_path / "m.csv"), output_uri=str(tmp_path / "out"),
                model=str(tiny_model_dir), settings={"content": {"resolution": 12}})
    assert not (tmp_path / "out").exists()


def test_incoming_records_a_failed_child_and_fails_itself(prefect_harness, broken_model_dir,
                                                          bucket):
    from flows.restyle import RunFailed, restyle_incoming

    storage.write_bytes(f"{bucket}/inc2-img/s.png", _png(0))
    storage.write_bytes(f"{bucket}/inc2-img/r.png", _png(1))
    storage.write_bytes(f"{bucket}/incoming2/bad.csv",
                        f"source,reference\n{bucket}/inc2-img/s.png,{bucket}/inc2-img/r.png\n"
                        .encode())
    state = restyle_incoming(incoming_uri=f"{bucket}/incoming2/", output_uri=f"{bucket}/inc2-out",
                             model=str(broken_model_dir), settings=FAST, return_state=True)
    assert state.is_failed() and "1 of 1 manifest(s) did not complete" in state.message
    assert isinstance(state.result(raise_on_failure=False), RunFailed)
    marker = json.loads(storage.read_bytes(f"{bucket}/incoming2/bad.csv.processed"))
    assert marker["status"] == "failed" and marker["counts"]["pairs_failed"] == 1
