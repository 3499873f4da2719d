"""Named and anonymous volumes on the VM's data disk, and the mount plan of a container.

A volume is a directory ``<engine root>/volumes/<name>/_data`` with ``meta.json`` beside it;
the data disk survives VM restarts, so volumes do. A container's mounts (``-v``,
``--mount``, the image's ``VOLUME``s) are planned once at create time into Docker's inspect
shape (``Mounts``) and turned into OCI mounts at every start.

Bind sources must lie inside a host folder shared into the VM (the guest mounts each share at
its host path, so the docker CLI's verbatim ``-v $HOME/src:/src`` works). Anything else is
refused with the setting to change; the path is resolved first, so a symlink in a share
cannot smuggle a VM path in.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent import guest_settings

ANONYMOUS_LABEL = "com.docker.volume.anonymous"
VOLUME_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
#: VM paths a bind may name although they are not shares: the engine socket, as Docker
#: Desktop offers /var/run/docker.sock to containers.
ENGINE_SOCKET = "/run/pydesk/engine.sock"
SOCKET_ALIASES = {"/var/run/docker.sock": ENGINE_SOCKET, "/run/docker.sock": ENGINE_SOCKET}
SHARE_HINT = "share its folder with the VM: `pydesk vm start --share PATH` or \"shares\" in settings.json"


class VolumeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def guest_shares() -> list[tuple[str, bool]]:
    """(guest path, read-only) of each host folder shared into the VM."""
    return [(os.path.normpath(value), key == "share-ro") for key, value in guest_settings.read()
            if key in ("share", "share-ro") and value.startswith("/")]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class Volumes:
    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "_data").is_dir()) if self.root.is_dir() else []

    def exists(self, name: str) -> bool:
        return VOLUME_NAME.match(name) is not None and (self.root / name / "_data").is_dir()

    def data(self, name: str) -> Path:
        return self.root / name / "_data"

    def _meta(self, name: str) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.root / name / "meta.json").read_text())
        return {}

    def inspect(self, name: str, ref_count: int | None = None, size: bool = False) -> dict[str, Any]:
        if not self.exists(name):
            raise VolumeError(404, f"get {name}: no such volume")
        meta = self._meta(name)
        out = {"Name": name, "Driver": "local", "Mountpoint": str(self.data(name)),
               "CreatedAt": meta.get("CreatedAt") or _now(), "Labels": meta.get("Labels") or {}, "Scope": "local",
               "Options": meta.get("Options") or {}}
        if size or ref_count is not None:
            out["UsageData"] = {"Size": du(self.data(name)) if size else -1,
                                "RefCount": ref_count if ref_count is not None else -1}
        return out

    def create(self, name: str | None = None, labels: dict[str, str] | None = None,
               options: dict[str, str] | None = None, driver: str | None = None,
               anonymous: bool = False) -> dict[str, Any]:
        if driver not in (None, "", "local"):
            raise VolumeError(400, f"create {name}: volume driver {driver!r} is not available; only \"local\" is")
        if options:
            raise VolumeError(400, f"create {name}: driver options are not supported by the local driver here "
                                   f"({', '.join(sorted(options))})")
        name = name or secrets.token_hex(32)
        if not VOLUME_NAME.match(name):
            raise VolumeError(400, f"create {name}: \"{name}\" includes invalid characters for a local volume "
                                   "name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed. If you intended to pass a "
                                   "host directory, use absolute path")
        d = self.root / name
        if not self.exists(name):
            (d / "_data").mkdir(parents=True, exist_ok=True)
            lab = dict(labels or {})
            if anonymous:
                lab[ANONYMOUS_LABEL] = ""
            tmp = d / "meta.json.tmp"
            tmp.write_text(json.dumps({"CreatedAt": _now(), "Labels": lab, "Options": options or {}}))
            os.replace(tmp, d / "meta.json")
        return self.inspect(name)

    def is_anonymous(self, name: str) -> bool:
        return ANONYMOUS_LABEL in (self._meta(name).get("Labels") or {})

    def remove(self, name: str, users: list[str], force: bool = False) -> None:
        if not self.exists(name):
            if force:
                return
            raise VolumeError(404, f"get {name}: no such volume")
        if users:
            raise VolumeError(409, f"remove {name}: volume is in use - [{', '.join(users)}]")
        # Rename first, so a half-deleted volume never shows up under its name.
        trash = self.root / f".removing-{name}-{secrets.token_hex(4)}"
        os.rename(self.root / name, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, used: set[str], everything: bool,
              wanted: Callable[[dict[str, str]], bool] = lambda labels: True) -> tuple[list[str], int]:
        """Remove the unused volumes (only anonymous ones unless ``everything``) whose labels
        ``wanted`` accepts; returns their names and the bytes freed."""
        deleted, space = [], 0
        for name in self.names():
            if name in used or not (everything or self.is_anonymous(name)):
                continue
            if not wanted(self._meta(name).get("Labels") or {}):
                continue
            space += du(self.data(name))
            self.remove(name, [])
            deleted.append(name)
        return deleted, space

    def fill_from(self, name: str, source: Path | None) -> None:
        """Docker's copy-up: an empty volume gets what the image has at its mount point."""
        data = self.data(name)
        if source is not None and source.is_dir() and not source.is_symlink() and not any(data.iterdir()):
            proc = subprocess.run(["cp", "-a", f"{source}/.", f"{data}/"], capture_output=True)
            if proc.returncode != 0:
                raise VolumeError(500, f"copying the image's content into volume {name} failed: "
                                       f"{proc.stderr.decode(errors='replace').strip()}")
            st = source.stat()
            os.chown(data, st.st_uid, st.st_gid)
            os.chmod(data, st.st_mode & 0o7777)


# --- the mount plan ------------------------------------------------------------------------------
_TMPFS_FLAGS = frozenset({"atime", "noatime", "relatime", "strictatime", "diratime", "nodiratime", "sync", "async",
                          "dirsync", "mand", "nomand"})
_TMPFS_KEYS = frozenset({"size", "mode", "uid", "gid", "nr_inodes", "nr_blocks", "mpol", "huge"})


def tmpfs_options(spec: str) -> tuple[tuple[str, ...], bool]:
    """``--tmpfs PATH[:OPTIONS]`` as dockerd mounts it: ``nosuid,nodev,noexec`` unless the
    options say ``suid``, ``dev`` or ``exec``; returns the mount options and whether it is
    read-only."""
    pairs = {"suid": "nosuid", "dev": "nodev", "exec": "noexec"}
    extra: list[str] = []
    read_only = False
    for opt in (o.strip() for o in spec.split(",")):
        if not opt:
            continue
        if opt in ("ro", "rw"):
            read_only = opt == "ro"
        elif opt.removeprefix("no") in pairs:
            pairs[opt.removeprefix("no")] = opt
        elif opt in _TMPFS_FLAGS or (opt.partition("=")[0] in _TMPFS_KEYS and "=" in opt):
            extra.append(opt)
        else:
            raise VolumeError(400, f'invalid tmpfs option ["{opt}"]')  # (dockerd's words)
    return (*pairs.values(), *extra), read_only


def _check_destination(dst: str, spec: str, kind: str = "volume", bind_spec: bool = False) -> str:
    """A mount's target, normalised; refused in dockerd's words (``bind_spec``: a ``-v`` spec,
    whose refusals dockerd prefixes with it)."""
    if not dst.startswith("/"):
        why = f"invalid mount config for type \"{kind}\": invalid mount path: '{dst}' mount path must be absolute"
        raise VolumeError(400, f"invalid volume specification: '{spec}': {why}" if bind_spec else why)
    dst = os.path.normpath(dst)
    if dst == "/":
        raise VolumeError(400, f"invalid mount config: destination can't be '/' (in {spec!r})")
    return dst


def bind_source(src: str, *, create: bool, shares: list[tuple[str, bool]] | None = None) -> str:
    """The VM path to bind for ``src``: inside a share (resolved, so no symlink leads out of
    it), or the engine socket. Raises with the setting to change otherwise."""
    src = os.path.normpath(src)
    if src in SOCKET_ALIASES:
        return SOCKET_ALIASES[src]
    shares = guest_shares() if shares is None else shares
    share = next((root for root, _ro in shares if _under(src, root)), None)
    if share is None:
        where = ", ".join(root for root, _ro in shares) or "none"
        raise VolumeError(400, f"bind source path {src} is not shared with the VM (shared: {where}); {SHARE_HINT}")
    if not os.path.lexists(src):
        if not create:
            raise VolumeError(400, f"invalid mount config for type \"bind\": bind source path does not exist: {src}")
        try:
            os.makedirs(src, exist_ok=True)
        except OSError as exc:
            raise VolumeError(400, f"cannot create bind source {src}: {exc.strerror}") from exc
    real = os.path.realpath(src)
    if not any(_under(real, root) for root, _ro in shares):
        raise VolumeError(400, f"bind source path {src} resolves to {real}, outside the folders shared with the VM; "
                               f"{SHARE_HINT}")
    return real


def plan(host_config: dict[str, Any], image_volumes: Iterable[str], volumes: Volumes) -> list[dict[str, Any]]:
    """Docker's ``Mounts`` records for a new container (volumes are created here)."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(rec: dict[str, Any], spec: str) -> None:
        if rec["Destination"] in seen:
            raise VolumeError(400, f"Duplicate mount point: {rec['Destination']}")
        seen.add(rec["Destination"])
        records.append(rec)

    for spec in host_config.get("Binds") or []:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise VolumeError(400, f"invalid volume specification: '{spec}'")
        src = parts[0]
        dst = _check_destination(parts[1], spec, "bind" if src.startswith("/") else "volume", bind_spec=True)
        mode = parts[2] if len(parts) > 2 else ""
        flags = set(mode.split(",")) - {""}
        bad = flags - {"ro", "rw", "z", "Z", "nocopy", "rprivate", "private", "rslave", "slave", "rshared", "shared",
                       "delegated", "cached", "consistent"}
        if bad or {"ro", "rw"} <= flags:
            raise VolumeError(400, f"invalid mode: {mode}")
        ro = "ro" in flags
        if src.startswith("/"):
            add({"Type": "bind", "Source": bind_source(src, create=True), "Destination": dst, "Mode": mode,
                 "RW": not ro, "Propagation": "rprivate"}, spec)
        else:
            vol = volumes.create(src)
            add({"Type": "volume", "Name": vol["Name"], "Source": vol["Mountpoint"], "Destination": dst,
                 "Driver": "local", "Mode": mode or "z", "RW": not ro, "Propagation": ""}, spec)
    for m in host_config.get("Mounts") or []:
        kind = (m.get("Type") or "volume").lower()
        target = m.get("Target") or m.get("Destination") or ""
        dst = _check_destination(target, str(m), kind)
        ro = bool(m.get("ReadOnly"))
        src = m.get("Source") or ""
        if kind == "bind":
            if not src.startswith("/"):
                raise VolumeError(400, f"invalid mount config for type \"bind\": invalid mount path: {src!r} "
                                       "mount path must be absolute")
            add({"Type": "bind", "Source": bind_source(src, create=False), "Destination": dst, "Mode": "",
                 "RW": not ro, "Propagation": "rprivate"}, str(m))
        elif kind == "volume":
            opts = m.get("VolumeOptions") or {}
            vol = volumes.create(src or None, labels=opts.get("Labels"), anonymous=not src)
            add({"Type": "volume", "Name": vol["Name"], "Source": vol["Mountpoint"], "Destination": dst,
                 "Driver": "local", "Mode": "nocopy" if opts.get("NoCopy") else "z", "RW": not ro,
                 "Propagation": ""}, str(m))
        elif kind == "tmpfs":
            t = m.get("TmpfsOptions") or {}
            opts = ["nosuid", "nodev"] + (["size=" + str(t["SizeBytes"])] if t.get("SizeBytes") else []) + \
                   (["mode=" + format(t["Mode"], "o")] if t.get("Mode") else [])
            add({"Type": "tmpfs", "Source": "", "Destination": dst, "Mode": ",".join(opts), "RW": not ro,
                 "Propagation": ""}, str(m))
        else:
            raise VolumeError(400, f'invalid mount config for type "{kind}": mount type unknown')
    for target, options in (host_config.get("Tmpfs") or {}).items():  # --tmpfs (mounted at start)
        if not target.startswith("/"):
            raise VolumeError(400, f"invalid mount path: '{target}' mount path must be absolute")
        dst = _check_destination(target, target)
        tmpfs_options(options or "")
        if dst in seen:
            raise VolumeError(400, f"Duplicate mount point: {dst}")
        seen.add(dst)
    for target in image_volumes:
        dst = _check_destination(target, target)
        if dst in seen:
            continue
        vol = volumes.create(anonymous=True)
        add({"Type": "volume", "Name": vol["Name"], "Source": vol["Mountpoint"], "Destination": dst,
             "Driver": "local", "Mode": "", "RW": True, "Propagation": ""}, target)
    return records
