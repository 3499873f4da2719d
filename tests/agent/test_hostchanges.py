"""The guest half of change notification (agent/hostchanges.py) on this machine's file system:
the replay raises a real IN_ATTRIB that an inotify watcher sees, changes nothing, and follows
no symlink; the socket tells the host what to watch."""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import struct
import time
from pathlib import Path

import pytest

from agent.hostchanges import HostChanges, replay, watched_paths

IN_ATTRIB = 0x4
IN_ISDIR = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        self.wds: dict[int, str] = {}

    def add(self, path: Path) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), 0xFFF)
        assert wd >= 0, os.strerror(ctypes.get_errno())
        self.wds[wd] = str(path)

    def events(self, timeout: float = 1.0) -> list[tuple[str, int, str]]:
        """(watched path, mask, name) of each event within ``timeout``."""
        out = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                break
            data = os.read(self.fd, 65536)
            while data:
                wd, mask, _cookie, n = struct.unpack_from("iIII", data)
                name = data[16:16 + n].rstrip(b"\0").decode()
                out.append((self.wds[wd], mask, name))
                data = data[16 + n:]
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    (root / "app").mkdir(parents=True)
    (root / "app" / "main.py").write_text("print(1)\n")
    os.chmod(root / "app" / "main.py", 0o640)
    return root


def test_a_replay_is_an_inotify_event_and_changes_nothing(share: Path) -> None:
    main = share / "app" / "main.py"
    before = main.stat()
    ino = Inotify()
    try:
        ino.add(share / "app")  # a folder watcher, as hot-reload tools use
        ino.add(main)
        assert replay(str(main), 0o640, [(str(share), False)])
        events = ino.events()
        assert (str(share / "app"), IN_ATTRIB, "main.py") in events
        assert (str(main), IN_ATTRIB, "") in events
        assert replay(str(share / "app"), 0o755, [(str(share), False)])  # a deletion is told as its folder's change
        assert (str(share / "app"), IN_ATTRIB | IN_ISDIR, "") in ino.events()
    finally:
        ino.close()
    after = main.stat()
    assert (after.st_mode, after.st_mtime_ns, after.st_size) == (before.st_mode, before.st_mtime_ns, before.st_size)
    assert main.read_text() == "print(1)\n"


def test_a_replay_follows_no_symlink_and_stays_in_the_share(share: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret"
    secret.write_text("s")
    os.chmod(secret, 0o600)
    os.symlink(outside, share / "app" / "link")  # as a container could plant it
    os.symlink(secret, share / "app" / "flink")
    roots = [(str(share), False)]
    assert not replay(str(share / "app" / "link" / "secret"), 0o777, roots)
    assert not replay(str(share / "app" / "flink"), 0o777, roots)
    assert not replay(str(share / "app" / ".." / ".." / "outside" / "secret"), 0o777, roots)
    assert not replay(str(secret), 0o777, roots)
    assert not replay(str(share / "app" / "gone.py"), 0o644, roots)  # deleted again meanwhile
    assert secret.stat().st_mode & 0o777 == 0o600
    assert os.stat(outside).st_mode & 0o777 != 0o777


def test_only_binds_in_shares_are_watched() -> None:
    shares = [("/home/me", False), ("/data", True)]
    binds = ["/home/me/src", "/home/me/src/sub", "/data/x", "/etc", "/home/meme", "/home/me/b/"]
    assert watched_paths(binds, shares) == ["/data/x", "/home/me/b", "/home/me/src"]


def test_a_read_only_share_is_touched_through_its_read_write_mount(share: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Containers see a read-only bind (a chmod there is EROFS); agent/shareport.py mounts the
    same sshfs read-write under RW_ROOT, where only the agent looks."""
    import agent.shareport

    rw_root = tmp_path / "rw"
    monkeypatch.setattr(agent.shareport, "RW_ROOT", str(rw_root))
    visible = "/data/ro-share"
    backing = Path(agent.shareport.rw_path(visible))
    assert backing == rw_root / "data" / "ro-share"
    backing.parent.mkdir(parents=True)
    os.symlink(share, backing)  # stands in for the read-write mount of the same files
    ino = Inotify()
    try:
        ino.add(share / "app")
        assert replay(f"{visible}/app/main.py", 0o640, [(visible, True)])
        assert (str(share / "app"), IN_ATTRIB, "main.py") in ino.events()
    finally:
        ino.close()


def test_the_socket_tells_the_host_what_to_watch_and_replays_its_answer(share: Path, tmp_path: Path) -> None:
    binds: list[str] = []
    changes = HostChanges(lambda: list(binds), lambda: [(str(share), False)])
    path = str(tmp_path / "changes.sock")
    changes.serve(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    host = socket.socket(socket.AF_UNIX)
    host.connect(path)
    host.settimeout(5)
    reader = host.makefile("rb")
    assert json.loads(reader.readline()) == {"op": "watch", "paths": []}
    binds.append(str(share / "app"))
    changes.update()
    assert json.loads(reader.readline()) == {"op": "watch", "paths": [str(share / "app")]}
    changes.update()  # unchanged: not sent again
    outside = tmp_path / "outside.txt"
    outside.write_text("o")
    os.chmod(outside, 0o600)
    ino = Inotify()
    try:
        ino.add(share / "app")
        host.sendall(b"not json\n" + json.dumps({"op": "changed", "paths": [[str(share / "app" / "main.py"), 0o640],
                                                                        [str(outside), 0o777]]}).encode() + b"\n")
        assert (str(share / "app"), IN_ATTRIB, "main.py") in ino.events(timeout=3)
    finally:
        ino.close()
    assert changes.replayed == 1
    assert outside.stat().st_mode & 0o777 == 0o600
    binds.clear()
    changes.update()
    assert json.loads(reader.readline()) == {"op": "watch", "paths": []}
    host.close()
