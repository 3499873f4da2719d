"""Host file changes replayed in the guest as inotify events (the guest half of vmkit/filewatch.py).

The host daemon connects to ``SOCKET``. This side tells it which guest folders to watch: the
bind-mount sources of running containers that lie in a share (``{"op": "watch",
"paths": [...]}``, sent after each connect and whenever a container starts or stops). The
host answers with ``{"op": "changed", "paths": [[guest_path, mode], ...]}``, and each path is
chmod-ed to ``mode``, the mode it already has on the host: a real setattr through sshfs or
virtiofs, so the guest kernel raises ``IN_ATTRIB`` for the file's watchers and its folder's.
Nothing changes on the host (vmkit/filewatch.py has how echoes are dropped).

A read-only share is bound read-only where containers see it; the chmod goes to its
read-write mount, which only the agent sees (agent/shareport.py).

A path from the host is walked one component at a time from its share's root without
following symlinks (``O_PATH|O_NOFOLLOW``), so a link a container planted in a share cannot
turn the replay into a chmod of a guest file outside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterable
from typing import Any

from agent.shareport import rw_path
from agent.volumes import guest_shares

log = logging.getLogger(__name__)

SOCKET = "/run/pydesk/changes.sock"
MAX_LINE = 16 * 1024 * 1024


def watched_paths(binds: Iterable[str], shares: list[tuple[str, bool]]) -> list[str]:
    """The bind sources inside a share, without those inside another one."""
    roots = [root for root, _ro in shares]
    inside = sorted({os.path.normpath(b) for b in binds if _share_of(os.path.normpath(b), roots)})
    out: list[str] = []
    for p in inside:
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _share_of(path: str, roots: list[str]) -> str | None:
    return next((r for r in roots if path == r or path.startswith(r.rstrip("/") + "/")), None)


def replay(guest_path: str, mode: int, shares: list[tuple[str, bool]]) -> bool:
    """chmod ``guest_path`` (inside one of ``shares``) to ``mode`` without following a
    symlink anywhere below the share's root; False when there is nothing to touch. A
    read-only share is touched through its read-write mount (agent/shareport.py)."""
    path = os.path.normpath(guest_path)
    root = _share_of(path, [r for r, _ro in shares])
    if root is None:
        log.warning("ignoring a host change outside the shares: %s", guest_path)
        return False
    parts = [p for p in os.path.relpath(path, root).split("/") if p not in ("", ".")]
    if ".." in parts:
        return False
    if dict(shares)[root]:
        root = rw_path(root)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for part in parts:
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                return False
        # the O_PATH descriptor's /proc link names this very inode, whatever the path is now
        os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
        return True
    except OSError as exc:  # gone again, or not a folder on the way: nothing to tell
        log.debug("replaying a host change of %s: %s", guest_path, exc)
        return False
    finally:
        os.close(fd)


class HostChanges:
    """The socket the host daemon's change forwarder talks to."""

    def __init__(self, binds: Callable[[], list[str]],
                 shares: Callable[[], list[tuple[str, bool]]] = guest_shares) -> None:
        self.binds = binds
        self.shares = shares
        self.lock = threading.Lock()
        self.conn: socket.socket | None = None
        self.sent: list[str] | None = None
        self.replayed = 0

    def serve(self, path: str = SOCKET) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        os.chmod(path, 0o600)
        srv.listen(4)
        threading.Thread(target=self._accept, args=(srv,), name="changes-accept", daemon=True).start()

    def follow(self, events: Any) -> None:
        """Keep the watch set current from the engine's event stream (agent/events.py)."""
        _past, q = events.subscribe()

        def loop() -> None:
            while True:
                ev = q.get()
                if ev.get("Type") == "container" and ev.get("Action") in ("start", "die", "destroy"):
                    self.update()

        threading.Thread(target=loop, name="changes-follow", daemon=True).start()

    def update(self) -> None:
        """Send the watch set again if it changed (a container started or stopped)."""
        with self.lock:
            conn = self.conn
            if conn is None:
                return
            paths = watched_paths(self.binds(), self.shares())
            if paths == self.sent:
                return
            try:
                conn.sendall(json.dumps({"op": "watch", "paths": paths}).encode() + b"\n")
                self.sent = paths
            except OSError as exc:
                log.info("host change link: %s", exc)

    def _accept(self, srv: socket.socket) -> None:
        while True:
            conn, _ = srv.accept()
            with self.lock:  # a new daemon connection replaces the old one
                old, self.conn, self.sent = self.conn, conn, None
            if old is not None:
                with contextlib.suppress(OSError):
                    old.shutdown(socket.SHUT_RDWR)
            self.update()
            threading.Thread(target=self._session, args=(conn,), name="changes", daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while data := conn.recv(65536):
                buf += data
                if len(buf) > MAX_LINE and b"\n" not in buf:
                    raise ValueError("message too long")
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._handle(line)
        except (OSError, ValueError) as exc:
            log.info("host change link ended: %s", exc)
        finally:
            with self.lock:
                if self.conn is conn:
                    self.conn = None
            conn.close()

    def _handle(self, line: bytes) -> None:
        try:
            msg: Any = json.loads(line)
            if not isinstance(msg, dict) or msg.get("op") != "changed":
                return
            items = [(str(p), int(m)) for p, m in msg.get("paths") or []]
        except (ValueError, TypeError):
            log.warning("bad message from the host: %r", line[:200])
            return
        shares = self.shares()
        for path, mode in items:
            if replay(path, mode, shares):
                self.replayed += 1
