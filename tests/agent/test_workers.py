"""The engine's thread pool (agent/workers.py): jobs run on waiting threads when there are
some, on new ones otherwise, and a failing job costs neither its thread nor the next job."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from agent.workers import Workers


def _wait_idle(pool: Workers, n: int) -> None:
    deadline = time.monotonic() + 5
    while pool.idle() < n:
        assert time.monotonic() < deadline, f"{n} threads never went back to waiting"
        time.sleep(0.005)


def test_jobs_one_after_another_share_a_thread() -> None:
    pool = Workers(idle_seconds=5)
    seen: list[int] = []
    for _ in range(5):
        job = pool.spawn(lambda: seen.append(threading.get_ident()), name="one")
        assert job.join(5)
        _wait_idle(pool, 1)
    assert len(seen) == 5 and len(set(seen)) == 1


def test_a_job_that_blocks_does_not_hold_up_the_next() -> None:
    pool = Workers(idle_seconds=5)
    release = threading.Event()
    blocked = pool.spawn(release.wait, 10, name="waits")
    quick = pool.spawn(lambda: None, name="quick")
    assert quick.join(5), "the second job waited for the first"
    assert not blocked.join(0)  # still waiting
    release.set()
    assert blocked.join(5)


def test_a_failing_job_is_logged_and_its_thread_serves_the_next(caplog: pytest.LogCaptureFixture) -> None:
    pool = Workers(idle_seconds=5)
    seen: list[int] = []

    def boom() -> None:
        seen.append(threading.get_ident())
        raise ValueError("broken job")

    with caplog.at_level(logging.ERROR, logger="agent.workers"):
        assert pool.spawn(boom, name="reap-abc").join(5)
    assert any("reap-abc failed" in r.getMessage() and r.exc_info for r in caplog.records)
    _wait_idle(pool, 1)
    assert pool.spawn(lambda: seen.append(threading.get_ident())).join(5)
    assert seen[0] == seen[1]


def test_a_thread_carries_its_job_name_and_waiting_threads_retire() -> None:
    pool = Workers(idle_seconds=0.2)
    names: list[str] = []
    before = threading.active_count()
    jobs = [pool.spawn(lambda: (names.append(threading.current_thread().name), time.sleep(0.2)), name=f"job-{i}")
            for i in range(3)]
    assert all(j.join(5) for j in jobs)
    assert sorted(names) == ["job-0", "job-1", "job-2"]
    deadline = time.monotonic() + 5
    while threading.active_count() > before or pool.idle():
        assert time.monotonic() < deadline, "waiting threads did not retire"
        time.sleep(0.02)
