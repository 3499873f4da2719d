"""The host half of change notification (vmkit/filewatch.py): real watchdog watches on a tmp
folder, the guest's side of the stream played by a socket pair."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmkit.filewatch import ChangeForwarder, GuestWrites
from vmkit.spec import HostOS, Share


class Guest:
    """The engine's end of /run/pydesk/changes.sock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(0.2)
        self.buf = b""

    def watch(self, *paths: Path | str) -> None:
        self.sock.sendall(json.dumps({"op": "watch", "paths": [str(p) for p in paths]}).encode() + b"\n")

    def changes(self, quiet: float = 0.6, timeout: float = 10.0) -> dict[str, int]:
        """Every path the host sends until it has been quiet for ``quiet`` seconds."""
        got: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            assert data, "the host closed the stream"
            self.buf += data
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(line)
                assert msg["op"] == "changed"
                got.update({p: m for p, m in msg["paths"]})
                last = time.monotonic()
        return got

    def wait_for(self, path: Path, timeout: float = 10.0) -> dict[str, int]:
        got: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while str(path) not in got and time.monotonic() < deadline:
            got.update(self.changes(quiet=0.3, timeout=1.0))
        return got


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    (share / "app" / "pkg").mkdir(parents=True)
    (share / "app" / "main.py").write_text("print(1)\n")
    (share / "other").mkdir()
    return share


def _forwarder(shares: tuple[Share, ...], writes: GuestWrites | None = None) -> Iterator[tuple[ChangeForwarder, Guest]]:
    host_end, guest_end = socket.socketpair()
    handed = []

    def open_stream(path: str) -> socket.socket:
        assert path == "/run/pydesk/changes.sock"
        if handed:
            raise ConnectionRefusedError("only one stream in this test")
        handed.append(path)
        return host_end

    fwd = ChangeForwarder(shares, HostOS.LINUX, open_stream, writes)
    fwd.start()
    try:
        assert fwd.connected.wait(5)
        yield fwd, Guest(guest_end)
    finally:
        fwd.close()
        guest_end.close()
    assert not fwd.observer.is_alive()


def _watching(fwd: ChangeForwarder, *folders: Path) -> None:
    want = {str(f) for f in folders}
    deadline = time.monotonic() + 5
    while set(fwd.watches) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(fwd.watches) == want


def test_host_edits_in_a_watched_folder_reach_the_guest(tree: Path) -> None:
    for fwd, guest in _forwarder((Share(str(tree), str(tree)),)):
        guest.watch(tree / "app")
        _watching(fwd, tree / "app")
        (tree / "app" / "main.py").write_text("print(2)\n")
        (tree / "app" / "pkg" / "new.py").write_text("x = 1\n")
        os.chmod(tree / "app" / "pkg" / "new.py", 0o600)
        got = guest.changes()
        assert got[str(tree / "app" / "main.py")] == os.stat(tree / "app" / "main.py").st_mode & 0o7777
        assert got[str(tree / "app" / "pkg" / "new.py")] == 0o600  # the mode it has: the guest's chmod changes nothing
        # a deletion is told as a change of the folder it was in
        (tree / "app" / "pkg" / "new.py").unlink()
        got = guest.changes()
        assert got == {str(tree / "app" / "pkg"): os.stat(tree / "app" / "pkg").st_mode & 0o7777}
        # an editor's save by rename: the new name, and the folder the temporary left
        tmp = tree / "app" / ".main.py.swp"
        tmp.write_text("print(3)\n")
        tmp.rename(tree / "app" / "main.py")
        got = guest.changes()
        assert str(tree / "app" / "main.py") in got and str(tree / "app") in got
        # nothing from folders the guest did not ask for
        (tree / "other" / "x").write_text("x")
        assert guest.changes() == {}


def test_replayed_chmods_and_the_guests_own_writes_are_not_echoed(tree: Path) -> None:
    writes = GuestWrites(window=1.0)
    main = tree / "app" / "main.py"
    for fwd, guest in _forwarder((Share(str(tree), str(tree)),), writes):
        guest.watch(tree / "app")
        _watching(fwd, tree / "app")
        main.write_text("print(2)\n")
        assert str(main) in guest.changes()
        os.chmod(main, main.stat().st_mode & 0o7777)  # what virtiofsd does with the replay: ctime only
        assert guest.changes(quiet=1.0) == {}
        writes.mark(str(main))  # the sftp server saw the guest write it
        main.write_text("print(3)\n")
        assert guest.changes(quiet=1.0) == {}
        time.sleep(writes.window)
        main.write_text("print(4)\n")  # the host's own edit after that is sent again
        assert str(main) in guest.changes()


def test_watch_set_follows_the_guest(tree: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    shares = (Share(str(tree), "/work"), Share(str(ro), "/ro", read_only=True))
    for fwd, guest in _forwarder(shares):
        guest.watch("/work/app", "/ro", "/etc", "/work/app/main.py")
        _watching(fwd, tree / "app", ro)  # the file's folder is watched already; /etc is no share
        (ro / "f").write_text("x")  # the host may change a read-only share; the guest hears of it
        (tree / "app" / "main.py").write_text("print(2)\n")
        assert guest.changes() == {"/work/app/main.py": os.stat(tree / "app" / "main.py").st_mode & 0o7777,
                                   "/ro/f": os.stat(ro / "f").st_mode & 0o7777}
        guest.watch("/work/other")  # the container with /work/app stopped, another started
        _watching(fwd, tree / "other")
        (tree / "app" / "main.py").write_text("print(3)\n")
        (tree / "other" / "o").write_text("o")
        assert guest.changes() == {"/work/other/o": os.stat(tree / "other" / "o").st_mode & 0o7777}
        guest.watch()
        _watching(fwd)


def test_a_bind_mounted_file_is_watched_alone(tree: Path) -> None:
    for fwd, guest in _forwarder((Share(str(tree), str(tree)),)):
        guest.watch(tree / "app" / "main.py")
        _watching(fwd, tree / "app")
        (tree / "app" / "pkg" / "other.py").write_text("x")  # below the folder, not watched
        (tree / "app" / "sibling.py").write_text("x")  # beside the file, not asked for
        (tree / "app" / "main.py").write_text("print(2)\n")
        assert set(guest.changes()) == {str(tree / "app" / "main.py")}


def test_a_burst_is_told_as_the_folders_it_happened_in(tree: Path) -> None:
    """A checkout or an unpacked archive: one replay per folder, not one per file."""
    fwd = ChangeForwarder((Share(str(tree), "/w"),), HostOS.LINUX, lambda path: None)
    fwd.wanted = {str(tree / "app")}
    pending = {}
    for d in range(3):
        (tree / "app" / f"d{d}").mkdir()
        for f in range(100):
            (tree / "app" / f"d{d}" / f"f{f}.py").write_text("x")
            pending[str(tree / "app" / f"d{d}" / f"f{f}.py")] = False
    pending[str(tree / "app" / "main.py")] = False
    got = {t.guest_path: t.mode for t in fwd.touches(pending)}
    assert got == {"/w/app/d0": 0o755 & ~_umask(), "/w/app/d1": 0o755 & ~_umask(), "/w/app/d2": 0o755 & ~_umask(),
                   "/w/app": os.stat(tree / "app").st_mode & 0o7777}
    small = {str(tree / "app" / "d0" / "f1.py"): False}
    os.utime(tree / "app" / "d0" / "f1.py", (1, 1))  # a new state: sent again, as itself
    assert [t.guest_path for t in fwd.touches(small)] == ["/w/app/d0/f1.py"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
