"""Long-lived threads for the engine's jobs: API connections, and a container's output
reader and exit waiter. The host daemon's engine link uses a pool of its own for each
client connection's two threads (vmkit/engine_link.py).

A thread start costs ~6 ms of guest CPU under TCG; a `docker run` wanted three of them (its
connection's handler, the reader of the container's output, the waiter on crun's exit), and
each exec more. On the host a start is cheap, but it waits until the new thread runs, which
takes milliseconds while QEMU's vCPU threads hold the cores. Here a thread whose job has
ended waits ``idle_seconds`` for the next one instead of exiting, and a new thread starts
only when none is waiting; ``spawn`` hands a job over without waiting for it to begin.
Threads are daemons: a job may wait on a container for days, and must not hold up the
engine's exit.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IDLE_SECONDS = 30.0


class Job:
    """A function handed to a worker thread; ``join`` waits for its end, as ``Thread.join``."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        self.fn, self.args, self.name = fn, args, name
        self._done = threading.Event()

    def run(self) -> None:
        try:
            self.fn(*self.args)
        except Exception:  # as an uncaught exception in a thread: logged, and the worker goes on
            log.exception("%s failed", self.name)
        finally:
            self._done.set()

    def join(self, timeout: float | None = None) -> bool:
        """Whether the job has ended (within ``timeout`` seconds)."""
        return self._done.wait(timeout)


class Workers:
    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._idle = 0  # waiting threads no job has been handed to yet
        self._handoff: queue.SimpleQueue[Job] = queue.SimpleQueue()

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "job") -> Job:
        """Run ``fn(*args)`` on a waiting thread, or on a new one if none is waiting."""
        job = Job(fn, args, name)
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._handoff.put(job)
                return job
        threading.Thread(target=self._work, args=(job,), name=name, daemon=True).start()
        return job

    def idle(self) -> int:
        """Threads waiting for a job."""
        with self._lock:
            return self._idle

    def _work(self, job: Job) -> None:
        me = threading.current_thread()
        while True:
            me.name = job.name
            job.run()
            me.name = "idle worker"
            with self._lock:
                self._idle += 1
            try:
                job = self._handoff.get(timeout=self.idle_seconds)
                continue
            except queue.Empty:
                pass
            with self._lock:
                if self._idle:  # still counted as waiting: nobody is handing us a job
                    self._idle -= 1
                    return
            job = self._handoff.get()  # one was handed over as we timed out


#: The engine's threads.
WORKERS = Workers()


def spawn(fn: Callable[..., Any], *args: Any, name: str = "job") -> Job:
    return WORKERS.spawn(fn, *args, name=name)
