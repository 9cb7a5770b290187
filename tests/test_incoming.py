"""Incoming markers with leases (vct.batch.incoming) on a local folder and on S3 (moto):
claim, renew, release, take over, versions, and polls that write nothing for old manifests."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from vct import storage
from vct.batch import incoming
from vct.batch.incoming import LeasePolicy
from vct.config import ConfigError

FAST = LeasePolicy(lease_s=1.0, renew_s=0.2)


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path: Path) -> str:
    """An incoming prefix on each backend (S3: a fresh bucket on the session's moto)."""
    if request.param == "local":
        return str(tmp_path / "incoming")
    return request.getfixturevalue("s3_bucket") + "/incoming"


def _drop(prefix: str, name: str, body: bytes = b"source,reference\na.png,b.png\n") -> str:
    uri = storage.join(prefix, name)
    storage.write_bytes(uri, body)
    return uri


def _record(manifest_uri: str) -> dict:
    return json.loads(storage.read_bytes(incoming.marker_uri(manifest_uri)))


def _writes(prefix: str) -> list[str]:
    """Every write (PUT, local replace) made under the prefix from now on."""
    calls: list[str] = []
    if storage.is_s3(prefix):
        storage.s3_client().meta.events.register("before-call.s3.PutObject",
                                                 lambda **kw: calls.append("put"))
    return calls


def _only(poll: incoming.Poll) -> incoming.Candidate:
    assert len(poll.candidates) == 1, poll.summary
    return poll.candidates[0]


def test_a_claim_is_a_lease_that_records_owner_expiry_and_the_manifest_version(prefix):
    uri = _drop(prefix, "m.csv")
    before = time.time()
    found = incoming.poll(prefix)
    assert found.verdicts == {"new": 1} and _only(found).reason == "new"
    lease = incoming.claim(_only(found), "owner-a", FAST, key="k-a")
    assert lease is not None
    record = _record(uri)
    assert record["status"] == "running" and record["owner"] == "owner-a"
    assert before + FAST.lease_s <= record["expires_at"] <= time.time() + FAST.lease_s
    assert record["manifest_etag"] == _only(found).manifest.etag
    import hashlib

    assert record["manifest_sha256"] == hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    again = incoming.poll(prefix)
    assert again.verdicts == {"held": 1} and again.candidates == []
    # a second claim on the same judgement loses: the marker exists now
    assert incoming.claim(_only(found), "owner-b", FAST, key="k-b") is None
    lease.finish("done", run_uri="somewhere")
    assert _record(uri)["status"] == "done" and _record(uri)["run_uri"] == "somewhere"
    assert incoming.poll(prefix).verdicts == {"done": 1}


def test_a_working_run_renews_its_lease_in_the_background(prefix):
    uri = _drop(prefix, "m.csv")
    lease = incoming.claim(_only(incoming.poll(prefix)), "owner-a", FAST, key="k")
    first_expiry = _record(uri)["expires_at"]
    with lease.renewing():
        time.sleep(1.5)  # longer than the lease: only the renewals keep it alive
        assert incoming.poll(prefix).verdicts == {"held": 1}
    record = _record(uri)
    assert record["renewals"] >= 3 and record["expires_at"] > first_expiry + 1.0
    assert lease.finish("done")


def test_an_expired_lease_is_taken_over_once_and_its_old_owner_cannot_write_again(prefix):
    uri = _drop(prefix, "m.csv")
    stale = incoming.claim(_only(incoming.poll(prefix)), "killed-run", FAST, key="old")
    later = time.time() + FAST.lease_s + 0.1  # as if the owner was SIGKILLed: no renewals
    found = incoming.poll(prefix, now=later)
    assert found.verdicts == {"expired": 1}
    # two pollers judged the same expired marker; exactly one wins the takeover
    wins = [incoming.claim(_only(found), f"poller-{i}", FAST, key=f"p{i}", now=later)
            for i in range(2)]
    assert sum(w is not None for w in wins) == 1
    winner = next(w for w in wins if w is not None)
    record = _record(uri)
    assert record["owner"] == winner.owner and record["attempt"] == 2
    assert record["previous"]["owner"] == "killed-run" and record["reason"] == "expired"
    # the stalled first owner wakes up: it can neither renew nor overwrite the new record
    assert stale.renew() is False and stale.lost
    assert stale.finish("failed", error="late") is False
    assert _record(uri)["owner"] == winner.owner and _record(uri)["status"] == "running"


def test_an_error_or_signal_in_the_run_releases_the_claim_at_once(prefix):
    uri = _drop(prefix, "m.csv")
    lease = incoming.claim(_only(incoming.poll(prefix)), "owner-a", FAST, key="k")
    with pytest.raises(KeyboardInterrupt), lease.renewing():
        raise KeyboardInterrupt
    record = _record(uri)
    assert record["status"] == "released" and "KeyboardInterrupt" in record["release_reason"]
    found = incoming.poll(prefix)  # no waiting for the expiry
    assert found.verdicts == {"released": 1}
    assert incoming.claim(_only(found), "owner-b", FAST, key="k2") is not None


def test_release_held_gives_back_every_claim_of_a_flow_run(prefix):
    uris = [_drop(prefix, f"m{i}.csv") for i in range(2)]
    for candidate in incoming.poll(prefix).candidates:
        assert incoming.claim(candidate, "owner", FAST, key="run-1") is not None
    assert len(incoming.held("run-1")) == 2
    assert incoming.release_held("run-1", "flow run Cancelled") == 2
    assert incoming.held("run-1") == []
    assert {_record(u)["status"] for u in uris} == {"released"}
    assert incoming.release_held("run-1", "again") == 0  # idempotent


def test_a_changed_manifest_runs_again_the_same_bytes_do_not(prefix):
    uri = _drop(prefix, "m.csv")
    incoming.claim(_only(incoming.poll(prefix)), "a", FAST, key="k").finish("done")
    _drop(prefix, "m.csv")  # the same bytes uploaded again (local: a new mtime)
    assert incoming.poll(prefix).verdicts == {"done": 1}
    _drop(prefix, "m.csv", b"source,reference\nother.png,b.png\n")
    found = incoming.poll(prefix)
    assert found.verdicts == {"changed": 1}
    lease = incoming.claim(_only(found), "b", FAST, key="k")
    assert lease is not None and _record(uri)["previous"]["status"] == "done"
    lease.finish("done")
    assert incoming.poll(prefix).verdicts == {"done": 1}


def test_a_marker_nobody_can_read_does_not_block_its_manifest(prefix):
    uri = _drop(prefix, "m.csv")
    storage.write_bytes(incoming.marker_uri(uri), b"{not json")
    found = incoming.poll(prefix)
    assert found.verdicts == {"unreadable": 1}
    assert incoming.claim(_only(found), "a", FAST, key="k") is not None
    assert _record(uri)["status"] == "running"


def test_a_poll_of_many_finished_manifests_writes_nothing_and_says_one_line(prefix):
    for i in range(30):
        uri = _drop(prefix, f"old-{i:02d}.csv")
        storage.write_bytes(incoming.marker_uri(uri), json.dumps({
            "status": "done", "manifest_etag": "stale", "manifest_sha256": __import__(
                "hashlib").sha256(storage.read_bytes(uri)).hexdigest()}).encode())
    _drop(prefix, "new.csv")
    markers = {u: storage.read_bytes(u) for u in storage.list_uris(prefix)
               if u.endswith(".processed")}
    writes = _writes(prefix)
    found = incoming.poll(prefix)
    assert writes == []
    assert {u: storage.read_bytes(u) for u in markers} == markers
    assert found.summary.count("\n") == 0
    assert "31 manifest(s)" in found.summary and "30 done" in found.summary
    assert "1 new" in found.summary and [c.manifest.uri.rsplit("/", 1)[-1]
                                         for c in found.candidates] == ["new.csv"]


def test_a_manifest_removed_after_the_listing_is_not_claimed(prefix):
    uri = _drop(prefix, "m.csv")
    found = incoming.poll(prefix)
    storage.delete(uri)
    assert incoming.claim(_only(found), "a", FAST, key="k") is None
    assert not storage.exists(incoming.marker_uri(uri))


def test_lease_policy_is_checked():
    with pytest.raises(ConfigError, match="renew_seconds"):
        LeasePolicy(lease_s=10, renew_s=6)
    with pytest.raises(ConfigError, match="lease_seconds"):
        LeasePolicy(lease_s=0, renew_s=1)


def test_conditional_put_is_a_compare_and_swap(prefix):
    uri = storage.join(prefix, "cas")
    first = storage.conditional_put(uri, b"one", None)
    assert first and storage.conditional_put(uri, b"two", None) is None
    assert storage.conditional_put(uri, b"two", "0" * 32) is None
    second = storage.conditional_put(uri, b"two", first)
    assert second and second != first and storage.read_bytes(uri) == b"two"
    assert [o.etag for o in storage.list_objects(prefix)] == [second]
    assert storage.conditional_put(storage.join(prefix, "gone"), b"x", first) is None


def test_concurrent_local_compare_and_swaps_have_one_winner(tmp_path: Path):
    uri = str(tmp_path / "m.csv.processed")
    base = storage.conditional_put(uri, b"base", None)
    results: list[str | None] = []
    barrier = threading.Barrier(8)

    def contend(i: int) -> None:
        barrier.wait()
        results.append(storage.conditional_put(uri, f"writer {i}".encode(), base))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
