"""The housekeeper: deferred clean-up runs when the API is quiet, never waits too long, and
runs at once, in order, when something needs it done."""

from __future__ import annotations

import threading
import time

import pytest

from agent.housekeeping import Housekeeper


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_a_task_waits_while_requests_come_in_and_runs_once_quiet() -> None:
    hk = Housekeeper(quiet=0.3, max_wait=60)
    done = threading.Event()
    hk.request_started()
    hk.defer("a", done.set, "clean-up")
    for _ in range(6):  # a request every 0.1 s: never quiet for 0.3 s
        time.sleep(0.1)
        assert not done.is_set()
        hk.request_started()
    assert done.wait(5)
    assert hk.pending() == 0


def test_a_busy_engine_still_runs_a_task_that_waited_max_wait() -> None:
    hk = Housekeeper(quiet=10, max_wait=0.3)
    done = threading.Event()
    hk.defer("a", done.set, "clean-up")
    t0 = time.monotonic()
    while not done.is_set() and time.monotonic() - t0 < 5:
        hk.request_started()
        time.sleep(0.02)
    assert done.is_set() and time.monotonic() - t0 >= 0.25


def test_more_than_max_pending_tasks_run_without_waiting() -> None:
    hk = Housekeeper(quiet=60, max_wait=60, max_pending=2)
    hk.request_started()
    ran: list[str] = []
    for k in "abc":
        hk.defer(k, lambda k=k: ran.append(k), "clean-up")
    assert until(lambda: ran == ["a"])  # one over the limit: the oldest runs
    time.sleep(0.2)
    assert ran == ["a"] and hk.pending() == 2


def test_expedite_runs_a_keys_task_in_the_caller_and_leaves_the_others() -> None:
    hk = Housekeeper(quiet=60, max_wait=60)
    hk.request_started()
    where: dict[str, str] = {}
    hk.defer("a", lambda: where.setdefault("a", threading.current_thread().name), "clean-up")
    hk.defer("b", lambda: where.setdefault("b", threading.current_thread().name), "clean-up")
    hk.expedite("a")
    assert where == {"a": threading.current_thread().name}
    assert hk.pending("a") == 0 and hk.pending("b") == 1
    hk.expedite()
    assert set(where) == {"a", "b"} and hk.pending() == 0


def test_expedite_waits_for_a_task_the_worker_is_running() -> None:
    hk = Housekeeper(quiet=0, max_wait=60)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(5)
        finished.set()

    hk.defer("a", slow, "clean-up")
    assert started.wait(5)
    threading.Timer(0.3, release.set).start()
    t0 = time.monotonic()
    hk.expedite("a")
    assert finished.is_set() and time.monotonic() - t0 >= 0.25


def test_a_key_has_one_waiting_task_and_a_failure_does_not_stop_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    hk = Housekeeper(quiet=60, max_wait=60)
    hk.request_started()
    ran: list[str] = []

    def boom() -> None:
        raise OSError("umount: busy")

    hk.defer("a", boom, "clean-up")
    hk.defer("a", lambda: ran.append("second a"), "clean-up")  # the waiting one does it all
    hk.defer("b", lambda: ran.append("b"), "removal")
    assert hk.pending() == 2
    hk.expedite()
    assert ran == ["b"]
    assert "clean-up of a failed" in caplog.text and "umount: busy" in caplog.text


def test_the_clock_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    hk = Housekeeper(quiet=0.5, max_wait=10, clock=clock)
    hk.request_started()
    hk.defer("a", lambda: None, "clean-up")
    with hk._cond:
        assert hk._due(clock()) == pytest.approx(0.5)
        clock.t += 0.2
        assert hk._due(clock()) == pytest.approx(0.3)
        clock.t += 0.3
        assert hk._due(clock()) == 0
    hk.expedite()


def test_is_quiet_follows_the_last_request() -> None:
    clock = Clock()
    hk = Housekeeper(quiet=0.5, clock=clock)
    assert not hk.is_quiet()  # a new engine counts as just asked
    clock.t += 0.5
    assert hk.is_quiet()
    hk.request_started()
    assert not hk.is_quiet()
    clock.t += 0.49
    assert not hk.is_quiet()
    clock.t += 0.01
    assert hk.is_quiet()
