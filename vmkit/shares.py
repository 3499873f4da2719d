"""Host folders shared into the VM: which ones, where they appear in the guest, and how a host
path on the command line becomes the guest path a bind mount needs.

On Linux and macOS a share appears in the guest at the same path as on the host (as Docker
Desktop, Colima and Lima do), so the real docker CLI's verbatim ``-v $HOME/src:/src`` works
without translation. Windows paths have no such twin: drive ``C:`` appears under
``/mnt/host/c`` and ``C:\\Users\\me\\src`` becomes ``/mnt/host/c/Users/me/src``.

Pure functions of their arguments; nothing here touches the VM.
"""

from __future__ import annotations

import dataclasses
import posixpath
from pathlib import PureWindowsPath

from vmkit.errors import ConfigError
from vmkit.spec import HostOS, Share

WINDOWS_PREFIX = "/mnt/host"
SHARE_SETTING_HINT = "share its folder with the VM: `pydesk vm start --share PATH`, or \"shares\" in settings.json"

#: Guest folders a share may not cover: the guest's own system (read-only root, runtime
#: state, the engine's data disk). A share may live *below* /home, /Users, /tmp, /mnt, /root ...
RESERVED = ("/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr",
            "/var", "/root", "/tmp", "/mnt", "/home", "/opt", "/srv", "/media", "/Users", "/Volumes")
RESERVED_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr", "/var")


def _is_windows_path(path: str) -> bool:
    return len(path) >= 2 and path[1] == ":" and path[0].isalpha()


def guest_path_for(host_path: str, os_: HostOS) -> str:
    """Where ``host_path`` (absolute, on the host) appears in the guest."""
    if os_ is HostOS.WINDOWS:
        p = PureWindowsPath(host_path)
        if not p.drive or len(p.drive) != 2:
            raise ConfigError(f"cannot share {host_path!r}: only drive-letter paths (C:\\...) can be shared")
        return posixpath.join(WINDOWS_PREFIX, p.drive[0].lower(), *p.parts[1:])
    return posixpath.normpath(host_path)


def check_guest_path(guest: str) -> None:
    if not guest.startswith("/"):
        raise ConfigError(f"share guest path {guest!r} must be absolute")
    norm = posixpath.normpath(guest)
    if norm in RESERVED or any(norm.startswith(t + "/") for t in RESERVED_TREES):
        raise ConfigError(f"cannot share into {norm!r} in the VM: it would hide the VM's own files",
                          hint="share a folder below it (e.g. your project folder), or give the share another "
                               "guest_path")


def parse_share(text: str, os_: HostOS) -> Share:
    """``HOSTPATH[:ro]`` (``--share``)."""
    read_only = False
    path = text
    for suffix in (":ro", ":rw"):
        if path.endswith(suffix) and not (_is_windows_path(path) and len(path) == 2 + len(suffix)):
            read_only, path = suffix == ":ro", path[: -len(suffix)]
    absolute = PureWindowsPath(path).is_absolute() if os_ is HostOS.WINDOWS else path.startswith("/")
    if not path or not absolute:
        raise ConfigError(f"invalid share {text!r}: the folder must be an absolute path",
                          hint="use --share /path/to/folder[:ro]")
    return Share(host_path=path, guest_path="", read_only=read_only)


def resolved(shares: tuple[Share, ...], os_: HostOS) -> tuple[Share, ...]:
    """Each share with its guest path filled in and checked; duplicates (same host path)
    collapse to the first."""
    out: list[Share] = []
    seen: set[str] = set()
    for s in shares:
        guest = s.guest_path or guest_path_for(s.host_path, os_)
        check_guest_path(guest)
        key = s.host_path.rstrip("/\\").lower() if os_ is HostOS.WINDOWS else s.host_path.rstrip("/") or "/"
        if key in seen:
            continue
        seen.add(key)
        out.append(dataclasses.replace(s, guest_path=posixpath.normpath(guest)))
    guests = [s.guest_path for s in out]
    for a in guests:
        for b in guests:
            if a != b and b.startswith(a.rstrip("/") + "/"):
                raise ConfigError(f"shares overlap in the VM: {b!r} is inside {a!r}",
                                  hint="share only the outer folder")
    return tuple(out)


def effective(configured: tuple[Share, ...], share_home: bool, home: str, os_: HostOS) -> tuple[Share, ...]:
    """The configured shares plus the user's home folder (unless ``share_home`` is off)."""
    home_share: tuple[Share, ...] = ()
    if share_home and home:
        try:
            check_guest_path(guest_path_for(home, os_))
            home_share = (Share(host_path=home, guest_path=""),)
        except ConfigError:
            pass  # e.g. root's home /root: the VM's own; configured shares still apply
    return resolved(tuple(configured) + home_share, os_)


def to_guest(host_path: str, shares: tuple[Share, ...], os_: HostOS) -> str:
    """The guest path for ``host_path`` (absolute, on the host) inside one of ``shares``
    (resolved), or a ConfigError naming the setting to change."""
    if os_ is HostOS.WINDOWS:
        p = PureWindowsPath(host_path)
        for s in shares:
            root = PureWindowsPath(s.host_path)
            if p == root or (str(p).lower().startswith(str(root).lower().rstrip("\\") + "\\")):
                rel = PureWindowsPath(str(p)[len(str(root).rstrip("\\")):].lstrip("\\"))
                return posixpath.join(s.guest_path, *rel.parts) if rel.parts else s.guest_path
    else:
        norm = posixpath.normpath(host_path)
        for s in shares:
            root = posixpath.normpath(s.host_path)
            if norm == root or norm.startswith(root.rstrip("/") + "/"):
                return posixpath.join(s.guest_path, posixpath.relpath(norm, root)) if norm != root else s.guest_path
    where = ", ".join(s.host_path for s in shares) or "none"
    raise ConfigError(f"{host_path} is not in a folder shared with the VM (shared: {where})", hint=SHARE_SETTING_HINT)


def to_host(guest_path: str, shares: tuple[Share, ...], os_: HostOS) -> str | None:
    """The host path behind ``guest_path`` (inside one of ``shares``, resolved), or None."""
    norm = posixpath.normpath(guest_path)
    for s in shares:
        if norm != s.guest_path and not norm.startswith(s.guest_path.rstrip("/") + "/"):
            continue
        rel = [p for p in posixpath.relpath(norm, s.guest_path).split("/") if p not in ("", ".")]
        if ".." in rel:
            return None
        if os_ is HostOS.WINDOWS:
            return str(PureWindowsPath(s.host_path, *rel))
        return posixpath.join(s.host_path, *rel)
    return None


def guest_config_lines(shares: tuple[Share, ...]) -> list[str]:
    """What the engine learns about shares (fw_cfg config): the guest roots bind mounts may use."""
    return [f"{'share-ro' if s.read_only else 'share'}={s.guest_path}" for s in shares]


def is_host_path(spec_source: str, os_: HostOS) -> bool:
    """Is a ``-v`` source a host path (rather than a volume name)?"""
    if os_ is HostOS.WINDOWS:
        return _is_windows_path(spec_source) or spec_source.startswith(("\\", "/"))
    return spec_source.startswith("/")


def split_volume_spec(spec: str, os_: HostOS) -> tuple[str, str]:
    """``SRC:DST[:OPTS]`` -> (SRC, ":DST[:OPTS]"), with a Windows drive colon kept in SRC."""
    if os_ is HostOS.WINDOWS and _is_windows_path(spec):
        head, sep, rest = spec[2:].partition(":")
        return spec[:2] + head, sep + rest
    head, sep, rest = spec.partition(":")
    return head, sep + rest

