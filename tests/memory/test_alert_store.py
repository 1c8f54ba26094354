"""Issue 14: alerts, their per-stream states and their event log in memory, on every backend (embedded, Redis, a
Redis Cluster): CRUD, ids that only grow (across reopening), exactly-once appends, sealed configs, the cap."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from memory import EmbeddedStore, MemoryStore
from tests.memory.test_secrets import raw

SECRET = "whsec-0f1e2d3c4b5a69788796a5b4c3d2e1f0"
CONFIG = {
    "name": "door",
    "streams": ["cam"],
    "question": "Is a person at the loading bay door?",
    "webhook_url": "https://hooks.example.com/vcflash",
    "webhook_secret": SECRET,
}


def event(alert: str = "door", stream: str = "cam", start_seq: int = 3, kind: str = "start", **extra: Any) -> dict:
    """An event record as the engine makes it (reasoner/alerts.py)."""
    return {
        "key": f"{alert}/{stream}/{start_seq}/{kind}",
        "kind": kind,
        "alert": alert,
        "stream": stream,
        "event": f"{alert}/{stream}/{start_seq}",
        "start_media_s": 4.0 * start_seq,
        "end_media_s": None if kind == "start" else 4.0 * start_seq + 8,
        "start_wall": 1_700_000_000.0 + 4 * start_seq,
        "end_wall": None,
        "peak": 0.93,
        "score": 0.91,
        "clips": [start_seq, start_seq + 1],
        "emitted_wall": 1_700_000_100.5,
    } | extra


def test_alert_configs_crud(store: MemoryStore) -> None:
    assert store.alert_configs() == {} and store.delete_alert("door") is False
    store.put_alert("door", CONFIG)
    store.put_alert("yard", {"question": "Is a car in the yard?"})
    assert store.alert_configs() == {"door": CONFIG, "yard": {"question": "Is a car in the yard?"}}
    store.put_alert("door", CONFIG | {"threshold": 0.7})  # replace
    assert store.alert_configs()["door"]["threshold"] == 0.7
    assert store.delete_alert("door") is True and store.delete_alert("door") is False
    assert list(store.alert_configs()) == ["yard"]


def test_states_are_per_alert_and_stream_and_go_with_the_alert_not_its_events(store: MemoryStore) -> None:
    store.put_alert("door", CONFIG)
    assert store.alert_state("door", "cam") is None
    store.put_alert_state("door", "cam", {"seq": 7, "above_since": None})
    store.put_alert_state("door", "dock", {"seq": 2})
    assert store.alert_state("door", "cam") == {"seq": 7, "above_since": None}
    store.put_alert_state("door", "cam", {"seq": 8})
    assert store.alert_state("door", "cam") == {"seq": 8} and store.alert_state("door", "dock") == {"seq": 2}
    store.append_event(event())
    assert store.delete_alert("door")
    assert store.alert_state("door", "cam") is None and store.alert_state("door", "dock") is None
    assert [e["key"] for e in store.events()] == ["door/cam/3/start"]  # the record stays


def test_a_new_alert_of_an_old_name_does_not_inherit_a_state_written_after_the_delete(store: MemoryStore) -> None:
    store.put_alert("door", CONFIG)
    store.delete_alert("door")
    store.put_alert_state("door", "cam", {"in_event": True})  # a runner that had not yet seen the delete
    store.put_alert("door", CONFIG)
    assert store.alert_state("door", "cam") is None
    store.put_alert_state("door", "cam", {"seq": 1})
    store.put_alert("door", CONFIG | {"threshold": 0.6})  # a replace keeps it
    assert store.alert_state("door", "cam") == {"seq": 1}


def test_append_event_assigns_growing_ids_once_per_key_with_its_state(store: MemoryStore) -> None:
    store.put_alert("door", CONFIG)
    first, created = store.append_event(event(), ("door", "cam", {"seq": 4, "in_event": True}))
    assert created and first >= 1 and store.alert_state("door", "cam") == {"seq": 4, "in_event": True}
    second, created = store.append_event(event(kind="end"), ("door", "cam", {"seq": 6, "in_event": False}))
    assert created and second > first
    # the same start again (a runner that crashed before it saved its state): its id, and nothing written
    again, created = store.append_event(event(peak=0.5), ("door", "cam", {"seq": 4, "in_event": True}))
    assert (again, created) == (first, False)
    assert store.alert_state("door", "cam") == {"seq": 6, "in_event": False}
    records = store.events()
    assert [r["id"] for r in records] == [first, second]
    assert records[0] == {"id": first} | event()  # stored as given (peak 0.93, not 0.5), None and lists kept
    third, _ = store.append_event(event("yard", "dock", 9))
    assert [r["id"] for r in store.events(after=first)] == [second, third]
    assert [r["id"] for r in store.events(alert="yard")] == [third]
    assert [r["id"] for r in store.events(after=third)] == [] and store.events(alert="nobody") == []
    assert [r["id"] for r in store.events(limit=2)] == [first, second]


def test_bad_records_are_refused(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="key"):
        store.append_event({"alert": "door", "kind": "start"})
    with pytest.raises(ValueError):
        store.append_event(event(score=float("nan")))
    assert store.events() == []


def test_ids_keep_growing_across_reopen_and_everything_survives(make_store) -> None:
    store = make_store()
    store.put_alert("door", CONFIG)
    store.put_alert_state("door", "cam", {"seq": 5})
    ids = [store.append_event(event(start_seq=s))[0] for s in range(3)]
    store.close()
    reopened = make_store()
    assert reopened.alert_configs() == {"door": CONFIG} and reopened.alert_state("door", "cam") == {"seq": 5}
    assert [r["id"] for r in reopened.events()] == ids
    assert reopened.append_event(event(start_seq=1)) == (ids[1], False)
    new, created = reopened.append_event(event(start_seq=3))
    assert created and new > ids[-1]


def test_the_webhook_secret_is_sealed_at_rest_and_gone_after_delete(store: MemoryStore) -> None:
    store.put_alert("door", CONFIG)
    held = raw(store)
    assert SECRET.encode() not in held and b"hooks.example.com" not in held
    assert store.alert_configs()["door"]["webhook_secret"] == SECRET
    store.append_event(event())
    assert b"door/cam/3/start" in raw(store)  # we do look at the right bytes
    store.delete_alert("door")
    assert SECRET.encode() not in raw(store)


def test_events_are_capped_to_the_newest(make_store) -> None:
    store = make_store()
    store.max_events = 5  # as VCFLASH_MAX_EVENTS=5 would give
    ids = [store.append_event(event("door" if s % 2 else "yard", start_seq=s))[0] for s in range(12)]
    assert [r["id"] for r in store.events()] == ids[-5:]
    assert [r["id"] for r in store.events(alert="door")] == [i for i in ids[-5:] if i in ids[1::2]]
    assert store.append_event(event(start_seq=0))[1] is True  # an evicted key is new again
    assert [r["id"] for r in store.events()][-1] > ids[-1]


def test_concurrent_appends_of_one_key_store_it_once(make_store) -> None:
    """Two writers (two store objects, as two processes would be) racing on the same keys."""
    a, b = make_store(), make_store()
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def write(store: MemoryStore) -> None:
        for s in range(20):
            got = store.append_event(event(start_seq=s), ("door", "cam", {"seq": s}))
            with lock:
                results.append(got)

    threads = [threading.Thread(target=write, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(created for _, created in results) == 20
    records = a.events()
    assert len(records) == 20 and len({r["key"] for r in records}) == 20
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)


def test_embedded_tables_come_with_a_schema_version(tmp_path) -> None:
    import sqlite3

    from memory.embedded import SCHEMA_VERSION

    path = tmp_path / "m.sqlite3"
    EmbeddedStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE events")
        db.execute("DROP TABLE alerts")
        db.execute("PRAGMA user_version = 1")  # a file from before alerts
    with EmbeddedStore(path) as store:
        store.put_alert("door", CONFIG)
        assert store.append_event(event())[1] and store.alert_configs() == {"door": CONFIG}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
