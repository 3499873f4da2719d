"""The engine's event stream (`/events`): a bounded history plus live subscribers."""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import Any

HISTORY = 1000


class Events:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY)
        self._subs: list[queue.Queue[dict[str, Any]]] = []

    def emit(self, type_: str, action: str, actor_id: str, attributes: dict[str, str] | None = None) -> None:
        now = time.time_ns()
        ev = {"Type": type_, "Action": action, "Actor": {"ID": actor_id, "Attributes": attributes or {}},
              "scope": "local", "time": now // 1_000_000_000, "timeNano": now}
        if type_ == "container":  # the pre-1.22 fields docker CLI still prints
            ev.update(status=action, id=actor_id, **({"from": attributes["image"]} if attributes and "image" in attributes else {}))
        with self._lock:
            self._history.append(ev)
            for q in self._subs:
                q.put(ev)

    def subscribe(self, since: float | None = None) -> tuple[list[dict[str, Any]], queue.Queue[dict[str, Any]]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            past = [e for e in self._history if since is not None and e["timeNano"] >= since * 1e9]
            self._subs.append(q)
        return past, q

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)
