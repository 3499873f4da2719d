"""Host folders in the guest over the agent channel: ``sshfs -o slave`` in the guest, our SFTP
server on the host, one SSH exec channel between them.

Works on every host OS (it needs nothing but the agent channel) and without root. The SFTP
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
import shlex
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

from vmkit.filewatch import GuestWrites
from vmkit.spec import Share

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
            marked = [self.host_path(p) for p in paths]
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


def mount_command(share: Share, index: int) -> str:
    """The guest side: sshfs speaking SFTP on this channel's stdin/stdout, mounted at the
    share's guest path (a stale mount of an earlier connection is cleared first)."""
    g = shlex.quote(share.guest_path)
    pidfile = f"/run/pydesk/share-{index}.pid"
    opts = ",".join(SSHFS_OPTIONS + (("ro",) if share.read_only else ()))
    return (f"modprobe fuse 2>/dev/null; [ -s {pidfile} ] && kill $(cat {pidfile}) 2>/dev/null; "
            f"umount -l {g} 2>/dev/null; mkdir -p {g} && echo $$ > {pidfile} && "
            f"exec sshfs -f -o {opts} pydesk:/ {g}")


class ShareServer:
    """One share served over the agent connection; remounted after every reconnect.

    A context manager owned by the VM: leaving it closes the channel, which makes sshfs in
    the guest unmount and exit; there is no host process and no socket to leave behind."""

    def __init__(self, share: Share, index: int, writes: GuestWrites | None = None) -> None:
        self.share = share
        self.index = index
        self.writes = writes
        self._chan: paramiko.Channel | None = None
        self._closed = False
        self.sessions = 0

    def __enter__(self) -> ShareServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self, transport: paramiko.Transport) -> None:
        """Start serving on ``transport`` (called after each agent (re)connect)."""
        if self._closed:
            return
        chan = transport.open_session(timeout=15)
        chan.exec_command(mount_command(self.share, self.index))
        old, self._chan = self._chan, chan
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        threading.Thread(target=self._drain_stderr, args=(chan,), name=f"share-{self.index}-err", daemon=True).start()
        threading.Thread(target=self._serve, args=(transport, chan), name=f"share-{self.index}", daemon=True).start()

    def _serve(self, transport: paramiko.Transport, chan: paramiko.Channel) -> None:
        self.sessions += 1
        server = _Server(chan, "sftp", None, ConfinedSFTP, self.share.host_path, self.share.read_only,
                         self.writes)
        try:
            server.start_subsystem("sftp", transport, chan)
        except Exception as exc:  # the connection went away under us: the next attach serves again
            log.info("share %s: session ended: %s", self.share.host_path, exc)
        finally:
            with contextlib.suppress(Exception):
                server.finish_subsystem()

    def _drain_stderr(self, chan: paramiko.Channel) -> None:
        buf = b""
        with contextlib.suppress(Exception):
            while data := chan.recv_stderr(4096):
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    log.warning("share %s: sshfs: %s", self.share.guest_path, line.decode(errors="replace"))

    def close(self) -> None:
        self._closed = True
        chan, self._chan = self._chan, None
        if chan is not None:
            with contextlib.suppress(Exception):
                chan.close()


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
