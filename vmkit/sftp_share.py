"""Host folders in the guest: ``sshfs -o slave`` in the guest, our SFTP server on the host,
and between them a virtio-serial port of the share's own that carries nothing but SFTP (no
sshd and no encryption in the way; agent/shareport.py is the guest side). The agent
connection only asks the guest to mount it.

Works on every host OS (it needs nothing but QEMU's virtio-serial) and without root. The SFTP
server is paramiko's protocol engine with a file-system interface of ours that confines every
request to the share's root:

- a request path is normalised lexically with ``..`` clamped at the root;
- a symlink is never followed on the host: not in the middle of a path (the guest kernel
  resolves symlinks itself, component by component, so a well-behaved sshfs never sends one
  there; we answer ELOOP), not at the end (``open`` uses O_NOFOLLOW, ``stat`` of a link
  reports the link, directory listing refuses a link);
- no hard links can be made (the ``hardlink@openssh.com`` extension is not offered), so no
  host file outside the root can be linked into it;
- ``chown`` is accepted and ignored: files belong to the host user, whoever writes them;
- a read-only share refuses every change on the host side, whatever the guest mounts.

Requests are served one at a time on one thread, so no guest request can race another
guest request between our checks and the operation.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shlex
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

import paramiko
from paramiko.sftp import CMD_VERSION
from paramiko.sftp_attr import SFTPAttributes
from paramiko.sftp_handle import SFTPHandle
from paramiko.sftp_server import SFTPServer
from paramiko.sftp_si import SFTPServerInterface

from vmkit.agent import EXEC_TIMEOUT
from vmkit.agent import exec_command as agent_exec
from vmkit.agent import exit_status as agent_exit_status
from vmkit.argv import share_port_name
from vmkit.filewatch import GuestWrites
from vmkit.spec import Endpoint, Share
from vmkit.transport import connect_endpoint

log = logging.getLogger(__name__)

O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_BINARY = getattr(os, "O_BINARY", 0)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
MAX_LINK_DEPTH = 40

#: sshfs options: allow_other so container processes of any uid reach the files (the host
#: decides what is allowed, as the host user); short cache timeouts so host edits show up
#: within a second.
SSHFS_OPTIONS = ("slave", "allow_other", "no_contain_symlinks", "dir_cache=yes", "dcache_timeout=1", "max_read=131072",
                 "entry_timeout=1", "attr_timeout=1", "negative_timeout=0")


def _status(exc: OSError) -> int:
    return SFTPServer.convert_errno(exc.errno)


class ConfinedSFTP(SFTPServerInterface):
    """The file system behind one share, confined to ``root``."""

    def __init__(self, server: Any, root: str, read_only: bool = False, writes: GuestWrites | None = None) -> None:
        super().__init__(server)
        self.root = os.path.realpath(root)
        self.read_only = read_only
        self.writes = writes

    def _mark(self, *host_paths: str) -> None:
        """Tell the change watcher (vmkit/filewatch.py) that the guest changed these."""
        if self.writes is not None:
            for p in host_paths:
                self.writes.mark(p)

    # --- paths --------------------------------------------------------------------------
    @staticmethod
    def _parts(path: str) -> list[str]:
        out: list[str] = []
        for p in path.replace("\\", "/").split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if out:
                    out.pop()
            else:
                out.append(p)
        return out

    def host_path(self, path: str) -> str:
        """The host path for a request path; every component but the last must be a real
        directory (not a symlink) inside the root."""
        cur = self.root
        parts = self._parts(path)
        for p in parts[:-1]:
            cur = os.path.join(cur, p)
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                raise OSError(errno.ELOOP, "symbolic link in the middle of a shared path", path)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, "not a directory", path)
        return os.path.join(cur, parts[-1]) if parts else cur

    def _follow(self, path: str) -> str:
        """``path`` with a final symlink followed, as long as it stays in the share."""
        parts = self._parts(path)
        for _ in range(MAX_LINK_DEPTH):
            hp = self.host_path("/".join(parts))
            st = os.lstat(hp)
            if not stat.S_ISLNK(st.st_mode):
                return hp
            target = os.readlink(hp)
            if os.path.isabs(target):
                real = os.path.normpath(target)
                if real != self.root and not real.startswith(self.root.rstrip(os.sep) + os.sep):
                    raise OSError(errno.ENOENT, "symbolic link leads out of the share", path)
                parts = self._parts(os.path.relpath(real, self.root))
            else:
                joined = parts[:-1] + target.replace("\\", "/").split("/")
                depth = 0
                for p in joined:  # a relative link climbing above the root is refused, not clamped
                    depth += -1 if p == ".." else (0 if p in ("", ".") else 1)
                    if depth < 0:
                        raise OSError(errno.ENOENT, "symbolic link leads out of the share", path)
                parts = self._parts("/".join(joined))
        raise OSError(errno.ELOOP, "too many levels of symbolic links", path)

    def _writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only share")

    # --- requests -----------------------------------------------------------------------
    def canonicalize(self, path: str) -> str:
        return "/" + "/".join(self._parts(path))

    def stat(self, path: str) -> Any:
        try:
            return SFTPAttributes.from_stat(os.lstat(self._follow(path)))
        except OSError as exc:
            return _status(exc)

    def lstat(self, path: str) -> Any:
        try:
            return SFTPAttributes.from_stat(os.lstat(self.host_path(path)))
        except OSError as exc:
            return _status(exc)

    def list_folder(self, path: str) -> Any:
        try:
            hp = self.host_path(path)
            fd = os.open(hp, os.O_RDONLY | O_NOFOLLOW | getattr(os, "O_DIRECTORY", 0)) if O_NOFOLLOW else None
            try:
                if fd is None and os.path.islink(hp):
                    raise OSError(errno.ENOTDIR, "not a directory", path)
                out = []
                with os.scandir(fd if fd is not None else hp) as it:
                    for entry in it:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        out.append(SFTPAttributes.from_stat(st, entry.name))
                return out
            finally:
                if fd is not None:
                    os.close(fd)
        except OSError as exc:
            return _status(exc)

    def open(self, path: str, flags: int, attr: SFTPAttributes) -> Any:
        try:
            if flags & WRITE_FLAGS:
                self._writable()
            hp = self.host_path(path)
            mode = attr.st_mode & 0o7777 if attr is not None and attr.st_mode is not None else 0o666
            if flags & WRITE_FLAGS:
                self._mark(hp)
            fd = os.open(hp, flags | O_NOFOLLOW | O_BINARY | getattr(os, "O_CLOEXEC", 0), mode)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EISDIR, "not a regular file", path)
        except OSError as exc:
            return _status(exc)
        return FdHandle(fd, flags, (lambda: self._mark(hp)) if flags & WRITE_FLAGS else None)

    def remove(self, path: str) -> int:
        return self._do(lambda: os.unlink(self.host_path(path)), path)

    def rename(self, oldpath: str, newpath: str) -> int:
        def op() -> None:
            new = self.host_path(newpath)
            if os.path.lexists(new):
                raise OSError(errno.EEXIST, "exists", newpath)
            os.rename(self.host_path(oldpath), new)
        return self._do(op, oldpath, newpath)

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return self._do(lambda: os.replace(self.host_path(oldpath), self.host_path(newpath)), oldpath, newpath)

    def mkdir(self, path: str, attr: SFTPAttributes) -> int:
        mode = attr.st_mode & 0o7777 if attr is not None and attr.st_mode is not None else 0o777
        return self._do(lambda: os.mkdir(self.host_path(path), mode), path)

    def rmdir(self, path: str) -> int:
        return self._do(lambda: os.rmdir(self.host_path(path)), path)

    def chattr(self, path: str, attr: SFTPAttributes) -> int:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.lstat(self.host_path(path)).st_mode)
            if attr._flags == attr.FLAG_PERMISSIONS and mode == attr.st_mode & 0o7777:
                # a chmod that changes nothing: how the guest replays a host change as an
                # inotify event (agent/hostchanges.py); not even the host's ctime moves
                return paramiko.SFTP_OK

        def op() -> None:
            hp = self.host_path(path)
            st = os.lstat(hp)
            if stat.S_ISLNK(st.st_mode):
                if attr._flags & attr.FLAG_AMTIME and os.utime in os.supports_follow_symlinks:
                    os.utime(hp, (attr.st_atime, attr.st_mtime), follow_symlinks=False)
                return
            if attr._flags & attr.FLAG_SIZE:
                fd = os.open(hp, os.O_WRONLY | O_NOFOLLOW)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
            if attr._flags & attr.FLAG_PERMISSIONS:
                os.chmod(hp, attr.st_mode & 0o7777)
            if attr._flags & attr.FLAG_AMTIME:
                os.utime(hp, (attr.st_atime, attr.st_mtime))
        return self._do(op, path)

    def readlink(self, path: str) -> Any:
        try:
            return os.readlink(self.host_path(path))
        except OSError as exc:
            return _status(exc)

    def symlink(self, target_path: str, path: str) -> int:
        return self._do(lambda: os.symlink(target_path, self.host_path(path)), path)

    def _do(self, op: Callable[[], None], *paths: str) -> int:
        try:
            self._writable()
            marked = [self.host_path(p) for p in paths] if self.writes is not None else []
            self._mark(*marked)
            op()
            self._mark(*marked)
        except OSError as exc:
            return _status(exc)
        return paramiko.SFTP_OK


class FdHandle(SFTPHandle):
    """An open host file, read and written at offsets."""

    def __init__(self, fd: int, flags: int, on_change: Callable[[], None] | None = None) -> None:
        super().__init__(flags)
        self.fd = fd
        self.on_change = on_change or (lambda: None)
        self.append = bool(flags & os.O_APPEND)
        self._lock = threading.Lock()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.on_change()

    def read(self, offset: int, length: int) -> Any:
        try:
            if hasattr(os, "pread"):
                return os.pread(self.fd, length, offset)
            with self._lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                return os.read(self.fd, length)
        except OSError as exc:
            return _status(exc)

    def write(self, offset: int, data: bytes) -> int:
        self.on_change()
        try:
            if hasattr(os, "pwrite") and not self.append:
                view = memoryview(data)
                while view:
                    n = os.pwrite(self.fd, view, offset)
                    view, offset = view[n:], offset + n
            else:
                with self._lock:
                    os.lseek(self.fd, offset, os.SEEK_SET)
                    os.write(self.fd, data)
        except OSError as exc:
            return _status(exc)
        return paramiko.SFTP_OK

    def stat(self) -> Any:
        try:
            return SFTPAttributes.from_stat(os.fstat(self.fd))
        except OSError as exc:
            return _status(exc)

    def chattr(self, attr: SFTPAttributes) -> int:
        self.on_change()
        try:
            if attr._flags & attr.FLAG_SIZE:
                os.ftruncate(self.fd, attr.st_size)
            if attr._flags & attr.FLAG_PERMISSIONS and os.chmod in os.supports_fd:
                os.chmod(self.fd, attr.st_mode & 0o7777)
            if attr._flags & attr.FLAG_AMTIME and os.utime in os.supports_fd:
                os.utime(self.fd, (attr.st_atime, attr.st_mtime))
        except OSError as exc:
            return _status(exc)
        return paramiko.SFTP_OK


class _Server(SFTPServer):
    """paramiko's SFTP protocol engine, offering the extensions sshfs uses that we serve."""

    def _send_server_version(self) -> int:
        from paramiko.message import Message
        from paramiko.sftp import CMD_INIT, SFTPError

        t, data = self._read_packet()
        if t != CMD_INIT:
            raise SFTPError("Incompatible sftp protocol")
        msg = Message()
        msg.add_int(3)
        msg.add("posix-rename@openssh.com", "1")
        self._send_packet(CMD_VERSION, msg)
        return 3


HANDSHAKE_TIMEOUT = 30.0


def mount_command(share: Share, index: int, nonce: str) -> str:
    """The guest side (agent/shareport.py): handshake on the share's port, then sshfs on it."""
    opts = ",".join(SSHFS_OPTIONS + (("ro",) if share.read_only else ()))
    return (f"modprobe fuse 2>/dev/null; PYTHONPATH=/usr/lib/pydesk exec python3 -m agent.shareport "
            f"{share_port_name(index)} {nonce} {shlex.quote(share.guest_path)} {opts}")


def guest_alive_command(share: Share, index: int) -> str:
    """Exit 0 when this share's sshfs still runs and its mount is in place."""
    g = share.guest_path.replace(" ", "\\040")
    return (f"kill -0 $(cat /run/pydesk/share-{index}.pid 2>/dev/null) 2>/dev/null && "
            f"grep -qF ' {g} fuse.sshfs ' /proc/mounts")


class _PortChannel:
    """The share port's socket, dressed as the paramiko channel SFTPServer expects."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, data: bytes) -> int:
        return self.sock.send(data)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def close(self) -> None:
        self.sock.close()

    def get_transport(self) -> _PortChannel:
        return self

    def get_log_channel(self) -> str:
        return __name__

    def get_hexdump(self) -> bool:
        return False

    def get_name(self) -> str:
        return "share-port"

    def _log(self, level: int, msg: str, *args: Any) -> None:
        log.log(level, msg, *args)


def host_handshake(sock: socket.socket, nonce: str, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    """Skip whatever an earlier session left in the port up to the guest's hello line, then
    answer it (agent/shareport.py is the other side)."""
    want = f"PYDESK-SHARE {nonce}\n".encode()
    buf = b""
    sock.settimeout(timeout)
    try:
        while want not in buf:
            data = sock.recv(65536)
            if not data:
                raise EOFError("the share port closed during the handshake")
            buf = buf[-(len(want) - 1):] + data
        sock.sendall(f"PYDESK-SHARE-READY {nonce}\n".encode())
    finally:
        sock.settimeout(None)


class ShareServer:
    """One share, served over its own virtio-serial port (QEMU's chardev ``endpoint``).

    On every agent (re)connect ``attach`` checks the share: if its sshfs still runs in the
    guest and our session is alive, nothing happens (containers keep their bind mounts);
    otherwise the session starts over: a new connection to the port, the guest's
    agent/shareport.py asked (over the agent connection) to mount it again, a handshake,
    and paramiko's SFTP engine with ConfinedSFTP on the port.

    A context manager owned by the VM: leaving it closes the port connection, which ends
    the session; there is no host process and no socket of ours to leave behind."""

    def __init__(self, share: Share, index: int, endpoint: Endpoint, writes: GuestWrites | None = None) -> None:
        self.share = share
        self.index = index
        self.endpoint = endpoint
        self.writes = writes
        self._sock: socket.socket | None = None
        self._serving: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.sessions = 0

    def __enter__(self) -> ShareServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self, transport: paramiko.Transport) -> None:
        """Check or restart the share after an agent (re)connect, off the caller's thread."""
        if not self._closed:
            threading.Thread(target=self._attach, args=(transport,), name=f"share-{self.index}-attach",
                             daemon=True).start()

    def _attach(self, transport: paramiko.Transport) -> None:
        with self._lock:
            if self._closed:
                return
            if self._serving is not None and self._serving.is_alive() and self._guest_alive(transport):
                log.info("share %s: still mounted, session kept", self.share.guest_path)
                return
            self._end_session()
            try:
                self._start_session(transport)
            except Exception as exc:  # a share must not cost us the agent connection
                log.warning("cannot share %s: %s", self.share.host_path, exc)
                self._end_session()

    def _guest_alive(self, transport: paramiko.Transport) -> bool:
        try:
            chan = transport.open_session(timeout=15)
            try:
                agent_exec(chan, guest_alive_command(self.share, self.index), EXEC_TIMEOUT)
                return agent_exit_status(chan, 30) == 0
            finally:
                chan.close()
        except Exception as exc:
            log.debug("share %s: liveness check failed: %s", self.share.guest_path, exc)
            return False

    def _start_session(self, transport: paramiko.Transport) -> None:
        sock = connect_endpoint(self.endpoint, timeout=10)
        self._sock = sock
        nonce = secrets.token_hex(8)
        chan = transport.open_session(timeout=15)
        agent_exec(chan, mount_command(self.share, self.index, nonce), EXEC_TIMEOUT)
        threading.Thread(target=self._guest_command, args=(chan,), name=f"share-{self.index}-mount",
                         daemon=True).start()
        host_handshake(sock, nonce)
        self._serving = threading.Thread(target=self._serve, args=(sock,), name=f"share-{self.index}", daemon=True)
        self._serving.start()

    def _guest_command(self, chan: paramiko.Channel) -> None:
        """Log what the guest's mount command says, and its failure."""
        err = b""
        with contextlib.suppress(Exception):
            while data := chan.recv_stderr(4096):
                err += data
            status = chan.recv_exit_status()
            if status != 0:
                log.warning("share %s: mounting failed (%d): %s", self.share.guest_path, status,
                            err.decode(errors="replace").strip())
        with contextlib.suppress(Exception):
            chan.close()

    def _serve(self, sock: socket.socket) -> None:
        self.sessions += 1
        chan = _PortChannel(sock)
        server = _Server(chan, "sftp", None, ConfinedSFTP, self.share.host_path, self.share.read_only, self.writes)
        try:
            server.start_subsystem("sftp", None, chan)
        except Exception as exc:  # the port connection went away: the next attach serves again
            log.info("share %s: session ended: %s", self.share.host_path, exc)
        finally:
            with contextlib.suppress(Exception):
                server.finish_subsystem()

    def _end_session(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the serving thread's recv
            sock.close()
        serving, self._serving = self._serving, None
        if serving is not None and serving is not threading.current_thread():
            serving.join(5)

    def close(self) -> None:
        self._closed = True
        self._end_session()


def wait_mounted(exec_: Callable[..., tuple[int, bytes, bytes]], shares: tuple[Share, ...],
                 timeout: float = 60.0) -> list[str]:
    """Wait until every share is a FUSE mount in the guest; the guest paths still missing."""
    deadline = time.monotonic() + timeout
    missing = [s.guest_path for s in shares]
    while missing and time.monotonic() < deadline:
        rc, out, _ = exec_("cat /proc/mounts", timeout=20)
        mounted = {line.split()[1].replace("\\040", " ") for line in out.decode(errors="replace").splitlines()
                   if len(line.split()) > 2 and line.split()[2].startswith(("fuse", "virtiofs"))}
        missing = [g for g in missing if g not in mounted]
        if missing:
            time.sleep(0.2)
    return missing
