"""The share's SFTP server (vmkit/sftp_share.py) against paramiko's SFTP client over a real SSH
connection on a socket pair: every request stays inside the share's root."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from tests.support.ssh_pair import ssh_pair
from vmkit.filewatch import GuestWrites
from vmkit.sftp_share import ConfinedSFTP, _Server


def _client(root: Path, read_only: bool = False, writes: GuestWrites | None = None) -> Iterator[paramiko.SFTPClient]:
    def configure(server: paramiko.Transport) -> None:
        server.set_subsystem_handler("sftp", _Server, ConfinedSFTP, str(root), read_only, writes)

    with ssh_pair(configure) as (client, _server):
        sftp = paramiko.SFTPClient.from_transport(client)
        assert sftp is not None
        try:
            yield sftp
        finally:
            sftp.close()


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    share, outside = tmp_path / "share", tmp_path / "outside"
    (share / "sub").mkdir(parents=True)
    (share / "sub" / "f.txt").write_text("inside\n")
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    os.symlink(str(outside), share / "out")  # a host symlink pointing out of the share
    os.symlink("../outside/secret", share / "rel")
    os.symlink("sub/f.txt", share / "in")
    return share, outside


@pytest.fixture
def sftp(tree: tuple[Path, Path]) -> Iterator[paramiko.SFTPClient]:
    yield from _client(tree[0])


def test_reads_and_writes_inside(sftp: paramiko.SFTPClient, tree: tuple[Path, Path]) -> None:
    share, _ = tree
    with sftp.open("/sub/f.txt") as f:
        assert f.read() == b"inside\n"
    with sftp.open("/sub/new", "w") as f:
        f.write(b"x" * 100_000)
    assert (share / "sub" / "new").stat().st_size == 100_000
    sftp.posix_rename("/sub/new", "/sub/f.txt")  # over an existing file, as git does
    assert (share / "sub" / "f.txt").stat().st_size == 100_000
    assert sorted(sftp.listdir("/")) == ["in", "out", "rel", "sub"]
    assert sftp.stat("/in").st_size == 100_000  # a link inside the share is followed


def test_nothing_outside_is_reachable(sftp: paramiko.SFTPClient, tree: tuple[Path, Path]) -> None:
    share, outside = tree
    for path in ("/out/secret", "/../outside/secret", "/../../etc/passwd", "/rel"):
        with pytest.raises(OSError):
            with sftp.open(path) as f:
                f.read()
    with pytest.raises(OSError):
        sftp.listdir("/out")
    with pytest.raises(OSError):
        sftp.stat("/out")  # stat follows only links that stay inside
    with pytest.raises(OSError):
        sftp.open("/out/planted", "w")
    # ".." is clamped at the root: this is the share's own sub/f.txt
    with sftp.open("/../../sub/f.txt") as f:
        assert f.read() == b"inside\n"
    assert sftp.lstat("/out").st_mode is not None  # the link itself is visible
    assert sftp.readlink("/out") == str(outside)
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "host secret\n"


def test_writing_through_a_final_symlink_is_refused(sftp: paramiko.SFTPClient, tree: tuple[Path, Path]) -> None:
    share, outside = tree
    os.symlink(str(outside / "secret"), share / "trap")
    with pytest.raises(OSError):
        with sftp.open("/trap", "w") as f:
            f.write(b"pwned")
    assert (outside / "secret").read_text() == "host secret\n"


def test_read_only_share_refuses_changes(tree: tuple[Path, Path]) -> None:
    share, _ = tree
    for sftp in _client(share, read_only=True):
        with sftp.open("/sub/f.txt") as f:
            assert f.read() == b"inside\n"
        for action in (lambda: sftp.open("/sub/f.txt", "w"), lambda: sftp.remove("/sub/f.txt"),
                       lambda: sftp.mkdir("/d"), lambda: sftp.rename("/sub", "/sub2"),
                       lambda: sftp.symlink("/", "/l"), lambda: sftp.chmod("/sub/f.txt", 0o777)):
            with pytest.raises(OSError):
                action()
        sftp.chmod("/sub/f.txt", (share / "sub" / "f.txt").stat().st_mode & 0o7777)  # a replay changes nothing
    assert (share / "sub" / "f.txt").read_text() == "inside\n"
    assert sorted(p.name for p in share.iterdir()) == ["in", "out", "rel", "sub"]


def test_guest_changes_are_recorded_and_a_no_op_chmod_touches_nothing(tree: tuple[Path, Path]) -> None:
    """What the change watcher relies on (vmkit/filewatch.py): the guest's own writes are
    recorded, and the replay's chmod-to-the-same-mode does not even move the host's ctime."""
    share, _ = tree
    writes = GuestWrites()
    f = share / "sub" / "f.txt"
    before = f.stat()
    for sftp in _client(share, writes=writes):
        sftp.chmod("/sub/f.txt", before.st_mode & 0o7777)
        assert f.stat().st_ctime_ns == before.st_ctime_ns
        assert not writes.recent(str(f))
        sftp.chmod("/sub/f.txt", 0o600)  # a real change still happens, and is the guest's
        assert f.stat().st_mode & 0o777 == 0o600 and writes.recent(str(f))
        with sftp.open("/new.txt", "w") as out:
            out.write(b"x")
        sftp.mkdir("/d")
        sftp.rename("/new.txt", "/d/moved.txt")
        sftp.remove("/d/moved.txt")
    for p in ("new.txt", "d", "d/moved.txt"):
        assert writes.recent(str(share / p)), p
    assert not writes.recent(str(share / "in"))


def test_a_share_port_session_skips_stale_bytes_then_speaks_sftp(tree: tuple[Path, Path]) -> None:
    """The share's own virtio-serial port (played by a socket pair): both sides skip what an
    earlier session left in it up to the other's nonce line (agent/shareport.py is the
    guest's side), then SFTP runs on the bare stream."""
    from agent.shareport import handshake
    from vmkit.sftp_share import ShareServer, _PortChannel, host_handshake
    from vmkit.spec import Endpoint, Share

    share, outside = tree
    host, guest = socket.socketpair()
    host.sendall(b"\x00\x00\x00\x05stale reply from the last server")  # waiting for the guest
    guest.sendall(b"\x00\x00\x00\x09 stale request\nPYDESK-SHARE old\n")  # waiting for the host
    done: list[BaseException | None] = []

    def guest_side() -> None:
        try:
            handshake(guest.fileno(), "n0nce", timeout=10)
            done.append(None)
        except BaseException as exc:  # reported below
            done.append(exc)

    t = threading.Thread(target=guest_side)
    t.start()
    host_handshake(host, "n0nce", timeout=10)
    t.join(10)
    assert done == [None]
    srv = ShareServer(Share(str(share), "/s"), 0, Endpoint(path="/unused"))
    serving = threading.Thread(target=srv._serve, args=(host,), daemon=True)
    serving.start()
    sftp = paramiko.SFTPClient(_PortChannel(guest))  # type: ignore[arg-type]
    assert sftp.open("/sub/f.txt").read() == b"inside\n"
    with pytest.raises(OSError):
        sftp.open("/out/secret").read()  # still confined
    sftp.close()
    guest.close()
    serving.join(10)
    assert not serving.is_alive() and srv.sessions == 1


def test_share_port_handshake_gives_up_without_an_answer() -> None:
    from agent.shareport import ShareError, handshake
    from vmkit.sftp_share import host_handshake

    host, guest = socket.socketpair()
    with pytest.raises(ShareError):
        handshake(guest.fileno(), "n0nce", timeout=0.5)
    assert host.recv(100) == b"PYDESK-SHARE n0nce\n"
    guest.close()
    with pytest.raises(EOFError):
        host_handshake(host, "other", timeout=5)
