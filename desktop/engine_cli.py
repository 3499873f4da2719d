"""`pydesk run|ps|logs|exec|...`: a docker-compatible front end on docker-py.

Every command talks to the pydesk engine (the Docker Engine API served by the agent in the
VM, exposed on the host by the pydesk daemon) through docker-py — no hand-written HTTP.
Flags, output and exit codes follow the docker CLI: `run` exits with the container's code,
125 when the engine refuses, 126/127 when the command cannot be run / is not found.
Errors are one line (`pydesk: error: ...`, the engine's own explanation), never a traceback
unless `--debug`.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from desktop import dockerpy
from desktop import engine_opts as opts
from desktop import engine_stream as streams
from vmkit.errors import DaemonError, NotRunning, VMKitError

EXIT_ERROR = 1
HUB = "https://index.docker.io/v1/"


class Fail(Exception):
    """A one-line error with the exit code the command returns."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def error(message: str) -> None:
    print(f"pydesk: error: {' '.join(str(message).split())}", file=sys.stderr)


def api_message(exc: BaseException) -> str:
    """The engine's explanation of an API error, on one line (what docker prints after
    "Error response from daemon: ")."""
    msg = getattr(exc, "explanation", None) or str(exc)
    return " ".join(str(msg).split())


def handles_errors(code: int = EXIT_ERROR) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Turn docker-py's and our own errors into one line and ``code`` (125 for run/create)."""
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def wrapper(args: argparse.Namespace) -> int:
            dockerpy.load()
            import docker.errors
            import requests.exceptions

            try:
                return fn(args)
            except BrokenPipeError:  # `pydesk ps | head`: quiet, like docker
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 141
            except Fail as exc:
                if args.debug:
                    raise
                error(str(exc))
                return exc.code
            except VMKitError as exc:
                if args.debug or code == EXIT_ERROR:
                    raise  # desktop.cli.main prints it
                error(str(exc) + (f" (hint: {exc.hint})" if exc.hint else ""))
                return code
            except docker.errors.APIError as exc:
                if args.debug:
                    raise
                error(api_message(exc))
                return code
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                if args.debug:
                    raise
                error(f"lost the connection to the pydesk engine: {api_message(exc)}")
                return code
        return wrapper
    return deco


# --- connecting ------------------------------------------------------------------------------
def auth_file() -> Path:
    """Registry credentials saved by `pydesk login`, in docker's config.json format."""
    from vmkit.paths import config_dir

    return config_dir() / "auth.json"


def _connect(base_url: str) -> Any:
    import docker

    client = docker.DockerClient(base_url=base_url, version="auto", timeout=600)
    if auth_file().exists():
        client.api.reload_config(dockercfg_path=str(auth_file()))
    return client


def engine(args: argparse.Namespace, *, autostart: bool = False) -> Any:
    """A docker-py client for this VM's engine; with ``autostart`` the VM is started first
    when it is not running."""
    import docker.errors

    from vmkit import engine_endpoint
    from vmkit.paths import VMPaths

    paths = VMPaths(args.name)
    host = engine_endpoint.docker_host(paths)
    if engine_endpoint.may_exist(paths):
        try:
            return _connect(host)
        except docker.errors.DockerException:
            pass
    from vmkit.client import DaemonClient

    if DaemonClient(args.name).reachable():
        raise DaemonError(f"the pydesk engine of VM {args.name!r} is not answering on {host}",
                          hint="see `pydesk vm logs --daemon`, or restart it with `pydesk vm restart`")
    if not autostart:
        raise NotRunning(f"pydesk VM {args.name!r} is not running", hint="start it with `pydesk vm start`")
    _start_vm(args)
    try:
        return _connect(host)
    except docker.errors.DockerException as exc:
        raise DaemonError(f"the pydesk VM started but its engine is not answering: {api_message(exc)}") from None


def _start_vm(args: argparse.Namespace) -> None:
    """`pydesk vm start` with the saved settings, as if typed (the real parser gives every
    option its default, so no option can be missing here)."""
    from desktop.cli import build_parser, cmd_vm_start

    print("starting the pydesk VM…", file=sys.stderr, flush=True)
    ns = build_parser().parse_args(["--name", args.name, *(["--debug"] if args.debug else []), "vm", "start"])
    cmd_vm_start(ns)


def _each(names: list[str], action: Callable[[str], Any], echo: bool = True) -> int:
    """docker's multi-target commands: act on each, print the name on success, one error line
    per failure, exit 1 if any failed."""
    import docker.errors

    failed = False
    for n in names:
        try:
            out = action(n)
        except docker.errors.APIError as exc:
            error(api_message(exc))
            failed = True
            continue
        if echo:
            print(n if out is None else out, flush=True)
    return EXIT_ERROR if failed else 0


# --- images -------------------------------------------------------------------------------
def split_ref(ref: str) -> tuple[str, str]:
    """``busybox`` -> (busybox, latest); ``r:5000/x:1`` -> (r:5000/x, 1); digests kept."""
    from docker.utils import parse_repository_tag

    repo, tag = parse_repository_tag(ref)
    return repo, tag or "latest"


def full_ref(ref: str) -> str:
    repo, tag = split_ref(ref)
    return f"{repo}@{tag}" if tag.startswith("sha256:") else f"{repo}:{tag}"


def canonical(ref: str) -> str:
    """docker's fully qualified name: busybox -> docker.io/library/busybox:latest."""
    repo, tag = split_ref(ref)
    first = repo.split("/", 1)[0]
    if "/" not in repo:
        repo = f"docker.io/library/{repo}"
    elif not ("." in first or ":" in first or first == "localhost"):
        repo = f"docker.io/{repo}"
    return f"{repo}@{tag}" if tag.startswith("sha256:") else f"{repo}:{tag}"


def do_pull(client: Any, ref: str, *, platform: str | None = None, file: Any = None) -> None:
    repo, tag = split_ref(ref)
    err = streams.pull(client.api, repo, tag, platform=platform, file=file)
    if err:
        raise Fail(err)


@handles_errors()
def cmd_pull(args: argparse.Namespace) -> int:
    client = engine(args, autostart=True)
    do_pull(client, args.image, platform=args.platform, file=None if not args.quiet else open(os.devnull, "w"))
    print(canonical(args.image))
    return 0


@handles_errors()
def cmd_images(args: argparse.Namespace) -> int:
    client = engine(args)
    filters = opts.filters(args.filter)
    images = client.api.images(name=args.repository, all=args.all, filters=filters or None)
    now = time.time()
    rows = []
    for img in sorted(images, key=lambda i: -int(i.get("Created") or 0)):
        full_id = img.get("Id", "")
        short = full_id if args.no_trunc else full_id.removeprefix("sha256:")[:12]
        created = int(img.get("Created") or 0)
        tags = [t for t in (img.get("RepoTags") or []) if t != "<none>:<none>"] or ["<none>:<none>"]
        digests = img.get("RepoDigests") or []
        for t in tags:
            repo, _, tag = t.rpartition(":")
            if args.repository and not _ref_matches(args.repository, repo, tag):
                continue  # the engine returns every tag of a matching image
            digest = next((d.split("@", 1)[1] for d in digests if d.split("@", 1)[0] == repo), "<none>")
            rows.append({
                "Containers": "N/A", "CreatedAt": _go_time(created), "CreatedSince": _ago(now, created),
                "Digest": digest, "ID": short, "Repository": repo, "SharedSize": "N/A",
                "Size": opts.human_size(img.get("Size") or 0), "Tag": tag, "UniqueSize": "N/A",
                "VirtualSize": opts.human_size(img.get("VirtualSize") or img.get("Size") or 0)})
    if args.quiet:
        seen: list[str] = []
        for r in rows:
            if r["ID"] not in seen:
                seen.append(r["ID"])
        print("\n".join(seen)) if seen else None
        return 0
    if args.format:
        return _print_formatted(rows, args.format)
    head = ["REPOSITORY", "TAG"] + (["DIGEST"] if args.digests else []) + ["IMAGE ID", "CREATED", "SIZE"]
    table = [head] + [[r["Repository"], r["Tag"]] + ([r["Digest"]] if args.digests else [])
                      + [r["ID"], r["CreatedSince"], r["Size"]] for r in rows]
    print(opts.table(table))
    return 0


def _ref_matches(pattern: str, repo: str, tag: str) -> bool:
    prepo, _, ptag = pattern.rpartition(":") if ":" in pattern.rsplit("/", 1)[-1] else (pattern, "", "")
    return fnmatch.fnmatchcase(repo, prepo) and (not ptag or fnmatch.fnmatchcase(tag, ptag))


@handles_errors()
def cmd_rmi(args: argparse.Namespace) -> int:
    client = engine(args)

    def rmi(name: str) -> str:
        out = client.api.remove_image(name, force=args.force, noprune=args.no_prune)
        lines = []
        for item in out or []:
            for k in ("Untagged", "Deleted"):
                if item.get(k):
                    lines.append(f"{k}: {item[k]}")
        return "\n".join(lines)

    return _each(args.images, rmi)


@handles_errors()
def cmd_tag(args: argparse.Namespace) -> int:
    client = engine(args)
    repo, tag = split_ref(args.target)
    if tag.startswith("sha256:"):
        raise Fail(f"invalid reference format: {args.target}")
    client.api.tag(args.source, repo, tag)
    return 0


@handles_errors()
def cmd_login(args: argparse.Namespace) -> int:
    import base64
    import getpass

    client = engine(args)
    server = args.server or HUB
    user = args.username
    if args.password_stdin and args.password:
        raise Fail("--password and --password-stdin are mutually exclusive")
    if args.password_stdin and not user:
        raise Fail("Must provide --username with --password-stdin")
    if not user:
        if not streams.stdin_is_tty():
            raise Fail("Cannot perform an interactive login from a non TTY device")
        user = input("Username: ").strip()
    if args.password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif args.password is not None:
        print("WARNING! Using --password via the CLI is insecure. Use --password-stdin.", file=sys.stderr)
        password = args.password
    elif streams.stdin_is_tty():
        password = getpass.getpass("Password: ")
    else:
        raise Fail("Cannot perform an interactive login from a non TTY device")
    if not user or not password:
        raise Fail("Username and password are required")
    reply = client.api.login(user, password, registry=server, reauth=True)
    _save_auth(server, base64.b64encode(f"{user}:{password}".encode()).decode())
    print(reply.get("Status") or "Login Succeeded")
    return 0


@handles_errors()
def cmd_logout(args: argparse.Namespace) -> int:
    server = args.server or HUB
    if not _save_auth(server, None):
        print(f"Not logged in to {server}")
        return 0
    print(f"Removing login credentials for {server}")
    return 0


def _save_auth(server: str, auth: str | None) -> bool:
    """Save (or with None, remove) the credentials for ``server``; False if there were none
    to remove."""
    from vmkit.paths import ensure_private_dir

    path = auth_file()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    auths = data.setdefault("auths", {})
    if auth is None:
        if server not in auths:
            return False
        del auths[server]
    else:
        auths[server] = {"auth": auth}
    ensure_private_dir(path.parent)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)
    return True


@handles_errors()
def cmd_save(args: argparse.Namespace) -> int:
    client = engine(args)
    api = client.api
    if not args.output and sys.stdout.isatty():
        raise Fail("cowardly refusing to save to a terminal. Use the -o flag or redirect")
    res = api._get(api._url("/images/get"), params={"names": args.images}, stream=True)
    api._raise_for_status(res)
    write_archive(res, args.output, "save")
    return 0


def write_archive(res: Any, output: str | None, verb: str) -> None:
    """An archive the engine streams (save, export) to ``output``, or to stdout: a file only
    once it is whole (a cut stream leaves no half archive under its name)."""
    import requests.exceptions

    chunks = res.iter_content(1 << 20, decode_unicode=False)
    cut = "the engine stopped sending the archive part-way (its log in the VM, /run/pydesk/engine.log, says why)"
    if not output:
        try:
            for chunk in chunks:
                sys.stdout.buffer.write(chunk)
        except requests.exceptions.ChunkedEncodingError:
            raise Fail(f"failed to {verb}: {cut}") from None
        sys.stdout.flush()
        return
    out = Path(output)
    tmp = out.with_name(f".{out.name}.pydesk-tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, out)
    except requests.exceptions.ChunkedEncodingError:
        tmp.unlink(missing_ok=True)
        raise Fail(f"failed to {verb} to {output}: {cut}") from None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Fail(f"failed to {verb} to {output}: {exc.strerror or exc}") from None


@handles_errors()
def cmd_load(args: argparse.Namespace) -> int:
    client = engine(args)
    with open_input(args.input, "load") as data:
        for ev in client.api.load_image(data, quiet=args.quiet):
            if ev.get("error"):
                raise Fail(ev["error"])
            text = (ev.get("stream") or ev.get("status") or "").rstrip("\n")
            if text:
                print(text, flush=True)
    return 0


def open_input(path: str | None, verb: str) -> IO[bytes]:
    """The archive a command reads (load, import): the file, or stdin when there is none
    or it is ``-`` (not a terminal: nothing would come)."""
    if path and path != "-":
        try:
            return open(path, "rb")
        except OSError as exc:
            raise Fail(f"open {path}: {(exc.strerror or str(exc)).lower()}") from None
    if streams.stdin_is_tty():
        raise Fail(f"requested {verb} from stdin, but stdin is empty")
    return sys.stdin.buffer


# --- containers: create / run ---------------------------------------------------------------
def resource_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The HostConfig limits `run`, `create` and `update` share (-m, --memory-swap, --cpus,
    -c, --pids-limit)."""
    host: dict[str, Any] = {}
    if args.memory:
        host["Memory"] = opts.parse_memory(args.memory)
    if args.memory_swap:
        host["MemorySwap"] = opts.parse_swap(args.memory_swap)
    if args.cpus:
        host["NanoCpus"] = opts.parse_cpus(args.cpus)
    if args.cpu_shares is not None:
        host["CpuShares"] = opts.parse_int(args.cpu_shares, "-c, --cpu-shares")
    if args.pids_limit is not None:
        host["PidsLimit"] = opts.parse_int(args.pids_limit, "--pids-limit")
    return host


def container_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The /containers/create body from run/create flags (pure: unit-tested)."""
    host = resource_limits(args)
    if args.shm_size:
        host["ShmSize"] = opts.parse_bytes(args.shm_size, "--shm-size")
    for flag, key in (("cap_add", "CapAdd"), ("cap_drop", "CapDrop"), ("group_add", "GroupAdd"), ("dns", "Dns"),
                      ("dns_search", "DnsSearch"), ("dns_option", "DnsOptions"),
                      ("security_opt", "SecurityOpt")):  # lists passed as given
        if getattr(args, flag):
            host[key] = list(getattr(args, flag))
    if args.sysctl:
        host["Sysctls"] = opts.parse_pairs(args.sysctl, "--sysctl")
    if args.ulimit:
        host["Ulimits"] = [opts.parse_ulimit(u) for u in args.ulimit]
    if args.tmpfs:
        host["Tmpfs"] = opts.parse_tmpfs(args.tmpfs)
    if args.restart:
        host["RestartPolicy"] = opts.parse_restart(args.restart)
        if args.rm and host["RestartPolicy"]["Name"] != "no":
            raise opts.FlagError("Conflicting options: --restart and --rm")
    if args.rm:
        host["AutoRemove"] = True
    if args.read_only:
        host["ReadonlyRootfs"] = True
    if args.privileged:
        host["Privileged"] = True
    if args.init:
        host["Init"] = True
    if args.network:
        host["NetworkMode"] = args.network
    if args.network_alias or args.ip:
        if not args.network or args.network in ("bridge", "default", "host", "none"):
            raise opts.FlagError("network-scoped aliases and --ip are only supported for user-defined networks")
        endpoint: dict[str, Any] = {}
        if args.network_alias:
            endpoint["Aliases"] = list(args.network_alias)
        if args.ip:
            endpoint["IPAMConfig"] = {"IPv4Address": args.ip}
        cfg_networking = {"EndpointsConfig": {args.network: endpoint}}
    else:
        cfg_networking = None
    if args.add_host:
        host["ExtraHosts"] = [opts.parse_add_host(h) for h in args.add_host]
    if args.publish_all:
        host["PublishAllPorts"] = True
    # -v /path (no source) is an anonymous volume, as docker's CLI sends it: in Config.Volumes
    anonymous = [v for v in args.volume or [] if ":" not in v]
    if binds := [v for v in args.volume or [] if ":" in v]:
        host["Binds"] = binds
    if getattr(args, "mount", None):
        from desktop.files_cli import parse_mount

        host["Mounts"] = [parse_mount(m) for m in args.mount]
    exposed, bindings = opts.parse_publish(args.publish or [])
    if bindings:
        host["PortBindings"] = bindings
    if args.tty and (size := streams.terminal_size()):
        host["ConsoleSize"] = list(size)
    cfg: dict[str, Any] = {
        "Image": args.image,
        "Tty": bool(args.tty),
        "OpenStdin": bool(args.interactive),
        "StdinOnce": bool(args.interactive and not getattr(args, "detach", False)),
        "AttachStdin": bool(args.interactive and not getattr(args, "detach", False)),
        "AttachStdout": not getattr(args, "detach", False),
        "AttachStderr": not getattr(args, "detach", False),
        "HostConfig": host,
    }
    env = opts.build_env(args.env or [], args.env_file or [], environ)
    if env:
        cfg["Env"] = env
    if args.command:
        cfg["Cmd"] = list(args.command)
    if args.entrypoint is not None:
        cfg["Entrypoint"] = [args.entrypoint] if args.entrypoint else [""]
    if args.workdir:
        cfg["WorkingDir"] = args.workdir
    if args.user:
        cfg["User"] = args.user
    if args.hostname:
        cfg["Hostname"] = args.hostname
    if args.label:
        cfg["Labels"] = opts.parse_labels(args.label)
    if args.expose:
        exposed = {**opts.parse_expose(args.expose), **(exposed or {})}
    if exposed:
        cfg["ExposedPorts"] = exposed
    if args.stop_signal:
        cfg["StopSignal"] = args.stop_signal
    if args.stop_timeout is not None:
        cfg["StopTimeout"] = opts.parse_int(args.stop_timeout, "--stop-timeout")
    if anonymous:
        cfg["Volumes"] = {v: {} for v in anonymous}
    if cfg_networking:
        cfg["NetworkingConfig"] = cfg_networking
    return cfg


def _create(client: Any, cfg: dict[str, Any], args: argparse.Namespace) -> str:
    """Create the container; pull the image first if the engine does not have it (as docker)."""
    import docker.errors

    try:
        return client.api.create_container_from_config(cfg, name=args.container_name, platform=args.platform)["Id"]
    except docker.errors.ImageNotFound:
        pass
    print(f"Unable to find image '{full_ref(args.image)}' locally", file=sys.stderr, flush=True)
    try:
        do_pull(client, args.image, platform=args.platform, file=sys.stderr)
    except docker.errors.APIError as exc:
        raise Fail(api_message(exc), opts.EXIT_ENGINE) from None
    except Fail as exc:
        raise Fail(str(exc), opts.EXIT_ENGINE) from None
    return client.api.create_container_from_config(cfg, name=args.container_name, platform=args.platform)["Id"]


def _prepare(args: argparse.Namespace) -> dict[str, Any]:
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    try:
        cfg = container_config(args)
        from desktop.files_cli import current_shares, translate_mounts
        from vmkit.host import host_os

        if (cfg["HostConfig"].get("Binds") or cfg["HostConfig"].get("Mounts")):
            translate_mounts(cfg, current_shares(args.name, host_os()), host_os())
        return cfg
    except VMKitError as exc:
        hint = getattr(exc, "hint", None)
        raise Fail(str(exc) + (f" (hint: {hint})" if hint else ""), opts.EXIT_ENGINE) from None


@handles_errors(opts.EXIT_ENGINE)
def cmd_create(args: argparse.Namespace) -> int:
    args.detach = True
    cfg = _prepare(args)
    client = engine(args, autostart=True)
    print(_create(client, cfg, args))
    return 0


class Waiter:
    """POST /containers/{id}/wait sent *now* (its headers mean the engine has registered it),
    answered later — so a container that exits at once is not missed."""

    def __init__(self, api: Any, cid: str, condition: str) -> None:
        self.res = api._post(api._url("/containers/{0}/wait", cid), params={"condition": condition},
                             stream=True, timeout=None)
        api._raise_for_status(self.res)

    def code(self) -> int:
        body = self.res.json()
        if (body.get("Error") or {}).get("Message"):
            raise Fail(body["Error"]["Message"])
        return int(body.get("StatusCode", 0))


def _start_or_fail(client: Any, cid: str) -> None:
    import docker.errors

    try:
        client.api.start(cid)
    except docker.errors.APIError as exc:
        msg = api_message(exc)
        raise Fail(msg, opts.start_error_exit_code(msg)) from None


class SignalProxy:
    """docker's --sig-proxy: SIGINT/SIGTERM to us are sent on to the container."""

    def __init__(self, api: Any, cid: str) -> None:
        import signal

        self.api, self.cid, self.prev = api, cid, {}
        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.prev[sig] = signal.signal(sig, self._forward)
                except (ValueError, OSError):
                    pass

    def _forward(self, signum: int, frame: object) -> None:
        import signal

        name = signal.Signals(signum).name
        threading.Thread(target=self._kill, args=(name,), daemon=True).start()

    def _kill(self, name: str) -> None:
        try:
            self.api.kill(self.cid, name)
        except Exception:  # the container may be gone already
            pass

    def close(self) -> None:
        import signal

        for sig, prev in self.prev.items():
            signal.signal(sig, prev)


def detach_keys(args: argparse.Namespace, code: int = EXIT_ERROR) -> str | None:
    """``--detach-keys``, checked before anything starts."""
    from agent.detach_keys import DetachKeysError, parse

    spec = getattr(args, "detach_keys", None) or None
    try:
        parse(spec)
    except DetachKeysError as exc:
        raise Fail(str(exc), code) from None
    return spec


def _run_attached(client: Any, cid: str, *, tty: bool, stdin: bool, condition: str,
                  start: bool = True, sig_proxy: bool = True, keys: str | None = None) -> int | None:
    """The container's exit code, or None if the user detached (it runs on)."""
    api = client.api
    h = streams.attach(api, cid, stdin=stdin, detach_keys=keys)
    try:
        waiter = Waiter(api, cid, condition)
        if start:
            _start_or_fail(client, cid)
        proxy = SignalProxy(api, cid) if sig_proxy and not tty else None
        try:
            if streams.stream(h, tty=tty, stdin=stdin, detach_keys=keys):
                return None
        finally:
            if proxy:
                proxy.close()
        return waiter.code()
    finally:
        h.close()


def _detached(code: int | None, *, quiet: bool) -> int:
    """docker's ends of a session the user detached from: `run -it` and `start -ai` return 0
    quietly, `attach` and `exec -it` say so and return 1."""
    if code is not None:
        return code
    if quiet:
        return 0
    print("read escape sequence", file=sys.stderr)
    return EXIT_ERROR


@handles_errors(opts.EXIT_ENGINE)
def cmd_run(args: argparse.Namespace) -> int:
    cfg = _prepare(args)
    keys = detach_keys(args, opts.EXIT_ENGINE)
    if args.tty and args.interactive and not streams.stdin_is_tty():
        raise Fail("the input device is not a TTY", EXIT_ERROR)
    client = engine(args, autostart=True)
    cid = _create(client, cfg, args)
    if args.detach:
        _start_or_fail(client, cid)
        print(cid)
        return 0
    return _detached(_run_attached(client, cid, tty=args.tty, stdin=args.interactive,
                                   condition="removed" if args.rm else "next-exit", sig_proxy=args.sig_proxy,
                                   keys=keys), quiet=True)


# --- containers: lifecycle ------------------------------------------------------------------
@handles_errors()
def cmd_start(args: argparse.Namespace) -> int:
    keys = detach_keys(args)
    client = engine(args)
    if args.attach or args.interactive:
        if len(args.containers) > 1:
            raise Fail("you cannot start and attach multiple containers at once")
        info = client.api.inspect_container(args.containers[0])
        tty = bool(info["Config"].get("Tty"))
        stdin = bool(args.interactive and info["Config"].get("OpenStdin"))
        if tty and stdin and not streams.stdin_is_tty():
            raise Fail("the input device is not a TTY")
        return _detached(_run_attached(client, info["Id"], tty=tty, stdin=stdin, condition="next-exit", keys=keys),
                         quiet=True)

    def start(name: str) -> None:
        client.api.start(name)

    return _each(args.containers, start)


def _post_ok(api: Any, path: str, name: str, params: dict[str, Any], timeout: float | None) -> None:
    res = api._post(api._url(path, name), params=params, timeout=timeout)
    api._raise_for_status(res)


def _stop_like(args: argparse.Namespace, action: str) -> int:
    """`stop` and `restart`: the same flags, the same per-container request."""
    client = engine(args)
    params: dict[str, Any] = {}
    if args.time is not None:
        params["t"] = args.time
    if args.signal:
        params["signal"] = args.signal
    timeout = None if args.time is None or args.time < 0 else args.time + 60
    path = "/containers/{0}/" + action
    return _each(args.containers, lambda n: _post_ok(client.api, path, n, params, timeout))


@handles_errors()
def cmd_stop(args: argparse.Namespace) -> int:
    return _stop_like(args, "stop")


@handles_errors()
def cmd_restart(args: argparse.Namespace) -> int:
    return _stop_like(args, "restart")


@handles_errors()
def cmd_kill(args: argparse.Namespace) -> int:
    client = engine(args)
    return _each(args.containers, lambda n: client.api.kill(n, args.signal))


@handles_errors()
def cmd_pause(args: argparse.Namespace) -> int:
    client = engine(args)
    return _each(args.containers, client.api.pause)


@handles_errors()
def cmd_unpause(args: argparse.Namespace) -> int:
    client = engine(args)
    return _each(args.containers, client.api.unpause)


@handles_errors()
def cmd_update(args: argparse.Namespace) -> int:
    body = resource_limits(args)
    if args.restart:
        body["RestartPolicy"] = opts.parse_restart(args.restart)
    if not body:
        raise Fail("you must provide one or more flags when using this command")
    api = engine(args).api

    def update(name: str) -> None:
        res = api._post_json(api._url("/containers/{0}/update", name), data=body)
        api._raise_for_status(res)

    return _each(args.containers, update)


@handles_errors()
def cmd_rename(args: argparse.Namespace) -> int:
    client = engine(args)
    client.api.rename(args.container, args.new_name)
    return 0


@handles_errors()
def cmd_rm(args: argparse.Namespace) -> int:
    client = engine(args)
    return _each(args.containers, lambda n: client.api.remove_container(n, v=args.volumes, force=args.force))


@handles_errors()
def cmd_wait(args: argparse.Namespace) -> int:
    client = engine(args)
    return _each(args.containers, lambda n: client.api.wait(n)["StatusCode"])


@handles_errors()
def cmd_attach(args: argparse.Namespace) -> int:
    keys = detach_keys(args)
    client = engine(args)
    info = client.api.inspect_container(args.container)
    state = info.get("State") or {}
    if not state.get("Running"):
        raise Fail("You cannot attach to a stopped container, start it first")
    if state.get("Paused"):
        raise Fail("You cannot attach to a paused container, unpause it first")
    tty = bool(info["Config"].get("Tty"))
    stdin = bool(info["Config"].get("OpenStdin")) and not args.no_stdin
    if tty and stdin and not streams.stdin_is_tty():
        raise Fail("the input device is not a TTY")
    return _detached(_run_attached(client, info["Id"], tty=tty, stdin=stdin, condition="not-running", start=False,
                                   sig_proxy=args.sig_proxy, keys=keys), quiet=False)


# --- containers: looking -------------------------------------------------------------------
def _go_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def _ago(now: float, ts: float) -> str:
    return f"{opts.human_duration(now - ts)} ago"


def format_ports(ports: list[dict[str, Any]] | None) -> str:
    out = []
    for p in ports or []:
        proto = p.get("Type") or "tcp"
        if p.get("PublicPort"):
            ip = p.get("IP") or "0.0.0.0"
            ip = f"[{ip}]" if ":" in ip else ip
            out.append(f"{ip}:{p['PublicPort']}->{p.get('PrivatePort')}/{proto}")
        else:
            out.append(f"{p.get('PrivatePort')}/{proto}")
    return ", ".join(dict.fromkeys(out))


def ps_row(c: dict[str, Any], now: float, no_trunc: bool = False) -> dict[str, Any]:
    """One `docker ps --format json` object from a /containers/json entry."""
    cmd = c.get("Command") or ""
    labels = c.get("Labels") or {}
    nets = ((c.get("NetworkSettings") or {}).get("Networks") or {}).keys()
    mounts = c.get("Mounts") or []
    created = int(c.get("Created") or 0)
    return {
        "Command": json.dumps(cmd if no_trunc else opts.truncate(cmd, 20), ensure_ascii=False),
        "CreatedAt": _go_time(created),
        "ID": c.get("Id", "") if no_trunc else c.get("Id", "")[:12],
        "Image": c.get("Image", ""),
        "Labels": ",".join(f"{k}={v}" for k, v in labels.items()),
        "LocalVolumes": str(sum(1 for m in mounts if m.get("Type") == "volume")),
        "Mounts": ",".join(m.get("Name") or m.get("Source", "") for m in mounts),
        "Names": ",".join(n.lstrip("/") for n in c.get("Names") or []),
        "Networks": ",".join(nets),
        "Ports": format_ports(c.get("Ports")),
        "RunningFor": _ago(now, created),
        "Size": "0B",
        "State": c.get("State", ""),
        "Status": c.get("Status", ""),
    }


def _print_formatted(rows: list[dict[str, Any]], fmt: str) -> int:
    template = "{{json .}}" if fmt == "json" else fmt
    if template.startswith("table"):
        template = template[len("table"):].strip()
        heads = [m.group(2) for m in opts._TEMPLATE.finditer(template)]
        print(opts.render_template(template, {h: h.upper() for h in heads}))
    for r in rows:
        try:
            print(opts.render_template(template, r))
        except VMKitError as exc:
            raise Fail(str(exc)) from None
    return 0


@handles_errors()
def cmd_ps(args: argparse.Namespace) -> int:
    client = engine(args)
    limit = 1 if args.latest else (args.last if args.last is not None else -1)
    containers = client.api.containers(all=args.all or limit > 0, filters=opts.filters(args.filter) or None,
                                       limit=limit)
    now = time.time()
    rows = [ps_row(c, now, args.no_trunc) for c in containers]
    if args.quiet:
        for r in rows:
            print(r["ID"])
        return 0
    if args.format:
        return _print_formatted(rows, args.format)
    table = [["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]]
    table += [[r["ID"], r["Image"], r["Command"], r["RunningFor"], r["Status"], r["Ports"], r["Names"]] for r in rows]
    print(opts.table(table))
    return 0


@handles_errors()
def cmd_inspect(args: argparse.Namespace) -> int:
    import docker.errors

    client = engine(args)
    found, failed = [], False
    for name in args.names:
        obj = None
        for kind in ([args.type] if args.type else ["container", "image"]):
            try:
                obj = (client.api.inspect_container if kind == "container" else client.api.inspect_image)(name)
                break
            except docker.errors.NotFound:
                continue
        if obj is None:
            what = f"{args.type}" if args.type else "object"
            print(f"pydesk: error: No such {what}: {name}", file=sys.stderr)
            failed = True
        else:
            found.append(obj)
    if args.format:
        fmt = "{{json .}}" if args.format == "json" else args.format
        for obj in found:
            try:
                print(opts.render_template(fmt, obj))
            except VMKitError as exc:
                raise Fail(str(exc)) from None
    else:
        print(json.dumps(found, indent=4))
    return EXIT_ERROR if failed else 0


def _container_tty(client: Any, name: str) -> tuple[str, bool]:
    info = client.api.inspect_container(name)
    return info["Id"], bool((info.get("Config") or {}).get("Tty"))


@handles_errors()
def cmd_logs(args: argparse.Namespace) -> int:
    client = engine(args)
    api = client.api
    cid, tty = _container_tty(client, args.container)
    params: dict[str, Any] = {"stdout": 1, "stderr": 1, "follow": int(args.follow),
                              "timestamps": int(args.timestamps), "tail": args.tail or "all"}
    try:
        if args.since:
            params["since"] = opts.parse_since(args.since)
        if args.until:
            params["until"] = opts.parse_since(args.until)
    except VMKitError as exc:
        raise Fail(str(exc)) from None
    if args.tail not in (None, "all"):
        try:
            int(args.tail)
        except ValueError:
            raise Fail(f'invalid argument "{args.tail}" for "-n, --tail" flag') from None
    res = api._get(api._url("/containers/{0}/logs", cid), params=params, stream=True, timeout=None)
    api._raise_for_status(res)
    try:
        streams.copy_frames(streams.frames(_raw_reader(res), tty))
    except KeyboardInterrupt:
        return 0
    finally:
        res.close()
    return 0


def _raw_reader(res: Any) -> Callable[[int], bytes]:
    """Exact reads from a (possibly chunked) streaming response body."""
    raw = res.raw

    def read(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = raw.read(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    return read


@handles_errors()
def cmd_exec(args: argparse.Namespace) -> int:
    client = engine(args)
    api = client.api
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise Fail("exec requires at least 2 arguments")
    keys = detach_keys(args)
    if args.tty and args.interactive and not args.detach and not streams.stdin_is_tty():
        raise Fail("the input device is not a TTY")
    try:
        env = opts.build_env(args.env or [], args.env_file or [])
    except VMKitError as exc:
        raise Fail(str(exc)) from None
    ex = api.exec_create(args.container, command, stdout=True, stderr=True, stdin=args.interactive,
                         tty=args.tty, environment=env or None, workdir=args.workdir or None,
                         user=args.user or "", privileged=args.privileged, detach_keys=keys)
    eid = ex["Id"]
    if args.detach:
        api.exec_start(eid, detach=True, tty=args.tty)
        return 0
    h = streams.exec_start(api, eid, tty=args.tty)
    try:
        if streams.stream(h, tty=args.tty, stdin=args.interactive, detach_keys=keys):
            return _detached(None, quiet=False)
    finally:
        h.close()
    for _ in range(50):
        info = api.exec_inspect(eid)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        time.sleep(0.1)
    return int(api.exec_inspect(eid).get("ExitCode") or 0)


# --- system ----------------------------------------------------------------------------------
@handles_errors()
def cmd_system_df(args: argparse.Namespace) -> int:
    client = engine(args)
    df = client.api.df()
    images = df.get("Images") or []
    containers = df.get("Containers") or []
    volumes = df.get("Volumes") or []
    used_images = {c.get("ImageID") for c in containers}
    img_active = [i for i in images if (i.get("Containers") or 0) > 0 or i.get("Id") in used_images]
    img_size = df.get("LayersSize") or sum(i.get("Size") or 0 for i in images)
    img_reclaim = sum(i.get("Size") or 0 for i in images if i not in img_active)
    c_active = [c for c in containers if c.get("State") == "running"]
    c_size = sum(c.get("SizeRw") or 0 for c in containers)
    c_reclaim = sum(c.get("SizeRw") or 0 for c in containers if c not in c_active)

    def vsize(v: dict[str, Any]) -> int:
        return max(0, ((v.get("UsageData") or {}).get("Size") or 0))

    v_active = [v for v in volumes if ((v.get("UsageData") or {}).get("RefCount") or 0) > 0]
    v_size = sum(vsize(v) for v in volumes)
    v_reclaim = sum(vsize(v) for v in volumes if v not in v_active)
    build = df.get("BuildCache") or []
    b_size = sum(b.get("Size") or 0 for b in build)

    def reclaim(n: int, total: int) -> str:
        return f"{opts.human_size(n)} ({round(100 * n / total) if total else 0}%)" if total else opts.human_size(n)

    rows = [
        {"Type": "Images", "TotalCount": str(len(images)), "Active": str(len(img_active)),
         "Size": opts.human_size(img_size), "Reclaimable": reclaim(img_reclaim, img_size)},
        {"Type": "Containers", "TotalCount": str(len(containers)), "Active": str(len(c_active)),
         "Size": opts.human_size(c_size), "Reclaimable": reclaim(c_reclaim, c_size)},
        {"Type": "Local Volumes", "TotalCount": str(len(volumes)), "Active": str(len(v_active)),
         "Size": opts.human_size(v_size), "Reclaimable": reclaim(v_reclaim, v_size)},
        {"Type": "Build Cache", "TotalCount": str(len(build)), "Active": "0",
         "Size": opts.human_size(b_size), "Reclaimable": opts.human_size(b_size)},
    ]
    if args.format:
        return _print_formatted(rows, args.format)
    table = [["TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE"]]
    table += [[r["Type"], r["TotalCount"], r["Active"], r["Size"], r["Reclaimable"]] for r in rows]
    print(opts.table(table))
    return 0


@handles_errors()
def cmd_system_prune(args: argparse.Namespace) -> int:
    filters = opts.filters(args.filter) or None
    if args.volumes and filters and "until" in filters:  # volumes keep no creation time to compare
        raise opts.FlagError('the "until" filter is not supported with "--volumes"')
    client = engine(args)
    api = client.api
    if not args.force:
        what = ["all stopped containers", "all networks not used by at least one container"]
        if args.volumes:
            what.append("all anonymous volumes not used by at least one container")
        what.append("all images without at least one container associated to them" if args.all
                    else "all dangling images")
        if not confirm("WARNING! This will remove:\n" + "".join(f"  - {w}\n" for w in what)):
            return 0
    total = 0
    out = api.prune_containers(filters=filters)
    total += out.get("SpaceReclaimed") or 0
    _section("Deleted Containers", out.get("ContainersDeleted"))
    out = api.prune_networks(filters=filters)
    _section("Deleted Networks", out.get("NetworksDeleted"))
    if args.volumes:
        out = api.prune_volumes(filters=filters)
        total += out.get("SpaceReclaimed") or 0
        _section("Deleted Volumes", out.get("VolumesDeleted"))
    img_filters = dict(filters or {})
    img_filters["dangling"] = ["false" if args.all else "true"]
    out = api.prune_images(filters=img_filters)
    total += out.get("SpaceReclaimed") or 0
    _section("Deleted Images", image_prune_lines(out))
    print(f"Total reclaimed space: {opts.human_size(total)}")
    return 0


def _system_info(args: argparse.Namespace) -> int:
    from desktop.about_cli import cmd_info

    return cmd_info(args)


def confirm(warning: str) -> bool:
    """docker's prune prompt, on stderr; only y or yes goes on."""
    print(warning, file=sys.stderr)
    print("Are you sure you want to continue? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline() if sys.stdin else ""
    return answer.strip().lower() in ("y", "yes")


def image_prune_lines(out: dict[str, Any]) -> list[str]:
    return [f"{k.lower()}: {v}" for item in out.get("ImagesDeleted") or [] for k, v in item.items() if v]


def _section(title: str, items: list[str] | None) -> None:
    if items:
        print(f"{title}:\n" + "\n".join(items) + "\n")


# --- parser ------------------------------------------------------------------------------------
def _container_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--interactive", action="store_true", help="keep STDIN open")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-TTY")
    p.add_argument("-e", "--env", action="append", metavar="KEY[=VALUE]", help="set an environment variable")
    p.add_argument("--env-file", action="append", metavar="FILE", help="read environment variables from a file")
    p.add_argument("-w", "--workdir", help="working directory inside the container")
    p.add_argument("-u", "--user", help="user name or UID[:GID]")
    p.add_argument("--name", dest="container_name", help="assign a name to the container")
    p.add_argument("--entrypoint", help="override the image's ENTRYPOINT")
    p.add_argument("-l", "--label", action="append", metavar="KEY[=VALUE]", help="set metadata")
    p.add_argument("--read-only", action="store_true", help="mount the root filesystem read-only")
    p.add_argument("--init", action="store_true", help="run an init inside the container")
    p.add_argument("--privileged", action="store_true",
                   help="all capabilities and devices, no seccomp profile, writable /sys")
    p.add_argument("-m", "--memory", help="memory limit, e.g. 32m")
    p.add_argument("--cpus", help="number of CPUs, e.g. 1.5")
    p.add_argument("--pids-limit", help="limit the number of processes")
    p.add_argument("--memory-swap", help="memory plus swap limit, e.g. 64m (-1: unlimited swap)")
    p.add_argument("-c", "--cpu-shares", help="relative CPU weight")
    p.add_argument("--shm-size", help="size of /dev/shm, e.g. 128m")
    p.add_argument("--cap-add", action="append", metavar="CAP", help="add a Linux capability (ALL for all)")
    p.add_argument("--cap-drop", action="append", metavar="CAP", help="drop a Linux capability (ALL for all)")
    p.add_argument("--group-add", action="append", metavar="GROUP", help="an additional group (name or GID)")
    p.add_argument("--sysctl", action="append", metavar="KEY=VALUE", help="a namespaced kernel parameter")
    p.add_argument("--security-opt", action="append", metavar="OPT",
                   help="seccomp=unconfined, no-new-privileges[=false] (apparmor= and label= are accepted)")
    p.add_argument("--ulimit", action="append", metavar="NAME=SOFT[:HARD]", help="a resource limit, e.g. nofile=1024")
    p.add_argument("--tmpfs", action="append", metavar="PATH[:OPTIONS]", help="mount a tmpfs, e.g. /run:size=64m")
    p.add_argument("--expose", action="append", metavar="PORT[/PROTO]", help="expose a port without publishing it")
    p.add_argument("--stop-signal", help="the signal that stops the container (default: the image's, or SIGTERM)")
    p.add_argument("--stop-timeout", help="seconds to wait for it to stop before it is killed")
    p.add_argument("--restart", help="no | on-failure[:N] | always | unless-stopped")
    p.add_argument("--network", "--net", dest="network", help="connect to a network")
    p.add_argument("--hostname", help="container host name")
    p.add_argument("-v", "--volume", action="append", metavar="SRC:DST[:OPTS]",
                   help="bind a shared host folder (absolute path) or a named volume")
    p.add_argument("--mount", action="append", metavar="type=bind|volume|tmpfs,source=..,target=..[,readonly]",
                   help="attach a file system mount")
    p.add_argument("-p", "--publish", action="append", metavar="[IP:]HOST:CTR[/PROTO]",
                   help="publish a container's port (on 127.0.0.1 unless IP is given)")
    p.add_argument("-P", "--publish-all", action="store_true", help="publish all exposed ports to random ports")
    p.add_argument("--network-alias", action="append", metavar="ALIAS", help="add a network-scoped alias")
    p.add_argument("--ip", help="IPv4 address on the (user-defined) network")
    p.add_argument("--add-host", action="append", metavar="HOST:IP",
                   help="add a host-to-IP mapping (IP may be host-gateway)")
    p.add_argument("--dns", action="append", metavar="IP", help="set a DNS server")
    p.add_argument("--dns-search", action="append", metavar="DOMAIN", help="set a DNS search domain")
    p.add_argument("--dns-option", action="append", metavar="OPT", help="set a DNS option")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("--platform", help="platform, e.g. linux/amd64")
    p.add_argument("image", help="the image")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments")


def command_adder(sub: Any) -> Callable[..., argparse.ArgumentParser]:
    """``add(name, func, help, **kw)``: a subcommand of ``sub`` that runs ``func``."""
    def add(name: str, func: Callable[[argparse.Namespace], int], help: str, **kw: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p
    return add


def register(sub: Any) -> None:
    """Add the docker-compatible commands to `pydesk`'s subcommands."""
    add = command_adder(sub)
    p = add("run", cmd_run, "create and run a container")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background and print the ID")
    p.add_argument("--sig-proxy", action=argparse.BooleanOptionalAction, default=True,
                   help="send received signals on to the container")
    p.add_argument("--detach-keys", metavar="KEYS", help="the keys that detach from the container's terminal "
                   "(default ctrl-p,ctrl-q)")
    _container_flags(p)
    p = add("create", cmd_create, "create a container")
    _container_flags(p)

    p = add("pull", cmd_pull, "pull an image from a registry")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--platform")
    p.add_argument("image")

    p = add("start", cmd_start, "start stopped containers")
    p.add_argument("-a", "--attach", action="store_true", help="attach output and wait for the exit code")
    p.add_argument("-i", "--interactive", action="store_true", help="attach stdin")
    p.add_argument("--detach-keys", metavar="KEYS", help="the keys that detach from the container's terminal "
                   "(default ctrl-p,ctrl-q)")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    for name, func, help in (("stop", cmd_stop, "stop running containers"),
                             ("restart", cmd_restart, "restart containers")):
        p = add(name, func, help)
        p.add_argument("-t", "--time", "--timeout", dest="time", type=int,
                       help="seconds to wait before killing the container")
        p.add_argument("-s", "--signal", help="signal to send (default: the image's StopSignal)")
        p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("kill", cmd_kill, "kill running containers")
    p.add_argument("-s", "--signal", default="KILL")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("pause", cmd_pause, "freeze all processes of containers")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("unpause", cmd_unpause, "thaw paused containers")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("update", cmd_update, "change a container's limits or restart policy, running or not")
    p.add_argument("-m", "--memory")
    p.add_argument("--memory-swap")
    p.add_argument("--cpus")
    p.add_argument("-c", "--cpu-shares")
    p.add_argument("--pids-limit")
    p.add_argument("--restart")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("rename", cmd_rename, "give a container another name")
    p.add_argument("container", metavar="CONTAINER")
    p.add_argument("new_name", metavar="NEW_NAME")
    p = add("rm", cmd_rm, "remove containers")
    p.add_argument("-f", "--force", action="store_true", help="kill and remove a running container")
    p.add_argument("-v", "--volumes", action="store_true", help="remove anonymous volumes too")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("wait", cmd_wait, "wait for containers to stop, print their exit codes")
    p.add_argument("containers", nargs="+", metavar="CONTAINER")
    p = add("attach", cmd_attach, "attach to a running container")
    p.add_argument("--no-stdin", action="store_true")
    p.add_argument("--sig-proxy", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--detach-keys", metavar="KEYS", help="the keys that detach from the container's terminal "
                   "(default ctrl-p,ctrl-q)")
    p.add_argument("container")

    p = add("ps", cmd_ps, "list containers")
    p.add_argument("-a", "--all", action="store_true", help="show stopped containers too")
    p.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    p.add_argument("-f", "--filter", action="append", metavar="KEY=VALUE")
    p.add_argument("--format", help="json, or a template like '{{.Names}}'")
    p.add_argument("-n", "--last", type=int)
    p.add_argument("-l", "--latest", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p = add("logs", cmd_logs, "show a container's logs")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("-n", "--tail", help="number of lines from the end (default: all)")
    p.add_argument("--since", help="e.g. 10m, or 2024-01-02T13:00:00Z")
    p.add_argument("--until")
    p.add_argument("-t", "--timestamps", action="store_true")
    p.add_argument("container")
    p = add("exec", cmd_exec, "run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("-e", "--env", action="append")
    p.add_argument("--env-file", action="append")
    p.add_argument("-w", "--workdir")
    p.add_argument("-u", "--user")
    p.add_argument("--privileged", action="store_true")
    p.add_argument("--detach-keys", metavar="KEYS", help="the keys that detach from the container's terminal "
                   "(default ctrl-p,ctrl-q)")
    p.add_argument("container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p = add("inspect", cmd_inspect, "low-level information on containers and images (JSON)")
    p.add_argument("-f", "--format", help="json, or a template like '{{.State.ExitCode}}'")
    p.add_argument("--type", choices=["container", "image"])
    p.add_argument("names", nargs="+", metavar="NAME")

    p = add("images", cmd_images, "list images")
    p.add_argument("-a", "--all", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-f", "--filter", action="append", metavar="KEY=VALUE")
    p.add_argument("--format", help="json, or a template like '{{.Repository}}'")
    p.add_argument("--digests", action="store_true")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("repository", nargs="?")
    p = add("rmi", cmd_rmi, "remove images")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("--no-prune", action="store_true")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p = add("tag", cmd_tag, "give an image another name")
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p = add("login", cmd_login, "log in to a registry")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument("server", nargs="?")
    p = add("logout", cmd_logout, "log out from a registry (forget its saved credentials)")
    p.add_argument("server", nargs="?")
    p = add("save", cmd_save, "save images to a tar archive")
    p.add_argument("-o", "--output", metavar="FILE")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p = add("load", cmd_load, "load images from a tar archive")
    p.add_argument("-i", "--input", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true")

    from desktop import files_cli

    files_cli.register(sub)

    system = sub.add_parser("system", help="engine-wide disk usage and cleanup")
    ss = system.add_subparsers(dest="system_command", metavar="ACTION")
    ss.required = True
    p = ss.add_parser("df", help="show the engine's disk usage")
    p.add_argument("--format", help="json, or a template")
    p.set_defaults(func=cmd_system_df)
    p = ss.add_parser("info", help="what the engine runs and has (as `pydesk info`)")
    p.add_argument("-f", "--format", help="json, or a template like '{{.ContainersRunning}}'")
    p.set_defaults(func=_system_info)
    p = ss.add_parser("prune", help="remove stopped containers, unused networks and dangling images")
    p.add_argument("-a", "--all", action="store_true", help="remove all unused images, not just dangling ones")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--volumes", action="store_true")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_system_prune)
