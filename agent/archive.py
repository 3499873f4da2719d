"""`docker cp`: the /containers/{id}/archive endpoints (GET, HEAD, PUT).

Every path is resolved inside the container's root with directory file descriptors, one
component at a time: a symlink in the container is followed as the container would see it,
``..`` and absolute targets stop at the container's root, and every open uses O_NOFOLLOW on a
directory fd we already hold. So a container that swaps a directory for a symlink to ``/``
while a copy runs (CVE-2018-15664) can make the copy fail, never write or read outside its
root. For a running container the root is ``/proc/<pid>/root`` (its own mount namespace, so
volumes and bind mounts are seen as the container sees them); for a stopped one it is the
container's overlay mount.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

MAX_LINKS = 40
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_CHUNK = 1 << 20


class ArchiveError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


class Located:
    """``name`` in the directory ``dir_fd`` (``name`` is "" when the path is that directory
    itself); ``path`` is the resolved path inside the container."""

    def __init__(self, dir_fd: int, name: str, path: str) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.path = path

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.dir_fd)

    def __enter__(self) -> Located:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lstat(self) -> os.stat_result:
        if not self.name:
            return os.fstat(self.dir_fd)
        return os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)


def locate(root_fd: int, path: str, *, follow_last: bool) -> Located:
    """Resolve ``path`` under ``root_fd`` as if it were ``/``. The last component may be
    missing (its parent must exist)."""
    stack = [os.dup(root_fd)]
    names: list[str] = []
    parts = _parts(path)
    links = 0
    try:
        while parts:
            part = parts.pop(0)
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
                continue
            last = not parts
            try:
                st = os.stat(part, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    return _done(stack, part, names)
                raise
            if stat.S_ISLNK(st.st_mode) and (follow_last or not last):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(40, "too many levels of symbolic links", path)
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    for fd in stack[1:]:
                        os.close(fd)
                    del stack[1:]
                    names.clear()
                parts = _parts(target) + parts
                continue
            if last and not stat.S_ISDIR(st.st_mode) or (last and not follow_last):
                return _done(stack, part, names)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(20, "not a directory", path)
            stack.append(os.open(part, DIR_FLAGS, dir_fd=stack[-1]))
            names.append(part)
        # The path is a directory we hold: report it as itself.
        return _done(stack, "", names)
    except BaseException:
        for fd in stack:
            os.close(fd)
        raise


def _done(stack: list[int], name: str, names: list[str]) -> Located:
    for fd in stack[:-1]:
        os.close(fd)
    return Located(stack[-1], name, "/" + "/".join([*names, name] if name else names))


# --- stat header ---------------------------------------------------------------------------------
#: Go's os.FileMode type bits, which the docker CLI decodes.
_GO_DIR, _GO_SYMLINK, _GO_DEVICE, _GO_PIPE, _GO_SOCKET = 1 << 31, 1 << 27, 1 << 26, 1 << 25, 1 << 24
_GO_SETUID, _GO_SETGID, _GO_CHARDEV, _GO_STICKY = 1 << 23, 1 << 22, 1 << 21, 1 << 20


def go_mode(mode: int) -> int:
    out = mode & 0o777
    kind = stat.S_IFMT(mode)
    out |= {stat.S_IFDIR: _GO_DIR, stat.S_IFLNK: _GO_SYMLINK, stat.S_IFIFO: _GO_PIPE, stat.S_IFSOCK: _GO_SOCKET,
            stat.S_IFBLK: _GO_DEVICE, stat.S_IFCHR: _GO_DEVICE | _GO_CHARDEV}.get(kind, 0)
    if mode & stat.S_ISUID:
        out |= _GO_SETUID
    if mode & stat.S_ISGID:
        out |= _GO_SETGID
    if mode & stat.S_ISVTX:
        out |= _GO_STICKY
    return out


def _rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def request_base(path: str) -> str:
    """What Go's filepath.Base gives for the path the client asked for ("." for a trailing /.)."""
    if path.endswith("/.") or path == ".":
        return "."
    stripped = path.rstrip("/")
    return stripped.rsplit("/", 1)[-1] if stripped else "/"


def _follow_last(path: str) -> bool:
    return path.endswith("/") or path.endswith("/.") or path in ("", ".")


def path_stat(root_fd: int, path: str) -> dict[str, Any]:
    if not path.startswith("/"):
        path = "/" + path
    try:
        with locate(root_fd, path, follow_last=_follow_last(path)) as loc:
            st = loc.lstat()
            link = ""
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError), locate(root_fd, path, follow_last=True) as target:
                    link = target.path
    except (FileNotFoundError, NotADirectoryError):
        raise ArchiveError(404, f"Could not find the file {path} in container") from None
    except OSError as exc:
        raise ArchiveError(400, f"{path}: {exc.strerror}") from exc
    return {"name": request_base(path), "size": st.st_size, "mode": go_mode(st.st_mode),
            "mtime": _rfc3339(st.st_mtime), "linkTarget": link}


def stat_header(info: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(info).encode()).decode()


# --- GET: the tar of a path ----------------------------------------------------------------------
def write_tar(root_fd: int, path: str, out: IO[bytes]) -> None:
    """Stream a tar of ``path`` (inside the container) to ``out``; names start with the base
    name the client asked for, as Docker's rebase does."""
    if not path.startswith("/"):
        path = "/" + path
    loc = locate(root_fd, path, follow_last=_follow_last(path))
    try:
        st = loc.lstat()
    except FileNotFoundError:
        loc.close()
        raise ArchiveError(404, f"Could not find the file {path} in container") from None
    base = request_base(path)
    if base == "/":
        base = "."
    with loc, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        walk = _Walk(tar)
        if loc.name:
            _add_entry(loc.dir_fd, loc.name, st, base, walk)
        else:
            _add_dir(os.dup(loc.dir_fd), st, base, walk)


def write_tree(dir_fd: int, out: IO[bytes], *, layer: bool = False, skip: frozenset[str] = frozenset(),
               lower: Callable[[str], os.stat_result | None] | None = None) -> int:
    """Stream a tar of everything under the directory ``dir_fd``, named from it (``etc/passwd``,
    no ``./`` and no entry for the directory itself), as `docker export` and layer tars are.
    With ``layer`` it is an overlayfs upper dir made into an OCI layer: its whiteouts (0/0
    character devices) become ``.wh.NAME`` files and its opaque directories get a
    ``.wh..wh..opq`` entry. Names in ``skip`` (relative, e.g. ``etc/hosts``) are left out
    with everything under them. ``lower`` gives what the layers below have at a name: a
    directory that is there alike (copied up only for what is inside it) is written only
    if something under it is. Returns the number of entries written."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        walk = _Walk(tar, layer=layer, skip=skip, lower=lower)
        _add_children(dir_fd, "", walk)
        return len(tar.members)


class _Walk:
    """A tar walk: the tar, the hardlinks seen (to write later ones as links), the options of
    ``write_tree``, and the directories waiting to be written until something under them is."""

    def __init__(self, tar: tarfile.TarFile, *, layer: bool = False, skip: frozenset[str] = frozenset(),
                 lower: Callable[[str], os.stat_result | None] | None = None) -> None:
        self.tar = tar
        self.links: dict[tuple[int, int], str] = {}
        self.layer, self.skip, self.lower = layer, skip, lower
        self.pending: list[tarfile.TarInfo] = []

    def add(self, ti: tarfile.TarInfo, f: IO[bytes] | None = None) -> None:
        for waiting in self.pending:  # its parents first
            self.tar.addfile(waiting)
        self.pending.clear()
        self.tar.addfile(ti, f)

    def unchanged_dir(self, arcname: str, st: os.stat_result) -> bool:
        low = self.lower(arcname) if self.layer and self.lower else None
        return low is not None and stat.S_ISDIR(low.st_mode) and \
            (low.st_mode, low.st_uid, low.st_gid) == (st.st_mode, st.st_uid, st.st_gid)


def _tarinfo(st: os.stat_result, name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.mtime = int(st.st_mtime)
    return ti


def _add_entry(dir_fd: int, name: str, st: os.stat_result, arcname: str, walk: _Walk) -> None:
    mode = st.st_mode
    links = walk.links
    if arcname in walk.skip:
        return
    if stat.S_ISDIR(mode):
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return  # swapped while we walked: skip it, never follow it
        _add_dir(fd, st, arcname, walk)
        return
    if walk.layer and stat.S_ISCHR(mode) and st.st_rdev == 0:  # an overlayfs whiteout
        parent, _, base = arcname.rpartition("/")
        ti = _tarinfo(st, f"{parent}/.wh.{base}" if parent else f".wh.{base}")
        ti.mode = 0o644
        walk.add(ti)
        return
    ti = _tarinfo(st, arcname)
    key = (st.st_dev, st.st_ino)
    if stat.S_ISREG(mode) and st.st_nlink > 1 and key in links:
        ti.type, ti.linkname = tarfile.LNKTYPE, links[key]
        walk.add(ti)
        return
    if stat.S_ISREG(mode):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError:
            return
        with os.fdopen(fd, "rb") as f:
            fst = os.fstat(f.fileno())
            if not stat.S_ISREG(fst.st_mode):
                return
            ti = _tarinfo(fst, arcname)
            ti.size = fst.st_size
            walk.add(ti, cast(IO[bytes], _Exact(f, fst.st_size)))
        if st.st_nlink > 1:
            links[key] = arcname
        return
    if stat.S_ISLNK(mode):
        ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
    elif stat.S_ISFIFO(mode):
        ti.type = tarfile.FIFOTYPE
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        ti.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    else:
        return  # sockets are not archived (as Docker)
    walk.add(ti)


def _add_dir(fd: int, st: os.stat_result, arcname: str, walk: _Walk) -> None:
    try:
        ti = _tarinfo(st, arcname)
        ti.type = tarfile.DIRTYPE
        opaque = walk.layer and _opaque(fd)  # the directory hides what lower layers have in it
        if not opaque and walk.unchanged_dir(arcname, st):
            walk.pending.append(ti)  # written with the first entry under it, if one comes
        else:
            walk.add(ti)
        if opaque:
            wh = _tarinfo(st, f"{arcname}/.wh..wh..opq")
            wh.mode = 0o644
            walk.add(wh)
        _add_children(fd, arcname + "/", walk)
        if walk.pending and walk.pending[-1] is ti:
            walk.pending.pop()  # nothing under it changed
    finally:
        os.close(fd)


def _add_children(fd: int, prefix: str, walk: _Walk) -> None:
    with os.scandir(fd) as it:
        entries = sorted(e.name for e in it)
    for name in entries:
        try:
            est = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        _add_entry(fd, name, est, prefix + name, walk)


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


class _Exact:
    """A file that yields exactly ``size`` bytes (zero-padded if it shrank while read)."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        if len(data) < n:
            data += b"\0" * (n - len(data))
        self.left -= len(data)
        return data


# --- PUT: extract a tar into a directory ---------------------------------------------------------
def extract_tar(root_fd: int, path: str, body: IO[bytes], *, copy_owner: bool = False,
                no_overwrite_dir_non_dir: bool = False) -> None:
    if not path.startswith("/"):
        path = "/" + path
    try:
        with locate(root_fd, path, follow_last=True) as loc:
            st = loc.lstat()
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(400, "extraction point is not a directory")
            dest = loc.path
    except (FileNotFoundError, NotADirectoryError):
        raise ArchiveError(404, f"Could not find the file {path} in container") from None
    try:
        tar = tarfile.open(fileobj=body, mode="r|*")
    except tarfile.TarError as exc:
        raise ArchiveError(400, f"invalid tar archive: {exc}") from exc
    dir_times: list[tuple[str, float]] = []
    with tar:
        try:
            for member in tar:
                _extract_one(root_fd, dest, tar, member, copy_owner, no_overwrite_dir_non_dir, dir_times)
        except tarfile.TarError as exc:
            raise ArchiveError(400, f"invalid tar archive: {exc}") from exc
    for cpath, mtime in reversed(dir_times):
        with contextlib.suppress(OSError), locate(root_fd, cpath, follow_last=False) as loc:
            if loc.name:
                os.utime(loc.name, (mtime, mtime), dir_fd=loc.dir_fd, follow_symlinks=False)


def _member_path(dest: str, name: str) -> str:
    parts: list[str] = []
    for p in _parts(name):
        if p == "..":
            if not parts:
                raise ArchiveError(400, f"invalid tar entry {name!r}: it leaves the extraction directory")
            parts.pop()
        else:
            parts.append(p)
    return dest.rstrip("/") + "/" + "/".join(parts) if parts else dest


def _extract_one(root_fd: int, dest: str, tar: tarfile.TarFile, m: tarfile.TarInfo, copy_owner: bool,
                 no_overwrite: bool, dir_times: list[tuple[str, float]]) -> None:
    cpath = _member_path(dest, m.name)
    uid, gid = (m.uid, m.gid) if copy_owner else (0, 0)
    with locate(root_fd, cpath, follow_last=False) as loc:
        if not loc.name:  # the entry is the extraction directory itself ("./")
            if m.isdir():
                fd = os.dup(loc.dir_fd)
                with contextlib.suppress(OSError):
                    os.fchmod(fd, m.mode & 0o7777)
                os.close(fd)
            return
        d, name = loc.dir_fd, loc.name
        try:
            existing: os.stat_result | None = os.stat(name, dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            is_dir = stat.S_ISDIR(existing.st_mode)
            if no_overwrite and is_dir != m.isdir():
                raise ArchiveError(400, f"cannot overwrite {'directory' if is_dir else 'non-directory'} "
                                        f"{loc.path!r} with {'directory' if m.isdir() else 'non-directory'}")
            if not (is_dir and m.isdir()):
                if is_dir:
                    _rmtree_at(d, name)
                else:
                    os.unlink(name, dir_fd=d)
        if m.isdir():
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(name, 0o700, dir_fd=d)
            fd = os.open(name, DIR_FLAGS, dir_fd=d)
            try:
                os.fchown(fd, uid, gid)
                os.fchmod(fd, m.mode & 0o7777)
            finally:
                os.close(fd)
            dir_times.append((loc.path, m.mtime))
            return
        if m.isreg():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=d)
            with os.fdopen(fd, "wb") as f:
                src = tar.extractfile(m)
                if src is not None:
                    while chunk := src.read(COPY_CHUNK):
                        f.write(chunk)
                f.flush()
                os.fchown(fd, uid, gid)
                os.fchmod(fd, m.mode & 0o7777)
                os.utime(fd, (m.mtime, m.mtime))
            return
        if m.issym():
            os.symlink(m.linkname, name, dir_fd=d)
        elif m.islnk():
            src_path = _member_path(dest, m.linkname)
            with locate(root_fd, src_path, follow_last=False) as src:
                if not src.name:
                    raise ArchiveError(400, f"invalid hard link {m.name!r} -> {m.linkname!r}")
                os.link(src.name, name, src_dir_fd=src.dir_fd, dst_dir_fd=d, follow_symlinks=False)
            return
        elif m.isfifo():
            os.mkfifo(name, m.mode & 0o7777, dir_fd=d)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(name, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor), dir_fd=d)
        else:
            return
        os.chown(name, uid, gid, dir_fd=d, follow_symlinks=False)
        os.utime(name, (m.mtime, m.mtime), dir_fd=d, follow_symlinks=False)


def _rmtree_at(dir_fd: int, name: str) -> None:
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for child, is_dir in entries:
            if is_dir:
                _rmtree_at(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


@contextlib.contextmanager
def open_root(path: str) -> Iterator[int]:
    fd = os.open(path, DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)

