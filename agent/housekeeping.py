"""Clean-up that can wait for a quiet moment.

What an exited or removed container leaves behind (its network namespace, crun's state, its
cgroup, the rootfs mount, its directory) takes tens of milliseconds of guest CPU, and of the
engine's interpreter lock, under TCG. Nobody is waiting for it: by then the API has answered
(`wait` has the exit code, `rm` has taken the container out of every list). Done at once, it
competes with the requests that follow: in a loop of `docker run --rm`, each run paid ~40 ms
for the clean-up of the run before it.

The Housekeeper runs such tasks, one at a time, on its own thread:

- once no API request has started for ``quiet`` seconds;
- or once the oldest task has waited ``max_wait`` seconds, or more than ``max_pending`` wait
  (so a busy engine still catches up, and what the tasks hold stays bounded);
- or at once, in the caller's thread, when something needs one done (``expedite``): starting
  the container again, copying from it, removing its image or a network.

Tasks are keyed (a container's id); a key has at most one task waiting, which does whatever
is left to do when it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

QUIET = 0.5
MAX_WAIT = 10.0
MAX_PENDING = 16


@dataclass(eq=False)
class _Task:
    key: str
    fn: Callable[[], None]
    what: str
    queued: float
    done: threading.Event = field(default_factory=threading.Event)


class Housekeeper:
    def __init__(self, quiet: float = QUIET, max_wait: float = MAX_WAIT, max_pending: int = MAX_PENDING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self.max_pending = max_pending
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[_Task] = []
        self._running: dict[str, list[_Task]] = {}
        self._last_request = clock()
        self._worker: threading.Thread | None = None

    def request_started(self) -> None:
        """An API request came in: the engine is not quiet (one float store, no lock)."""
        self._last_request = self._clock()

    def defer(self, key: str, fn: Callable[[], None], what: str) -> None:
        """Run ``fn`` later, unless a task for ``key`` is already waiting (that one runs instead)."""
        with self._cond:
            if any(t.key == key for t in self._waiting):
                return
            self._waiting.append(_Task(key, fn, what, self._clock()))
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="housekeeping", daemon=True)
                self._worker.start()
            self._cond.notify_all()

    def is_quiet(self) -> bool:
        """No API request has started for ``quiet`` seconds."""
        return self._clock() - self._last_request >= self.quiet

    def pending(self, key: str | None = None) -> int:
        with self._cond:
            return sum(1 for t in self._waiting if key is None or t.key == key)

    def expedite(self, key: str | None = None) -> None:
        """Finish the tasks for ``key`` (every task if None) before returning: those waiting run
        here, in order; one the worker is running is waited for."""
        with self._cond:
            mine = [t for t in self._waiting if key is None or t.key == key]
            self._waiting = [t for t in self._waiting if t not in mine]
            running = [t for k, ts in self._running.items() if key is None or k == key for t in ts]
            for t in mine:
                self._running.setdefault(t.key, []).append(t)
        for t in running:
            t.done.wait()
        for t in mine:
            self._run(t)

    def _due(self, now: float) -> float:
        """How long the worker may still wait before the oldest task runs (0: run it now)."""
        if len(self._waiting) > self.max_pending:
            return 0.0
        return max(0.0, min(self._waiting[0].queued + self.max_wait, self._last_request + self.quiet) - now)

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._waiting:
                        self._cond.wait()
                        continue
                    wait = self._due(self._clock())
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                task = self._waiting.pop(0)
                self._running.setdefault(task.key, []).append(task)
            self._run(task)

    def _run(self, task: _Task) -> None:
        try:
            task.fn()
        except Exception:  # a clean-up that fails must not stop the others
            log.exception("%s of %s failed", task.what, task.key[:12])
        finally:
            with self._cond:
                ts = self._running.get(task.key, [])
                if task in ts:
                    ts.remove(task)
                if not ts:
                    self._running.pop(task.key, None)
            task.done.set()
