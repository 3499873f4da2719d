"""Resolving paths inside a container's root without escaping it.

A container controls its own file system: a symlink in it may point at ``/`` or ``../..``.
Every lookup the engine does on the host side of a container root (reading /etc/passwd for
``-u name``, ``cp`` in and out) resolves symlinks as the container would see them, clamped
to the root, component by component.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_LINKS = 40


class PathEscape(Exception):
    pass


def resolve_in_root(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The host path for ``path`` inside ``root``, following symlinks as if ``root`` were
    ``/``. The result may not exist (its parent does, or it is reported as missing later)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            resolved.append(part)
            continue
        if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise PathEscape(f"too many levels of symbolic links in {path!r}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def read_in_root(root: Path, path: str, limit: int = 1 << 20) -> bytes | None:
    target = resolve_in_root(root, path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def lookup_user(root: Path, user: str) -> tuple[int, int, tuple[int, ...]]:
    """``-u`` semantics: ``name``, ``uid``, ``name:group``, ``uid:gid`` -> (uid, gid, extra gids)."""
    name, _, group = user.partition(":")
    passwd = (read_in_root(root, "/etc/passwd") or b"").decode(errors="replace").splitlines()
    groups = (read_in_root(root, "/etc/group") or b"").decode(errors="replace").splitlines()
    uid = gid = None
    username = None
    for line in passwd:
        f = line.split(":")
        if len(f) >= 4 and (f[0] == name or (name.isdigit() and f[2] == name)):
            uid, gid, username = int(f[2]), int(f[3]), f[0]
            break
    if uid is None:
        if not name.isdigit():
            raise KeyError(f"unable to find user {name}: no matching entries in passwd file")
        uid, gid = int(name), 0
    if group:
        gid = _group_id(groups, group, "unable")
    extra = []
    if username:
        for line in groups:
            f = line.split(":")
            if len(f) >= 4 and username in f[3].split(",") and f[2].isdigit() and int(f[2]) != gid:
                extra.append(int(f[2]))
    return uid, gid, tuple(extra)


def lookup_groups(root: Path, names: list[str]) -> tuple[int, ...]:
    """``--group-add`` semantics: each a gid or a group name from the container's /etc/group."""
    if not names:
        return ()
    groups = (read_in_root(root, "/etc/group") or b"").decode(errors="replace").splitlines()
    return tuple(_group_id(groups, g, "Unable") for g in names)


def _group_id(lines: list[str], group: str, word: str) -> int:
    for line in lines:
        f = line.split(":")
        if len(f) >= 3 and (f[0] == group or (group.isdigit() and f[2] == group)) and f[2].isdigit():
            return int(f[2])
    if not group.isdigit():  # (dockerd's two messages differ in their first letter)
        raise KeyError(f"{word} to find group {group}: no matching entries in group file")
    return int(group)
