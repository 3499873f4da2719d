"""Containers' records written off the request path (agent/containers.py ``RecordWriter``)."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from agent.containers import RECORD, Container, RecordWriter, write_record


def test_the_latest_record_wins_and_flush_waits_for_it(tmp_path: Path) -> None:
    gate = threading.Event()
    written: list[bytes] = []

    def slow_write(root: Path, data: bytes) -> None:
        gate.wait(10)
        written.append(data)
        write_record(root, data)

    w = RecordWriter(slow_write)
    w.submit(tmp_path, b'{"n": 0}')  # taken by the thread, held at the gate
    for n in range(1, 5):  # these wait; each replaces the one before
        w.submit(tmp_path, b'{"n": %d}' % n)
    assert not w.flush(0.2)  # not written yet: flush says so rather than pretending
    gate.set()
    assert w.flush(10)
    assert json.loads((tmp_path / RECORD).read_text()) == {"n": 4}
    assert written[-1] == b'{"n": 4}' and len(written) <= 2
    assert not (tmp_path / f"{RECORD}.tmp").exists()


def test_a_container_saves_what_it_held_when_save_was_called(tmp_path: Path) -> None:
    c = Container(tmp_path, {"Id": "a" * 64, "Name": "/x", "State": {"Status": "created"}})
    c.save()
    c.r["State"]["Status"] = "running"  # changed after the save: the next save carries it
    from agent.containers import RECORDS
    assert RECORDS.flush(10)
    assert Container.load(tmp_path).state["Status"] == "created"
    c.save()
    assert RECORDS.flush(10)
    assert Container.load(tmp_path).state["Status"] == "running"


def test_a_removed_containers_write_is_dropped_quietly_and_a_real_failure_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = RecordWriter()
    gone = tmp_path / "gone"  # moved to the trash before its write came up
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / f"{RECORD}.tmp").mkdir()  # the write cannot create its temporary file
    with caplog.at_level(logging.ERROR, logger="agent.containers"):
        w.submit(gone, b"{}")
        w.submit(blocked, b"{}")
        assert w.flush(10)
    assert not gone.exists()
    assert [r.getMessage() for r in caplog.records if "gone" in r.getMessage()] == []
    assert any("blocked" in r.getMessage() for r in caplog.records)
    w.submit(tmp_path, b'{"after": 1}')  # the thread goes on after a failure
    assert w.flush(10)
    assert json.loads((tmp_path / RECORD).read_text()) == {"after": 1}


def test_a_record_waiting_for_a_removed_container_is_not_written(tmp_path: Path) -> None:
    gate = threading.Event()
    written: list[Path] = []

    def slow_write(root: Path, data: bytes) -> None:
        gate.wait(10)
        written.append(root)

    w = RecordWriter(slow_write)
    first, removed, kept = tmp_path / "first", tmp_path / "removed", tmp_path / "kept"
    w.submit(first, b"{}")  # taken by the thread, held at the gate
    w.submit(removed, b"{}")
    w.submit(kept, b"{}")
    w.drop(removed)
    w.drop(tmp_path / "never-submitted")  # nothing to forget: no error
    gate.set()
    assert w.flush(10)
    assert written == [first, kept]


def test_a_removed_container_saves_nothing(tmp_path: Path) -> None:
    from agent.containers import RECORDS

    c = Container(tmp_path, {"Id": "b" * 64, "Name": "/y", "State": {"Status": "exited"}})
    c.removed = True
    c.save()
    assert RECORDS.flush(10)
    assert not (tmp_path / RECORD).exists()
