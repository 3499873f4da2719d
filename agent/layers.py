"""Unpack one OCI/Docker layer tar, safely, into an empty directory (an overlayfs lower dir).

This is hostile-input code. tarfile is used only to *parse* the stream; every file is created
here with fd-relative syscalls: each parent directory is opened one component at a time with
O_NOFOLLOW starting from an fd of ``dest``, so no entry can reach outside ``dest`` through
``..``, an absolute name, or a symlink (including one planted earlier in the same layer).
Those directory fds stay open from entry to entry (most entries share a parent with the one
before); an entry that removes a directory closes the fds of it and of everything under it,
so a symlink or file put in its place is met again by the next lookup. Symlink targets are
stored verbatim and never followed.

OCI whiteouts become overlayfs whiteouts: ``.wh.NAME`` -> a 0:0 character device ``NAME``,
``DIR/.wh..wh..opq`` -> xattr ``trusted.overlay.opaque=y`` on ``DIR``.
"""

from __future__ import annotations

import collections
import contextlib
import decimal
import errno
import logging
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"

DEFAULT_MAX_ENTRIES = 1_000_000
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TAIL = 1 << 16  # bytes of the raw stream kept to check the end-of-archive marker
MAX_HEADER_BYTES = 1 << 20  # PAX / GNU long-name header cap
MAX_NAME_BYTES = 4096  # PATH_MAX: an image built on Linux never has longer names
MAX_DEPTH = 256  # keeps every tree we make removable by (recursive) shutil.rmtree
_MAX_ID = (1 << 32) - 2  # uid/gid; -1 / 2**32-1 would mean "leave unchanged"
_OPEN_DIRS = 128  # directory fds kept open between entries
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
               tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class LayerError(Exception):
    """A layer tar is malformed, hostile or over a limit; the message names the entry."""


@dataclass
class LayerStats:
    entries: int = 0    # tar members processed
    bytes: int = 0      # regular-file bytes written
    whiteouts: int = 0  # .wh.NAME entries turned into overlay whiteouts
    opaque: int = 0     # .wh..wh..opq markers turned into opaque directories
    read_past_end: int = 0  # bytes read from the stream beyond what the tar used (read ahead)


class _ForwardReader:
    """The decompressed stream as tarfile's random-access mode sees a file: ``tell``, ``read``
    and a ``seek`` that only goes forward (skipping). tarfile's own stream mode (``r|``) buffers
    in 10 KiB reads and copies what is left of its buffer after every read, so a layer took
    ~1000 trips through the reader chain per 10 MB (gunzip, two hashes), each costing more than
    the bytes under emulation. Here the source is read in ``chunk``-sized pieces, small reads are
    slices of the current piece, and file data can be taken piece by piece without copying
    (``take``). The last bytes read are kept for the end-of-archive check (``block_at``)."""

    def __init__(self, raw: BinaryIO, chunk: int = _CHUNK) -> None:
        self.raw = raw
        self._read = getattr(raw, "read1", raw.read)  # short reads welcome: no copy to fill them
        self.chunk = chunk
        self.pos = 0        # stream offset of the next byte handed out
        self.fetched = 0    # bytes read from ``raw``
        self._cur = memoryview(b"")  # what is left of the current piece
        self._tail: collections.deque[memoryview] = collections.deque()  # the last pieces handed out
        self._kept = 0

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def _fill(self) -> bool:
        data = self._read(self.chunk)
        if not data:
            return False
        self.fetched += len(data)
        self._cur = memoryview(data)
        return True

    def take(self, size: int) -> memoryview:
        """Up to ``size`` bytes without copying (fewer at a piece boundary; empty at the end)."""
        if not self._cur and (size <= 0 or not self._fill()):
            return memoryview(b"")
        view, self._cur = self._cur[:size], self._cur[size:]
        self.pos += len(view)
        self._tail.append(view)
        self._kept += len(view)
        while self._kept - len(self._tail[0]) >= _TAIL:
            self._kept -= len(self._tail.popleft())
        return view

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            raise ValueError("a layer is never read whole")
        first = self.take(size)
        if len(first) == size or not first:
            return first.tobytes()
        parts = [first]
        got = len(first)
        while got < size and (view := self.take(size - got)):
            parts.append(view)
            got += len(view)
        return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence != 0 or offset < self.pos:
            raise ValueError(f"a layer stream only goes forward (at {self.pos}, asked for {offset})")
        while self.pos < offset and self.take(offset - self.pos):
            pass
        return self.pos

    def block_at(self, offset: int, size: int = tarfile.BLOCKSIZE) -> bytes | None:
        """``size`` bytes at ``offset`` if they were read and are still kept."""
        start = offset - (self.pos - self._kept)
        if start < 0:
            return None
        return b"".join(self._tail)[start:start + size]


class _SafeTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized PAX/GNU long-name headers (tarfile reads them into
    memory whole) and sparse files (their maps are attacker-sized; images never need them)."""

    def _proc_member(self, tf):  # type: ignore[no-untyped-def]
        if self.type in _META_TYPES and self.size > MAX_HEADER_BYTES:
            raise LayerError(f"entry {self.name!r}: extended header of {self.size} bytes "
                             f"exceeds {MAX_HEADER_BYTES}")
        return super()._proc_member(tf)  # type: ignore[misc]

    def _no_sparse(self, *args: object) -> None:
        raise LayerError(f"entry {self.name!r}: sparse files are not supported")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _no_sparse


def split_name(name: str, what: str = "entry") -> list[str]:
    """Validate a tar member name and return its components ('' = the layer root: [])."""
    if "\x00" in name:
        raise LayerError(f"{what} {name!r}: name contains NUL")
    if name.startswith("/"):
        raise LayerError(f"{what} {name!r}: absolute path")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise LayerError(f"{what} {name[:64]!r}...: name longer than {MAX_NAME_BYTES} bytes")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LayerError(f"{what} {name!r}: '..' component")
    if len(parts) > MAX_DEPTH:
        raise LayerError(f"{what} {name[:64]!r}...: more than {MAX_DEPTH} path components")
    return parts


def _entry_type(m: tarfile.TarInfo) -> str:
    if m.isreg():  # REGTYPE, AREGTYPE, CONTTYPE, GNU sparse
        return "file"
    if m.isdir():
        return "dir"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.isfifo():
        return "fifo"
    if m.ischr() or m.isblk():
        raise LayerError(f"entry {m.name!r}: device nodes are not allowed")
    raise LayerError(f"entry {m.name!r}: unknown tar entry type {m.type!r}")


class _Unpacker:
    def __init__(self, root_fd: int, max_entries: int, max_bytes: int | None) -> None:
        self.root_fd = root_fd
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stats = LayerStats()
        self.is_root = os.geteuid() == 0
        self.dir_times: list[tuple[list[str], int]] = []
        # Directories opened so far, by path (``dir_fd``): most entries share a parent with
        # the one before. Removing a directory drops it and what is under it (``remove``).
        self._dirs: dict[tuple[str, ...], int] = {}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def bound(self) -> None:
        """Keep at most about _OPEN_DIRS directories open: called where no fd of the cache is
        in use (before an entry, before each directory's times)."""
        if len(self._dirs) > _OPEN_DIRS:
            self.close()

    def dir_fd(self, label: str, path: tuple[str, ...], create: bool = True) -> int:
        """An fd (the cache's: valid until the next ``entry``, or until a directory above
        it is removed) of the directory ``path``, opened component by component without
        following symlinks; missing components are made if ``create``."""
        if not path:
            return self.root_fd
        fd = self._dirs.get(path)
        if fd is None:
            fd = self._open_dir(self.dir_fd(label, path[:-1], create), path[-1], label, create)
            self._dirs[path] = fd
        return fd

    def remove(self, parent: tuple[str, ...], dir_fd: int, name: str, st: os.stat_result) -> None:
        """Remove an earlier entry that a later one replaces (tar semantics)."""
        if stat.S_ISDIR(st.st_mode):
            gone = (*parent, name)
            for key in [k for k in self._dirs if k[:len(gone)] == gone]:
                os.close(self._dirs.pop(key))
            shutil.rmtree(name, dir_fd=dir_fd)  # fd-based, does not follow symlinks
        else:
            os.unlink(name, dir_fd=dir_fd)

    def make(self, parent: tuple[str, ...], dir_fd: int, name: str, create: Callable[[], T]) -> T:
        """``create()`` a new ``name``; an earlier entry in the way is removed first (the
        check costs nothing in the usual case, where nothing is there)."""
        try:
            return create()
        except FileExistsError:
            st = _lstat(dir_fd, name)
            if st is not None:
                self.remove(parent, dir_fd, name, st)
            return create()

    # -- path resolution ---------------------------------------------------------------

    def _open_dir(self, fd: int, comp: str, label: str, create: bool) -> int:
        try:
            return os.open(comp, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise LayerError(f"{label}: path component {comp!r} does not exist") from None
        except OSError as e:
            st = _lstat(fd, comp)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise LayerError(f"{label}: path goes through symlink {comp!r}") from None
            raise LayerError(f"{label}: path component {comp!r} is not a directory "
                             f"({e.strerror})") from None
        os.mkdir(comp, 0o755, dir_fd=fd)  # implicit parent, as docker/containerd do
        return os.open(comp, _DIR_FLAGS, dir_fd=fd)

    # -- entries -------------------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.bound()
        self.stats.entries += 1
        if self.stats.entries > self.max_entries:
            raise LayerError(f"entry {m.name!r}: more than {self.max_entries} entries in layer")
        parts = split_name(m.name)
        kind = _entry_type(m)
        if not (0 <= m.uid <= _MAX_ID and 0 <= m.gid <= _MAX_ID):
            raise LayerError(f"entry {m.name!r}: invalid owner {m.uid}:{m.gid}")
        if parts and parts[0].startswith(WHITEOUT_META_PREFIX) and parts != [WHITEOUT_OPAQUE]:
            log.debug("skipping AUFS metadata entry %s", m.name)
            return
        for comp in parts[:-1]:
            if comp.startswith(WHITEOUT_PREFIX):
                raise LayerError(f"entry {m.name!r}: malformed whiteout (whiteout used as directory)")
        if parts and parts[-1].startswith(WHITEOUT_PREFIX):
            self.whiteout(m, parts, kind)
            return
        if not parts:  # the layer root itself ("./")
            if kind != "dir":
                raise LayerError(f"entry {m.name!r}: layer root must be a directory")
            self.meta_dir(m, self.root_fd, [])
            return
        if kind == "hardlink":
            self.hardlink(m, parts)
            return
        parent = tuple(parts[:-1])
        pfd = self.dir_fd(f"entry {m.name!r}", parent)
        leaf = parts[-1]
        if kind == "file":
            self.regular(tf, m, parent, pfd, leaf)
        elif kind == "dir":
            try:
                os.mkdir(leaf, 0o700, dir_fd=pfd)
            except FileExistsError:
                st = _lstat(pfd, leaf)
                if st is not None and not stat.S_ISDIR(st.st_mode):
                    self.remove(parent, pfd, leaf, st)
                    os.mkdir(leaf, 0o700, dir_fd=pfd)
            self.meta_dir(m, self.dir_fd(f"entry {m.name!r}", tuple(parts)), parts)
        elif kind == "symlink":
            if "\x00" in m.linkname:
                raise LayerError(f"entry {m.name!r}: symlink target contains NUL")
            self.make(parent, pfd, leaf, lambda: os.symlink(m.linkname, leaf, dir_fd=pfd))
            if self.is_root:
                os.chown(leaf, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            ns = _mtime_ns(m)
            os.utime(leaf, ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
        elif kind == "fifo":
            self.make(parent, pfd, leaf, lambda: os.mkfifo(leaf, 0o600, dir_fd=pfd))
            fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)
            try:
                self.meta_fd(m, fd)
            finally:
                os.close(fd)

    def regular(self, tf: tarfile.TarFile, m: tarfile.TarInfo, parent: tuple[str, ...], pfd: int,
                leaf: str) -> None:
        if self.max_bytes is not None and self.stats.bytes + m.size > self.max_bytes:
            raise LayerError(f"entry {m.name!r}: layer exceeds the limit of {self.max_bytes} bytes")
        fd = self.make(parent, pfd, leaf, lambda: os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=pfd))
        try:
            src = tf.fileobj
            assert isinstance(src, _ForwardReader)
            src.seek(m.offset_data)
            left = m.size
            while left > 0:
                view = src.take(left)
                if not view:
                    raise LayerError(f"entry {m.name!r}: truncated tar (file data ends early)")
                left -= len(view)
                while view:
                    view = view[os.write(fd, view):]
            self.stats.bytes += m.size
            self.meta_fd(m, fd)
        finally:
            os.close(fd)

    def meta_fd(self, m: tarfile.TarInfo, fd: int) -> None:
        """Owner, mode (incl. setuid/setgid/sticky), xattrs, mtime on an open file."""
        if self.is_root:
            os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode & 0o7777)  # after chown, which clears setuid/setgid
        self.xattrs(m, fd)
        ns = _mtime_ns(m)
        os.utime(fd, ns=(ns, ns))

    def meta_dir(self, m: tarfile.TarInfo, dfd: int, parts: list[str]) -> None:
        if self.is_root:
            os.fchown(dfd, m.uid, m.gid)
        os.fchmod(dfd, m.mode & 0o7777)
        self.xattrs(m, dfd)
        self.dir_times.append((parts, _mtime_ns(m)))  # applied last: children change mtime

    def xattrs(self, m: tarfile.TarInfo, fd: int) -> None:
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            attr = key[len("SCHILY.xattr."):]
            if not _xattr_allowed(attr):
                log.debug("entry %s: ignoring xattr %s", m.name, attr)
                continue
            try:
                os.setxattr(fd, attr, value.encode("utf-8", "surrogateescape"))
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EPERM):
                    raise
                log.warning("entry %s: cannot set xattr %s: %s", m.name, attr, e.strerror)

    def hardlink(self, m: tarfile.TarInfo, parts: list[str]) -> None:
        label = f"entry {m.name!r}: hardlink target {m.linkname!r}"
        tparts = split_name(m.linkname, what=f"entry {m.name!r}: hardlink target")
        if not tparts:
            raise LayerError(f"{label} is the layer root")
        tfd = self.dir_fd(label, tuple(tparts[:-1]), create=False)
        tst = _lstat(tfd, tparts[-1])
        if tst is None:
            raise LayerError(f"{label} is not an earlier entry of this layer")
        if not (stat.S_ISREG(tst.st_mode) or stat.S_ISFIFO(tst.st_mode)):
            raise LayerError(f"{label} is not a regular file")
        parent = tuple(parts[:-1])
        pfd = self.dir_fd(f"entry {m.name!r}", parent)
        leaf = parts[-1]
        existing = _lstat(pfd, leaf)
        if existing is not None:
            if (existing.st_dev, existing.st_ino) == (tst.st_dev, tst.st_ino):
                return
            self.remove(parent, pfd, leaf, existing)
            # the target's directory may have been under what was removed, and closed
            tfd = self.dir_fd(label, tuple(tparts[:-1]), create=False)
        os.link(tparts[-1], leaf, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)

    def whiteout(self, m: tarfile.TarInfo, parts: list[str], kind: str) -> None:
        leaf = parts[-1]
        if kind == "dir":
            raise LayerError(f"entry {m.name!r}: malformed whiteout (is a directory)")
        if leaf == WHITEOUT_OPAQUE:
            if len(parts) < 2:
                raise LayerError(f"entry {m.name!r}: opaque marker is not inside a directory")
            os.setxattr(self.dir_fd(f"entry {m.name!r}", tuple(parts[:-1])), OPAQUE_XATTR, b"y")
            self.stats.opaque += 1
            return
        target = leaf[len(WHITEOUT_PREFIX):]
        if target in ("", ".", "..") or "/" in target or target.startswith(WHITEOUT_PREFIX):
            raise LayerError(f"entry {m.name!r}: malformed whiteout")
        pfd = self.dir_fd(f"entry {m.name!r}", tuple(parts[:-1]))
        if _lstat(pfd, target) is not None:
            # OCI: a whiteout never hides an entry of its own layer
            log.debug("entry %s: whiteout of a same-layer entry ignored", m.name)
            return
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=pfd)
        self.stats.whiteouts += 1

    def finish(self) -> None:
        """Set directory mtimes, deepest first, re-resolving each without following links."""
        for parts, ns in sorted(self.dir_times, key=lambda t: -len(t[0])):
            self.bound()
            try:
                if not parts:
                    os.utime(self.root_fd, ns=(ns, ns))
                    continue
                pfd = self.dir_fd("directory", tuple(parts[:-1]), create=False)
                st = _lstat(pfd, parts[-1])
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.utime(parts[-1], ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)
            except (LayerError, OSError):
                continue  # the directory was replaced later in the layer


def _xattr_allowed(attr: str) -> bool:
    if attr.startswith("trusted.overlay."):
        return False  # only we may write overlay metadata (whiteouts, opaque, redirects)
    if attr.startswith("security."):
        return attr == "security.capability"
    return attr.startswith(("user.", "trusted."))


def _mtime_ns(m: tarfile.TarInfo) -> int:
    raw = m.pax_headers.get("mtime")  # exact, where tarfile's float would round
    if raw is not None:
        with contextlib.suppress(decimal.InvalidOperation, ValueError, OverflowError):
            return max(0, int(decimal.Decimal(raw).scaleb(9)))
    return max(0, int(m.mtime * 1_000_000_000))


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def unpack_layer(stream: BinaryIO, dest: Path, *, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int | None = None) -> LayerStats:
    """Extract an (already decompressed) layer tar stream into the empty directory ``dest``.

    Raises LayerError naming the offending entry. Never writes outside ``dest``; on error
    ``dest`` is left partially filled for the caller to remove."""
    root_fd = os.open(dest, _DIR_FLAGS)
    try:
        if os.listdir(root_fd):
            raise LayerError(f"destination {dest} is not empty")
        reader = _ForwardReader(stream)
        u = _Unpacker(root_fd, max_entries, max_bytes)
        current = "<header>"
        try:
            # random-access mode over a stream that only goes forward: tarfile reads each
            # header where the previous member ends, and never goes back
            with tarfile.TarFile(fileobj=reader, mode="r", tarinfo=_SafeTarInfo) as tf:  # type: ignore[arg-type]
                for m in tf:
                    current = m.name
                    u.entry(tf, m)
                end = tf.offset
            marker = reader.block_at(end)
            if marker is None or len(marker) != tarfile.BLOCKSIZE or marker.count(0) != len(marker):
                raise LayerError(f"truncated tar: no end-of-archive marker after entry {current!r}")
            u.finish()
            u.stats.read_past_end = reader.fetched - reader.pos
        except LayerError:
            raise
        except (tarfile.TarError, EOFError, ValueError, OverflowError, zlib.error) as e:
            raise LayerError(f"corrupt or truncated tar at entry {current!r}: {e}") from None
        except OSError as e:
            raise LayerError(f"entry {current!r}: {e.strerror or e}") from None
        finally:
            u.close()
        return u.stats
    finally:
        os.close(root_fd)
