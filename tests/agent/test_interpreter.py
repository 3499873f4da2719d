"""The engine's switch interval (agent/interpreter.py): short for requests, the default
while any pull or load runs, however they overlap."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from agent import interpreter


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    before = sys.getswitchinterval()
    normal = interpreter._normal
    try:
        yield
    finally:
        interpreter._normal = normal
        sys.setswitchinterval(before)


def test_bulk_work_has_the_default_interval_until_the_last_one_ends() -> None:
    interpreter.for_requests()
    assert sys.getswitchinterval() == pytest.approx(interpreter.REQUESTS)
    first_in, release = threading.Event(), threading.Event()

    def first() -> None:
        with interpreter.bulk_work():
            first_in.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    assert first_in.wait(10)
    with interpreter.bulk_work():  # a second pull, while the first runs
        assert sys.getswitchinterval() == pytest.approx(interpreter.BULK)
    assert sys.getswitchinterval() == pytest.approx(interpreter.BULK)  # the first still runs
    release.set()
    t.join(10)
    assert sys.getswitchinterval() == pytest.approx(interpreter.REQUESTS)


def test_a_failing_pull_still_gives_the_interval_back() -> None:
    interpreter.for_requests()
    with pytest.raises(RuntimeError), interpreter.bulk_work():
        raise RuntimeError("registry went away")
    assert sys.getswitchinterval() == pytest.approx(interpreter.REQUESTS)


def test_without_the_engine_entry_point_the_interval_is_left_as_it_was() -> None:
    before = sys.getswitchinterval()
    with interpreter.bulk_work():
        pass
    assert sys.getswitchinterval() == pytest.approx(before)
