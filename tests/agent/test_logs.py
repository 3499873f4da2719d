"""The json-file log (agent/logs.py) read while it is written: `logs -f` right after `start`
(docker-py's containers.run does exactly that) must send every record once, in order."""

from __future__ import annotations

import json
import shutil
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
    with logs.LogReader(path) as reader:
        got = [r["log"].encode() for r in reader.records()]
        got += [r["log"].encode() for r in reader.follow(running.is_set, log)]
    writer.join()
    assert b"".join(got) == b"".join(chunks)


def test_a_record_being_written_is_left_to_the_follower(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    whole = json.dumps({"log": "one\n", "stream": "stdout", "time": logs.now_rfc3339()}).encode() + b"\n"
    second = json.dumps({"log": "two\n", "stream": "stderr", "time": logs.now_rfc3339()}).encode() + b"\n"
    path.write_bytes(whole + second[:10])  # the second record is half written
    with logs.LogReader(path) as reader:
        assert [r["log"] for r in reader.records()] == ["one\n"]
        with open(path, "ab") as f:
            f.write(second[10:])
        assert [r["log"] for r in reader.follow(lambda: False, None)] == ["two\n"]


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

    with logs.LogReader(path) as reader:
        assert [r["log"] for r in reader.follow(is_running, None)] == ["last\n"]


def test_a_follower_wakes_for_each_write_and_for_the_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "FOLLOW_WAIT", 60.0)  # a missed wake-up would stall the test for a minute
    path = tmp_path / "c-json.log"
    log = logs.LogFile(path)
    running = threading.Event()
    running.set()
    got: list[str] = []
    reader = logs.LogReader(path)
    follower = threading.Thread(target=lambda: got.extend(r["log"] for r in reader.follow(running.is_set, log)))
    t0 = time.monotonic()
    follower.start()
    for i in range(20):
        log.write("stdout", f"line {i}\n".encode())
        time.sleep(0.01)
    running.clear()
    log.close()
    follower.join(30)
    reader.close()
    assert not follower.is_alive()
    assert got == [f"line {i}\n" for i in range(20)]
    assert time.monotonic() - t0 < 30


def test_a_follower_gets_what_was_written_before_the_container_was_removed(tmp_path: Path) -> None:
    """docker-py's `run(remove=True)`: `logs -f`, then `wait` and `rm` as soon as the head
    of the logs answer is in. `rm` moves the container's directory away (and a quiet moment
    later deletes it) while the handler may not yet have read a byte."""
    box = tmp_path / "containers" / "c1"
    box.mkdir(parents=True)
    log = logs.LogFile(box / "c1-json.log")
    reader = logs.LogReader(box / "c1-json.log")  # made before the answer's head
    log.write("stdout", b"hi\n")
    log.close()  # the exit
    trash = tmp_path / "trash"
    trash.mkdir()
    (box).rename(trash / "c1-gone")  # rm
    shutil.rmtree(trash / "c1-gone")  # the housekeeper
    with reader:
        got = [r["log"] for r in reader.records()]
        got += [r["log"] for r in reader.follow(lambda: False, None)]
    assert got == ["hi\n"]


def test_a_follower_goes_on_in_the_new_file_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "c-json.log"
    log = logs.LogFile(path, max_size=600)  # one rotation in the twelve records
    running = threading.Event()
    running.set()
    with logs.LogReader(path) as reader:
        assert reader.records() == []
        lines = [f"line {i:03d}\n".encode() for i in range(12)]
        for data in lines:
            log.write("stdout", data)
        running.clear()
        log.close()
        got = [r["log"].encode() for r in reader.follow(running.is_set, log)]
    assert (tmp_path / "c-json.log.1").exists() and not (tmp_path / "c-json.log.2").exists()
    assert got == lines
