"""Files between the host and containers: `pydesk volume ...`, `pydesk cp`, and the host paths
of `-v`/`--mount` made into the guest paths the engine binds.

Bind translation happens here, on the host, because only the host knows its own paths: on
Linux and macOS a shared folder has the same path in the VM (so this is the identity, and the
docker CLI's verbatim paths work as well); on Windows ``C:\\src`` becomes ``/mnt/host/c/src``.
A path outside every share is refused before anything is sent, naming the setting to change.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import posixpath
import sys
import tarfile
import threading
from pathlib import Path
from typing import IO, Any

from desktop import engine_opts as opts
from vmkit import shares as sharing
from vmkit.errors import ConfigError
from vmkit.spec import HostOS, Share


# --- -v / --mount --------------------------------------------------------------------------------
def parse_mount(text: str) -> dict[str, Any]:
    """``--mount type=bind,source=/a,target=/b,readonly`` -> a HostConfig.Mounts entry."""
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        fields[key] = value if eq else "true"
    kind = fields.pop("type", "volume")
    target = fields.pop("target", None) or fields.pop("destination", None) or fields.pop("dst", None)
    if not target:
        raise opts.FlagError(f"invalid argument \"{text}\" for \"--mount\" flag: target is required")
    source = fields.pop("source", None) or fields.pop("src", None) or ""
    ro = any(fields.pop(k, "false").lower() in ("true", "1", "") for k in ("readonly", "ro"))
    mount: dict[str, Any] = {"Type": kind, "Source": source, "Target": target, "ReadOnly": ro}
    if kind == "volume" and fields.pop("volume-nocopy", "false").lower() in ("true", "1"):
        mount["VolumeOptions"] = {"NoCopy": True}
    if kind == "tmpfs":
        t: dict[str, Any] = {}
        if "tmpfs-size" in fields:
            t["SizeBytes"] = opts.parse_memory(fields.pop("tmpfs-size"))
        if "tmpfs-mode" in fields:
            t["Mode"] = int(fields.pop("tmpfs-mode"), 8)
        mount["TmpfsOptions"] = t
    fields.pop("consistency", None)
    fields.pop("bind-propagation", None)
    if fields:
        raise opts.FlagError(f"invalid argument \"{text}\" for \"--mount\" flag: unknown field {next(iter(fields))!r}")
    return mount


def current_shares(name: str, os_: HostOS) -> tuple[Share, ...]:
    """The running VM's shares (its status), else those the settings would give."""
    from vmkit.paths import VMPaths
    from vmkit.status import read_status

    st = read_status(VMPaths(name))
    if st.get("state") == "running" and isinstance(st.get("shares"), list):
        return tuple(Share(s["host_path"], s["guest_path"], bool(s.get("read_only"))) for s in st["shares"])
    from vmkit.settings import load
    from vmkit.vm import vm_shares

    return vm_shares(load(), os_)


def host_to_guest(path: str, shares: tuple[Share, ...], os_: HostOS, cwd: str | None = None) -> str:
    if path in sharing_socket_paths():
        return path
    if os_ is not HostOS.WINDOWS and not path.startswith("/"):
        path = os.path.join(cwd or os.getcwd(), path)
    try:
        return sharing.to_guest(os.path.normpath(path), shares, os_)
    except ConfigError:
        real = os.path.realpath(path)  # e.g. macOS /tmp -> /private/tmp
        if real != path:
            with contextlib.suppress(ConfigError):
                return sharing.to_guest(real, shares, os_)
        raise


def sharing_socket_paths() -> tuple[str, ...]:
    return ("/var/run/docker.sock", "/run/docker.sock")


def _is_path_source(src: str, os_: HostOS) -> bool:
    return sharing.is_host_path(src, os_) or src.startswith(("./", "../", "~")) or src in (".", "..")


def translate_mounts(cfg: dict[str, Any], shares: tuple[Share, ...], os_: HostOS) -> None:
    """Rewrite the host paths in HostConfig.Binds/Mounts of ``cfg`` to guest paths."""
    host = cfg.get("HostConfig") or {}
    binds = []
    for spec in host.get("Binds") or []:
        src, rest = sharing.split_volume_spec(spec, os_)
        if rest and _is_path_source(src, os_):
            src = host_to_guest(os.path.expanduser(src), shares, os_)
        binds.append(src + rest)
    if binds:
        host["Binds"] = binds
    for m in host.get("Mounts") or []:
        if m.get("Type") == "bind" and m.get("Source"):
            m["Source"] = host_to_guest(os.path.expanduser(m["Source"]), shares, os_)


# --- volumes -------------------------------------------------------------------------------------
def cmd_volume_create(args: argparse.Namespace) -> int:
    from desktop.engine_cli import engine

    labels = opts.parse_labels(args.label or [])
    driver_opts = dict(o.partition("=")[::2] for o in args.opt or [])
    v = engine(args).api.create_volume(args.volume_name, driver=args.driver, driver_opts=driver_opts or None,
                                       labels=labels or None)
    print(v["Name"])
    return 0


def cmd_volume_ls(args: argparse.Namespace) -> int:
    from desktop.engine_cli import _print_formatted, engine

    vols = engine(args).api.volumes(filters=opts.filters(args.filter) or None).get("Volumes") or []
    if args.quiet:
        for v in vols:
            print(v["Name"])
        return 0
    rows = [{"Driver": v.get("Driver", "local"), "Name": v["Name"], "Mountpoint": v.get("Mountpoint", ""),
             "Labels": ",".join(f"{k}={val}" for k, val in (v.get("Labels") or {}).items()),
             "Scope": v.get("Scope", "local")} for v in vols]
    if args.format:
        return _print_formatted(rows, args.format)
    print(f"{'DRIVER':<16}VOLUME NAME")
    for r in rows:
        print(f"{r['Driver']:<16}{r['Name']}")
    return 0


def cmd_volume_inspect(args: argparse.Namespace) -> int:
    import docker.errors

    from desktop.engine_cli import api_message, engine, error

    api = engine(args).api
    out, code = [], 0
    for name in args.names:
        try:
            out.append(api.inspect_volume(name))
        except docker.errors.NotFound as exc:
            error(api_message(exc))
            code = 1
    if args.format:
        from desktop.engine_cli import _print_formatted

        _print_formatted(out, args.format)
    else:
        print(json.dumps(out, indent=4))
    return code


def cmd_volume_rm(args: argparse.Namespace) -> int:
    from desktop.engine_cli import _each, engine

    api = engine(args).api
    return _each(args.names, lambda n: api.remove_volume(n, force=args.force))


def cmd_volume_prune(args: argparse.Namespace) -> int:
    from desktop.engine_cli import confirm, engine

    filters = opts.filters(args.filter)
    api = engine(args).api
    if not args.force:
        what = "all local volumes not used by at least one container" if args.all else \
               "all anonymous local volumes not used by at least one container"
        if not confirm(f"WARNING! This will remove {what}."):
            return 0
    if args.all:
        filters["all"] = ["true"]
    out = api.prune_volumes(filters=filters or None)
    if out.get("VolumesDeleted"):
        print("Deleted Volumes:\n" + "\n".join(out["VolumesDeleted"]) + "\n")
    print(f"Total reclaimed space: {opts.human_size(out.get('SpaceReclaimed') or 0)}")
    return 0


# --- cp ------------------------------------------------------------------------------------------
class CopyError(Exception):
    pass


def split_cp_arg(arg: str, os_: HostOS) -> tuple[str | None, str]:
    """``CONTAINER:PATH`` -> (container, path); a local path -> (None, path). As docker: a
    path with a colon must start with / or . to be local; a Windows drive is local."""
    if arg.startswith(("/", ".")) or (os_ is HostOS.WINDOWS and len(arg) > 1 and arg[1] == ":" and arg[0].isalpha()):
        return None, arg
    name, sep, path = arg.partition(":")
    if not sep or not name:
        return None, arg
    return name, path


def _stat(api: Any, container: str, path: str) -> dict[str, Any] | None:
    import base64

    import docker.errors

    res = api.head(api._url("/containers/{0}/archive", container), params={"path": path})
    if res.status_code == 404:
        try:
            api._raise_for_status(res)
        except docker.errors.NotFound as exc:
            if "No such container" in str(exc) or "no such container" in str(exc).lower():
                raise
        return None
    api._raise_for_status(res)
    header = res.headers.get("X-Docker-Container-Path-Stat")
    return json.loads(base64.b64decode(header)) if header else None


GO_DIR = 1 << 31


def _copy_from(api: Any, container: str, src: str, dst: str, archive: bool) -> None:
    stream, info = api.get_archive(container, src, chunk_size=1 << 20)
    reader = _GenReader(stream)
    if dst == "-":
        out = sys.stdout.buffer
        while data := reader.read(1 << 20):
            out.write(data)
        out.flush()
        return
    src_is_dir = bool(info["mode"] & GO_DIR)
    contents_only = src.endswith("/.")
    dpath = Path(dst)
    if dpath.is_dir():
        target_dir, name = dpath, (None if contents_only else info["name"])
    elif dpath.exists():
        if src_is_dir:
            raise CopyError(f"cannot copy a directory to a file: {dst}")
        target_dir, name = dpath.parent, dpath.name
    else:
        if dst.endswith(("/", os.sep)) and not src_is_dir:
            raise CopyError(f"destination directory {dst} does not exist")
        if not dpath.parent.is_dir():
            raise CopyError(f"destination directory {dpath.parent} does not exist")
        target_dir, name = dpath.parent, dpath.name
        if src_is_dir and contents_only:
            dpath.mkdir()
            target_dir, name = dpath, None
    base = info["name"]
    uid, gid = (os.getuid(), os.getgid()) if hasattr(os, "getuid") else (0, 0)

    def rename(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        parts = member.name.split("/")
        if parts[0] in (base, "."):
            parts = parts[1:]
        elif base != "/":
            return None
        if name is None:
            if not parts:
                return None  # the directory itself: its contents go into the target
            new = "/".join(parts)
        else:
            new = "/".join([name, *parts])
        member = member.replace(name=new, deep=False)
        if not archive:
            member = member.replace(uid=uid, gid=gid, uname="", gname="", deep=False)
        return tarfile.tar_filter(member, path)

    with tarfile.open(fileobj=reader, mode="r|") as tar:
        tar.extractall(str(target_dir), filter=rename, numeric_owner=True)


class _GenReader:
    """A file over docker-py's chunk generator."""

    def __init__(self, gen: Any) -> None:
        self.gen, self.buf = iter(gen), b""

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            try:
                self.buf += next(self.gen)
            except StopIteration:
                break
        if n < 0:
            data, self.buf = self.buf, b""
        else:
            data, self.buf = self.buf[:n], self.buf[n:]
        return data


def _copy_to(api: Any, container: str, src: str, dst: str, archive: bool, follow: bool) -> None:
    if src == "-":
        _put(api, container, dst, sys.stdin.buffer)
        return
    spath = Path(src)
    if not spath.exists() and not spath.is_symlink():
        raise CopyError(f"could not find the file {src}")
    if follow and spath.is_symlink():
        spath = spath.resolve()
    src_is_dir = spath.is_dir() and not (spath.is_symlink() and not follow)
    contents_only = src.endswith(("/.", os.sep + "."))
    dst_stat = _stat(api, container, dst)
    if dst_stat is not None and dst_stat["mode"] & GO_DIR:
        target, name = dst, (None if contents_only else spath.name)
    elif dst_stat is not None:
        if src_is_dir:
            raise CopyError(f"cannot copy a directory to a file: {container}:{dst}")
        target, name = posixpath.dirname(dst.rstrip("/")) or "/", posixpath.basename(dst.rstrip("/"))
    else:
        if dst.endswith("/"):
            raise CopyError(f"destination directory {container}:{dst} does not exist")
        parent = posixpath.dirname(dst.rstrip("/")) or "/"
        pstat = _stat(api, container, parent)
        if pstat is None or not pstat["mode"] & GO_DIR:
            raise CopyError(f"destination directory {container}:{parent} does not exist")
        target, name = parent, posixpath.basename(dst.rstrip("/"))
    r, w = os.pipe()
    error: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(w, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                def owner(ti: tarfile.TarInfo) -> tarfile.TarInfo:
                    if not archive:
                        ti.uid = ti.gid = 0
                        ti.uname = ti.gname = ""
                    return ti

                if name is None:
                    for child in sorted(spath.iterdir()):
                        tar.add(str(child), arcname=child.name, filter=owner)
                else:
                    tar.add(str(spath), arcname=name, filter=owner)
        except BaseException as exc:  # reported after the upload ends
            error.append(exc)

    t = threading.Thread(target=produce, daemon=True)
    t.start()
    with os.fdopen(r, "rb") as body:
        _put(api, container, target, body, copy_owner=archive)
    t.join()
    if error:
        raise CopyError(f"reading {src}: {error[0]}")


def _put(api: Any, container: str, path: str, body: IO[bytes], copy_owner: bool = False) -> None:
    def chunks() -> Any:
        while data := body.read(1 << 20):
            yield data

    res = api._put(api._url("/containers/{0}/archive", container),
                   params={"path": path, "copyUIDGID": "1" if copy_owner else "0"}, data=chunks())
    api._raise_for_status(res)


def cmd_cp(args: argparse.Namespace) -> int:
    import docker.errors

    from desktop.engine_cli import Fail, api_message, engine
    from vmkit.host import host_os

    os_ = host_os()
    (sc, sp), (dc, dp) = split_cp_arg(args.src, os_), split_cp_arg(args.dst, os_)
    if (sc is None) == (dc is None):
        raise Fail("copying between containers is not supported" if sc else
                   "must specify at least one container source (CONTAINER:PATH)")
    api = engine(args).api
    try:
        if sc is not None:
            _copy_from(api, sc, sp or "/", dp, args.archive)
            what = f"{sc}:{sp}"
        else:
            assert dc is not None
            _copy_to(api, dc, sp, dp or "/", args.archive, args.follow_link)
            what = sp
    except (CopyError, tarfile.TarError, OSError) as exc:
        raise Fail(str(exc)) from None
    except docker.errors.NotFound as exc:
        raise Fail(api_message(exc) if getattr(exc, "explanation", None) else
                   f"Could not find the file {sp} in container {sc or dc}") from None
    if not args.quiet and dp != "-" and sys.stderr.isatty():
        print(f"Successfully copied {what} to {args.dst}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    from desktop.engine_cli import handles_errors

    p = sub.add_parser("cp", help="copy files between a container and the host",
                       description="copy files between a container and the host: pydesk cp CONTAINER:SRC DEST, "
                                   "pydesk cp SRC CONTAINER:DEST (- for a tar stream on stdin/stdout)")
    p.add_argument("-a", "--archive", action="store_true", help="keep owners (uid:gid)")
    p.add_argument("-L", "--follow-link", action="store_true", help="follow a symlink given as SRC")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DEST")
    p.set_defaults(func=handles_errors()(cmd_cp))

    vol = sub.add_parser("volume", help="manage volumes")
    vs = vol.add_subparsers(dest="volume_command", metavar="ACTION")
    vs.required = True
    p = vs.add_parser("create", help="create a volume")
    p.add_argument("-d", "--driver", default="local")
    p.add_argument("-o", "--opt", action="append", metavar="KEY=VALUE")
    p.add_argument("--label", action="append", metavar="KEY[=VALUE]")
    p.add_argument("volume_name", nargs="?", metavar="VOLUME")
    p.set_defaults(func=handles_errors()(cmd_volume_create))
    p = vs.add_parser("ls", aliases=["list"], help="list volumes")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-f", "--filter", action="append", metavar="KEY=VALUE")
    p.add_argument("--format")
    p.set_defaults(func=handles_errors()(cmd_volume_ls))
    p = vs.add_parser("inspect", help="show volumes (JSON)")
    p.add_argument("-f", "--format")
    p.add_argument("names", nargs="+", metavar="VOLUME")
    p.set_defaults(func=handles_errors()(cmd_volume_inspect))
    p = vs.add_parser("rm", aliases=["remove"], help="remove volumes")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("names", nargs="+", metavar="VOLUME")
    p.set_defaults(func=handles_errors()(cmd_volume_rm))
    p = vs.add_parser("prune", help="remove unused volumes (anonymous ones unless --all)")
    p.add_argument("-a", "--all", action="store_true", help="named volumes too")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=handles_errors()(cmd_volume_prune))
