"""File-change notification for shared folders: host edits become inotify events in the VM.

Neither sshfs nor virtiofs tells the guest kernel about changes made on the host, so a
hot-reload tool in a container (nodemon, webpack, uvicorn --reload, watchfiles) sees no
inotify event when the user saves a file in the host's editor. This is the host half of the
remedy (agent/hostchanges.py is the guest half):

1. The engine tells the daemon which guest folders running containers bind-mount from a
   share (``{"op": "watch", "paths": [...]}`` on ``/run/pydesk/changes.sock``,
   sent again whenever a container starts or stops).
2. The daemon watches the host folders behind them with watchdog (inotify on Linux,
   FSEvents on macOS, ReadDirectoryChangesW on Windows), batches what it sees for
   ``SETTLE`` seconds and sends ``{"op": "changed", "paths": [[guest_path, mode], ...]}``:
   the changed path itself, or for a deletion the folder it was deleted from.
3. The engine sets each path's mode to the mode it already has. That is a real ``chmod``
   through the share's file system in the guest, so the guest kernel raises ``IN_ATTRIB``
   for the file and for its folder's watchers, and nothing changes on the host.

Echoes: the replayed chmod reaches the host too. The sftp server drops a chmod that changes
nothing (vmkit/sftp_share.py); virtiofsd performs it, which changes only the file's ctime,
and the watcher drops an event whose (mode, mtime, size) it has already forwarded. A change
the guest itself made through an sftp share is recorded by the sftp server
(``GuestWrites``) and not sent back; through virtiofs it is, as one extra ``IN_ATTRIB``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from watchdog.events import (DirAttribEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileAttribEvent,
                             FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent,
                             FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer

from vmkit import shares as sharing
from vmkit.errors import ConfigError
from vmkit.guest_link import GuestLink
from vmkit.spec import HostOS, Share

log = logging.getLogger(__name__)

GUEST_SOCKET = "/run/pydesk/changes.sock"
#: Events are sent once they pause this long (an editor's save is several events), and at
#: the latest MAX_DELAY after the first.
SETTLE = 0.05
MAX_DELAY = 0.5
#: A change the guest made through an sftp share is not sent back for this long.
ECHO_WINDOW = 2.0
#: More touches than this in one batch are merged into their folders.
MAX_TOUCHES = 200
#: Forwarded states remembered for echo suppression (oldest dropped first).
REMEMBERED = 20000
WATCHED_EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
                  FileAttribEvent, DirCreatedEvent, DirDeletedEvent, DirMovedEvent, DirAttribEvent]


class GuestWrites:
    """Host paths the guest changed through an sftp share, and when."""

    def __init__(self, window: float = ECHO_WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()
        self._at: dict[str, float] = {}

    def mark(self, host_path: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._at[host_path] = now
            if len(self._at) > REMEMBERED:
                self._at = {p: t for p, t in self._at.items() if now - t < self.window}

    def recent(self, host_path: str) -> bool:
        with self._lock:
            t = self._at.get(host_path)
        return t is not None and time.monotonic() - t < self.window


@dataclasses.dataclass(frozen=True)
class Touch:
    """A guest path to chmod to ``mode`` (its mode already) so that the guest hears of it."""

    guest_path: str
    mode: int


class _Collector(FileSystemEventHandler):
    def __init__(self, sink: Callable[[str, bool], None]) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if event.event_type in ("deleted", "moved"):
            self.sink(src, True)
        else:
            self.sink(src, False)
        if event.event_type == "moved":
            self.sink(os.fsdecode(event.dest_path), False)


class ChangeForwarder(GuestLink):
    """Watches the host folders the guest asks for and forwards their changes."""

    def __init__(self, shares: tuple[Share, ...], os_: HostOS, open_stream: Callable[[str], Any],
                 guest_writes: GuestWrites | None = None) -> None:
        super().__init__(GUEST_SOCKET, open_stream, "change-forwarder")
        # real paths: watchdog reports paths under the folder it was given, and the sftp
        # server records real paths too
        self.shares = tuple(dataclasses.replace(s, host_path=os.path.realpath(s.host_path)) for s in shares)
        self.os = os_
        self.guest_writes = guest_writes
        self.observer: Any = None
        self.watches: dict[str, Any] = {}        # host path asked for -> watchdog watch
        self.wanted: set[str] = set()            # host paths asked for (files or folders)
        self._lock = threading.Lock()
        self._pending: dict[str, bool] = {}      # host path -> deleted?
        self._wake = threading.Event()
        self._sent: collections.OrderedDict[str, tuple[int, int, int]] = collections.OrderedDict()
        self._flusher: threading.Thread | None = None

    def start(self) -> None:
        self.observer = Observer()
        self.observer.daemon = True
        self.observer.start()
        self._flusher = threading.Thread(target=self._flush_loop, name="change-flusher", daemon=True)
        self._flusher.start()
        super().start()

    def close(self) -> None:
        super().close()
        self._wake.set()
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(5)
        if self._flusher is not None:
            self._flusher.join(5)

    # --- what to watch -------------------------------------------------------------------
    def on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("op") == "watch":
            self.set_watched([str(p) for p in msg.get("paths") or []])
        return None

    def set_watched(self, guest_paths: list[str]) -> None:
        hosts = {h for h in (sharing.to_host(g, self.shares, self.os) for g in guest_paths) if h}
        with self._lock:
            self.wanted = hosts
            targets = {self._watch_target(h) for h in hosts}
            targets.discard(None)
            for path in set(self.watches) - targets:
                self.observer.unschedule(self.watches.pop(path))
                log.info("no longer watching %s", path)
            for path in targets - set(self.watches):
                assert path is not None
                recursive = os.path.isdir(path) and path in hosts
                try:
                    self.watches[path] = self.observer.schedule(_Collector(self._note), path, recursive=recursive,
                                                                event_filter=WATCHED_EVENTS)
                except OSError as exc:  # e.g. inotify's watch limit
                    log.warning("cannot watch %s for changes: %s", path, exc)
                    continue
                log.info("watching %s for changes%s", path, " (and below)" if recursive else "")

    @staticmethod
    def _watch_target(host_path: str) -> str | None:
        """The folder to watch: the path itself, or a bind-mounted file's folder."""
        if os.path.isdir(host_path):
            return host_path
        parent = os.path.dirname(host_path)
        return parent if os.path.isdir(parent) else None

    # --- events --------------------------------------------------------------------------
    def _note(self, host_path: str, deleted: bool) -> None:
        if not self._is_wanted(host_path):
            return
        with self._lock:
            self._pending[host_path] = deleted
        self._wake.set()

    def _is_wanted(self, host_path: str) -> bool:
        with self._lock:
            wanted = self.wanted
        return any(host_path == w or host_path.startswith(w.rstrip(os.sep) + os.sep) for w in wanted)

    def _flush_loop(self) -> None:
        while not self.closed.is_set():
            self._wake.wait()
            if self.closed.is_set():
                return
            started = time.monotonic()
            while True:  # until the events pause for SETTLE (at most MAX_DELAY)
                self._wake.clear()
                time.sleep(SETTLE)
                if not self._wake.is_set() or time.monotonic() - started > MAX_DELAY:
                    break
            self._wake.clear()
            with self._lock:
                pending, self._pending = self._pending, {}
            touches = self.touches(pending)
            if touches:
                self.send({"op": "changed", "paths": [[t.guest_path, t.mode] for t in touches]})

    def touches(self, pending: dict[str, bool]) -> list[Touch]:
        """What the guest should touch for these host events (host path -> deleted?)."""
        targets: dict[str, int] = {}  # host path -> its mode
        for host_path, deleted in pending.items():
            if self.guest_writes is not None and self.guest_writes.recent(host_path):
                continue  # the guest's own change through an sftp share
            st = None if deleted else _lstat(host_path)
            if st is not None and not stat.S_ISLNK(st.st_mode):
                if not self._remember(host_path, st):
                    continue  # an echo of a replayed chmod (virtiofs), or nothing new
                target = host_path
            else:  # gone, or a link (a chmod would follow it): its folder
                self._sent.pop(host_path, None)
                target = os.path.dirname(host_path)
                st = _lstat(target)
                if st is None:
                    continue
                self._remember(target, st)
            targets[target] = stat.S_IMODE(st.st_mode)
        if len(targets) > MAX_TOUCHES:
            targets = self._coalesce(targets)
        out: dict[str, Touch] = {}
        for target, mode in targets.items():
            try:
                guest = sharing.to_guest(target, self.shares, self.os)
            except ConfigError:
                continue  # the folder of a share's root: not in the guest
            out[guest] = Touch(guest, mode)
        return list(out.values())

    def _coalesce(self, targets: dict[str, int]) -> dict[str, int]:
        """A burst (a checkout, an unpacked archive) becomes the folders it happened in, and
        their folders, until it is small: a replay is one round trip to the host each, and a
        watcher that hears of a folder rescans it."""
        with self._lock:
            roots = set(self.wanted)
        while len(targets) > MAX_TOUCHES:
            up: dict[str, int] = {}
            for path in targets:
                parent = path if path in roots or os.path.dirname(path) == path else os.path.dirname(path)
                st = _lstat(parent)
                if st is not None:
                    up[parent] = stat.S_IMODE(st.st_mode)
            if len(up) >= len(targets):
                break  # the roots themselves: nothing left to merge
            targets = up
        return targets

    def _remember(self, host_path: str, st: os.stat_result) -> bool:
        """Record the state forwarded for ``host_path``; False if it was forwarded already."""
        sig = (st.st_mode, st.st_mtime_ns, st.st_size)
        if self._sent.get(host_path) == sig:
            return False
        self._sent[host_path] = sig
        self._sent.move_to_end(host_path)
        while len(self._sent) > REMEMBERED:
            self._sent.popitem(last=False)
        return True


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None
