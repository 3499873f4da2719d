"""The json-file log (agent/logs.py) read while it is written: `logs -f` right after `start`
(docker-py's containers.run does exactly that) must send every record once, in order."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from agent import logs


def test_reading_then_following_a_log_being_written_sends_each_record_once(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    log = logs.LogFile(path)
    chunks = [bytes([65 + i % 26]) * 65536 for i in range(60)]
    running = threading.Event()
    running.set()
    half = threading.Event()

    def write() -> None:
        for i, data in enumerate(chunks):
            log.write("stdout", data)
            if i == 20:
                half.set()
        running.clear()  # as the engine does: the exit is recorded, then the log closed
        log.close()

    writer = threading.Thread(target=write)
    writer.start()
    half.wait(10)  # the reader starts in the middle of the output, as a client would
    end: list[int] = []
    got = [r["log"].encode() for r in logs.read_logs(path, end=end)]
    got += [r["log"].encode() for r in logs.follow(path, end[0], running.is_set, log)]
    writer.join()
    assert b"".join(got) == b"".join(chunks)


def test_a_record_being_written_is_left_to_the_follower(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    whole = json.dumps({"log": "one\n", "stream": "stdout", "time": logs.now_rfc3339()}).encode() + b"\n"
    second = json.dumps({"log": "two\n", "stream": "stderr", "time": logs.now_rfc3339()}).encode() + b"\n"
    path.write_bytes(whole + second[:10])  # the second record is half written
    end: list[int] = []
    assert [r["log"] for r in logs.read_logs(path, end=end)] == ["one\n"]
    assert end == [len(whole)]
    with open(path, "ab") as f:
        f.write(second[10:])
    assert [r["log"] for r in logs.follow(path, end[0], lambda: False, None)] == ["two\n"]


def test_following_an_exited_container_still_reads_what_it_wrote_last(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    path.write_bytes(b"")
    calls = []

    def is_running() -> bool:  # the exit is recorded right after the last write
        if not calls:
            with open(path, "ab") as f:
                f.write(json.dumps({"log": "last\n", "stream": "stdout", "time": logs.now_rfc3339()}).encode() + b"\n")
        calls.append(1)
        return False

    assert [r["log"] for r in logs.follow(path, 0, is_running, None)] == ["last\n"]


def test_a_follower_wakes_for_each_write_and_for_the_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "FOLLOW_WAIT", 60.0)  # a missed wake-up would stall the test for a minute
    path = tmp_path / "c-json.log"
    log = logs.LogFile(path)
    running = threading.Event()
    running.set()
    got: list[str] = []
    follower = threading.Thread(target=lambda: got.extend(
        r["log"] for r in logs.follow(path, 0, running.is_set, log)))
    t0 = time.monotonic()
    follower.start()
    for i in range(20):
        log.write("stdout", f"line {i}\n".encode())
        time.sleep(0.01)
    running.clear()
    log.close()
    follower.join(30)
    assert not follower.is_alive()
    assert got == [f"line {i}\n" for i in range(20)]
    assert time.monotonic() - t0 < 30
