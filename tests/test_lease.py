"""vct.batch.lease: the one lease mechanism under cache claims and incoming markers."""

from __future__ import annotations

import time

from vct import storage
from vct.batch import lease


def test_create_if_absent_or_at_a_version_one_winner(tmp_path):
    uri = str(tmp_path / "l.json")
    first = lease.create(uri, {"expires_at": 10.0})
    assert first is not None and lease.create(uri, {"expires_at": 20.0}) is None
    taken = lease.create(uri, {"expires_at": 30.0}, replacing=first)
    assert taken is not None and lease.create(uri, {"expires_at": 40.0}, replacing=first) is None
    assert lease.read(uri) == ({"expires_at": 30.0}, taken)


def test_a_lease_whose_record_changed_is_lost_and_never_writes_again(tmp_path):
    uri = str(tmp_path / "l.json")
    held = lease.Lease(uri, lease.create(uri, {"expires_at": 1.0}), {"expires_at": 1.0})
    assert held.swap({"expires_at": 2.0}) and lease.read(uri)[0] == {"expires_at": 2.0}
    lease.create(uri, {"expires_at": 9.0, "owner": "b"}, replacing=held.version)  # taken over
    assert held.swap({"expires_at": 3.0}) is False and held.lost
    held.drop()  # not ours any more: the successor's record stays
    assert lease.read(uri)[0] == {"expires_at": 9.0, "owner": "b"}


def test_dead_and_unreadable_records_are_not_live(tmp_path):
    assert lease.is_live({"expires_at": 5.0}, now=4.0)
    assert not lease.is_live({"expires_at": 5.0}, now=5.0)
    assert not lease.is_live({"expires_at": None}, now=0.0)
    assert not lease.is_live({"expires_at": True}, now=0.0)
    uri = str(tmp_path / "junk.json")
    storage.write_bytes(uri, b"not json")
    record, _ = lease.read(uri)
    assert record == {} and not lease.is_live(record, 0.0)


def test_renewing_renews_leases_added_meanwhile_and_skips_closed_ones(tmp_path):
    leases: list[lease.Lease] = []
    calls: list[str] = []

    def renew(held: lease.Lease) -> bool:
        calls.append(held.uri)
        return held.swap({"expires_at": time.time() + 60})

    def make(name: str) -> lease.Lease:
        uri = str(tmp_path / name)
        return lease.Lease(uri, lease.create(uri, {"expires_at": 0.0}), {"expires_at": 0.0})

    with lease.renewing(leases, renew, 0.02, "test"):
        a = make("a")
        leases.append(a)
        deadline = time.time() + 5
        while a.uri not in calls and time.time() < deadline:
            time.sleep(0.01)
        a.close()
        time.sleep(0.1)  # a renewal already under way when it closed may still be counted
        seen = calls.count(a.uri)
        b = make("b")
        leases.append(b)
        while b.uri not in calls and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
    assert seen >= 1 and calls.count(a.uri) == seen and b.uri in calls
