"""The Docker Engine API (a versioned subset) over a unix socket in the guest.

Plain ``http.server`` (the guest has only the standard library; request heads are read by
``agent.http_request``, not ``email.parser``): HTTP/1.1 keep-alive,
chunked streams for pulls, logs and events, and connection hijacking (101 UPGRADED) for
attach and exec with Docker's 8-byte multiplexed framing when there is no TTY.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import queue
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from agent import archive, commit, detach_keys, filters, workers
from agent import logs as logmod
from agent.engine import Engine, EngineError, console_size, familiar, normalize
from agent.http_request import RequestParsing
from agent.store import ImageInUse, StoreError
from agent.volumes import VolumeError

log = logging.getLogger(__name__)

API_VERSION = "1.44"
MIN_API_VERSION = "1.24"
ENGINE_VERSION = "24.0.0+pydesk.0.1"
VERSION_RE = re.compile(r"^/v(\d+\.\d+)(/.*)$")


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxI", stream, len(data)) + data


STREAM_IDS = {"stdin": 0, "stdout": 1, "stderr": 2}
STATS_INTERVAL = 1.0  # seconds between stats samples, as dockerd's collector


class Routes:
    def __init__(self) -> None:
        self.table: list[tuple[str, re.Pattern[str], Callable[..., None]]] = []

    def add(self, method: str, pattern: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
        def deco(fn: Callable[..., None]) -> Callable[..., None]:
            self.table.append((method, re.compile("^" + pattern + "$"), fn))
            return fn
        return deco

    def match(self, method: str, path: str) -> tuple[Callable[..., None] | None, dict[str, str], bool]:
        path_known = False
        for m, rx, fn in self.table:
            mt = rx.match(path)
            if mt:
                path_known = True
                if m == method or (method == "HEAD" and m == "GET"):
                    return fn, {k: urllib.parse.unquote(v) for k, v in mt.groupdict().items()}, True
        return None, {}, path_known


routes = Routes()


class Handler(RequestParsing):
    protocol_version = "HTTP/1.1"
    server_version = "pydesk-engine"
    engine: Engine

    # --- plumbing ---------------------------------------------------------------------
    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s", fmt % args)

    def address_string(self) -> str:
        return "local"

    def version_string(self) -> str:
        return f"Docker/{ENGINE_VERSION} (linux)"

    def send_response(self, code: int, message: str | None = None) -> None:
        self._answered = True  # from here on an error cannot be a response of its own
        super().send_response(code, message)

    def _common_headers(self) -> None:
        self.send_header("Api-Version", API_VERSION)
        self.send_header("Docker-Experimental", "false")
        self.send_header("Ostype", "linux")

    def reply(self, status: int, body: Any = None, content_type: str = "application/json") -> None:
        if body is None:
            data = b""
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode() + b"\n"
        self.send_response(status)
        self._common_headers()
        if data or status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
        # headers and body in one write: each write wakes the client, and under TCG every
        # extra switch back and forth costs milliseconds
        self._headers_buffer.append(b"\r\n")
        if self.command != "HEAD" and data:
            self._headers_buffer.append(data)
        self.flush_headers()

    def error(self, status: int, message: str) -> None:
        self.reply(status, {"message": message})

    def start_stream(self, content_type: str = "application/json", status: int = 200) -> None:
        self.send_response(status)
        self._common_headers()
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes, last: bool = False) -> None:
        """One chunk of a chunked response; with ``last``, the response's end in the same write."""
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" + (b"0\r\n\r\n" if last else b""))
            self.wfile.flush()
        elif last:
            self.end_stream()

    def end_stream(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def hijack(self, content_type: str) -> socket.socket:
        """Answer with 101 (or 200 for clients that did not ask to upgrade) and hand over
        the raw connection."""
        upgrade = "upgrade" in (self.headers.get("Connection") or "").lower()
        if upgrade:
            self.send_response(101, "UPGRADED")
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", "tcp")
        else:
            self.send_response(200)
        self._common_headers()
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        return self.connection

    @property
    def query(self) -> dict[str, str]:
        if self._parsed_query is None:
            self._parsed_query = {k: v[-1] for k, v in urllib.parse.parse_qs(self._query, keep_blank_values=True).items()}
        return self._parsed_query

    def qbool(self, name: str, default: bool = False) -> bool:
        v = self.query.get(name)
        if v is None:
            return default
        return v.lower() in ("1", "true", "yes")

    def qint(self, name: str, default: int | None = None) -> int | None:
        v = self.query.get(name)
        if v in (None, ""):
            return default
        try:
            return int(v)
        except ValueError:
            raise EngineError(400, f"invalid value for {name}: {v}") from None

    def filters(self, accepted: frozenset[str]) -> filters.Filters:
        """The ``filters`` query, refused (400) if it names a key ``accepted`` lacks."""
        return filters.parse(self.query.get("filters"), accepted)

    def body_json(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            raw = self.rfile.read(n)
        elif "chunked" in (self.headers.get("Transfer-Encoding") or ""):
            raw = self._read_chunked()
        else:
            return {}
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            raise EngineError(400, "invalid JSON in request body") from None

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return out
            out += self.rfile.read(size)
            self.rfile.readline()

    def body_stream(self):  # type: ignore[no-untyped-def]
        """The request body as a file-like object (for image load)."""
        n = self.headers.get("Content-Length")
        if n is not None:
            return _Limited(self.rfile, int(n))
        return _Chunked(self.rfile)

    # --- dispatch -----------------------------------------------------------------------
    def _dispatch(self) -> None:
        self._answered = False
        self.engine.housekeeper.request_started()
        url = urllib.parse.urlsplit(self.path)
        self._query = url.query
        self._parsed_query: dict[str, str] | None = None
        path = url.path
        m = VERSION_RE.match(path)
        if m:
            version, path = m.group(1), m.group(2)
            if _vtuple(version) > _vtuple(API_VERSION):
                return self.error(400, f"client version {version} is too new. Maximum supported API version is {API_VERSION}")
            if _vtuple(version) < _vtuple(MIN_API_VERSION):
                return self.error(400, f"client version {version} is too old. Minimum supported API version is "
                                       f"{MIN_API_VERSION}, please upgrade your client to a newer version")
        fn, params, known = routes.match(self.command, path)
        if fn is None:
            return self.error(405 if known else 404, "page not found" if not known else "method not allowed")
        try:
            fn(self, **params)
        except (EngineError, archive.ArchiveError, VolumeError, commit.CommitError) as exc:
            self._safe_error(exc.status, exc.message)
        except ImageInUse as exc:
            self._safe_error(409, str(exc))
        except filters.FilterError as exc:
            self._safe_error(400, str(exc))
        except StoreError as exc:
            self._safe_error(404 if "not found" in str(exc).lower() or "no such" in str(exc).lower() else 500, str(exc))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # an engine bug must still answer in Docker's shape
            log.exception("%s %s failed", self.command, self.path)
            self._safe_error(500, f"internal error: {exc}")

    def _safe_error(self, status: int, message: str) -> None:
        if self._answered:  # a stream was under way: end it unfinished (the client sees it cut
            # short), rather than put a second response inside its body
            log.warning("%s %s failed after its answer began: %s", self.command, self.path, message)
            self.close_connection = True
            return
        try:
            self.error(status, message)
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_DELETE = do_PUT = do_HEAD = _dispatch


class _Limited:
    def __init__(self, f: Any, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


class _Chunked:
    def __init__(self, f: Any) -> None:
        self.f, self.buf, self.eof = f, b"", False

    def read(self, size: int = -1) -> bytes:
        while not self.eof and (size < 0 or len(self.buf) < size):
            n = int(self.f.readline().split(b";")[0].strip() or b"0", 16)
            if n == 0:
                self.f.readline()
                self.eof = True
                break
            self.buf += self.f.read(n)
            self.f.readline()
        if size < 0:
            data, self.buf = self.buf, b""
        else:
            data, self.buf = self.buf[:size], self.buf[size:]
        return data


# --- system -------------------------------------------------------------------------------
@routes.add("GET", "/_ping")
def ping(h: Handler) -> None:
    h.send_response(200)
    h._common_headers()
    h.send_header("Content-Type", "text/plain; charset=utf-8")
    h.send_header("Cache-Control", "no-cache, no-store, must-revalidate")
    h.send_header("Builder-Version", "1")
    h.send_header("Content-Length", "2")
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(b"OK")


def version_info() -> dict[str, Any]:
    uname = os.uname()
    return {
        "Platform": {"Name": "pydesk"},
        "Components": [{"Name": "Engine", "Version": ENGINE_VERSION,
                        "Details": {"ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux",
                                    "Arch": _goarch(), "KernelVersion": uname.release}}],
        "Version": ENGINE_VERSION, "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "pydesk", "GoVersion": f"python{platform.python_version()}", "Os": "linux",
        "Arch": _goarch(), "KernelVersion": uname.release, "BuildTime": "",
    }


def _goarch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


@routes.add("GET", "/version")
def version(h: Handler) -> None:
    h.reply(200, version_info())


@routes.add("GET", "/info")
def info(h: Handler) -> None:
    e = h.engine
    cs = list(e.containers.values())
    mem = int(open("/proc/meminfo").read().split()[1]) * 1024
    running = sum(1 for c in cs if c.running and not c.state.get("Paused"))
    paused = sum(1 for c in cs if c.state.get("Paused"))
    h.reply(200, {
        "ID": "pydesk", "Containers": len(cs), "ContainersRunning": running, "ContainersPaused": paused,
        "ContainersStopped": len(cs) - running - paused, "Images": len(e.store.images()), "Driver": "overlay2",
        "DriverStatus": [["Backing Filesystem", "extfs"]], "Plugins": {"Volume": ["local"], "Network": ["bridge", "host", "null"],
                                                                       "Log": ["json-file"]},
        "MemoryLimit": True, "SwapLimit": True, "CpuCfsPeriod": True, "CpuCfsQuota": True, "CPUShares": True,
        "PidsLimit": True, "IPv4Forwarding": True, "Debug": False, "NFd": len(os.listdir("/proc/self/fd")),
        "NGoroutines": threading.active_count(), "SystemTime": logmod.now_rfc3339(), "LoggingDriver": "json-file",
        "CgroupDriver": "cgroupfs", "CgroupVersion": "2", "NEventsListener": 0, "KernelVersion": os.uname().release,
        "OperatingSystem": "pydesk guest (Debian GNU/Linux 12)", "OSVersion": "12", "OSType": "linux",
        "Architecture": os.uname().machine, "IndexServerAddress": "https://index.docker.io/v1/",
        "RegistryConfig": {"IndexConfigs": {}, "InsecureRegistryCIDRs": ["127.0.0.0/8"], "Mirrors": []},
        "NCPU": os.cpu_count() or 1, "MemTotal": mem, "DockerRootDir": str(e.root), "Name": "pydesk",
        "Labels": [], "ExperimentalBuild": False, "ServerVersion": ENGINE_VERSION,
        "Runtimes": {"crun": {"path": "/usr/bin/crun"}}, "DefaultRuntime": "crun",
        "Swarm": {"NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive", "ControlAvailable": False, "Error": "",
                  "RemoteManagers": None},
        "LiveRestoreEnabled": False, "Isolation": "", "InitBinary": "docker-init",
        "SecurityOptions": ["name=seccomp,profile=builtin", "name=cgroupns"], "Warnings": [],
    })


@routes.add("GET", "/events")
def events(h: Handler) -> None:
    since = h.query.get("since")
    until = h.query.get("until")
    past, q = h.engine.events.subscribe(float(since) if since else None)
    flt = h.filters(None)  # any key, as dockerd's /events
    h.start_stream()
    deadline = float(until) if until else None
    try:
        for ev in past:
            if _event_match(ev, flt):
                h.chunk(json.dumps(ev).encode() + b"\n")
        while deadline is None or time.time() < deadline:
            try:
                ev = q.get(timeout=1 if deadline else 30)
            except queue.Empty:
                continue
            if _event_match(ev, flt):
                h.chunk(json.dumps(ev).encode() + b"\n")
        h.end_stream()
    except OSError:
        pass
    finally:
        h.engine.events.unsubscribe(q)
        h.close_connection = True


def _event_match(ev: dict[str, Any], flt: filters.Filters) -> bool:
    """dockerd's event filters: every key given must pass. For an object type's own key
    (container, network, volume, daemon…) an event passes when its actor's ID or name starts
    with a value, whatever the event's type, as in dockerd."""
    actor = ev["Actor"]
    attrs = actor["Attributes"]
    for k, vs in flt.items():
        if k == "type":
            ok = ev["Type"] in vs
        elif k == "event":
            ok = ev["Action"] in vs
        elif k == "scope":
            ok = ev.get("scope", "local") in vs
        elif k == "image":
            ok = any(_is_image(ev, v) for v in vs)
        elif k == "label":
            ok = filters.labels_match(attrs, vs)
        else:  # container, network, volume, daemon, plugin, node, service, secret, config
            ok = filters.fuzzy(vs, actor["ID"], attrs.get("name"))
        if not ok:
            return False
    return True


def _is_image(ev: dict[str, Any], wanted: str) -> bool:
    """The `image` filter: a container event's image, or an image event's own ID or name."""
    actor = ev["Actor"]
    named = actor["Attributes"].get("image") if ev["Type"] == "container" else actor["Attributes"].get("name")
    ids = [actor["ID"]] if ev["Type"] == "image" else []
    try:
        want = normalize(wanted)
        return (bool(named) and normalize(named) == want) or any(i == wanted or i.split(":")[-1].startswith(wanted) for i in ids)
    except EngineError:
        return False


@routes.add("GET", "/system/df")
def system_df(h: Handler) -> None:
    e = h.engine
    images = [_image_summary(e, i) for i in e.store.images()]
    containers = []
    for c in e.containers.values():
        s = e.summary(c)
        s["SizeRw"] = _du(c.root / "upper")
        containers.append(s)
    h.reply(200, {"LayersSize": sum(i["Size"] for i in images), "Images": images, "Containers": containers,
                  "Volumes": [_volume(e, v) for v in _volumes(e)], "BuildCache": []})


def _du(path: Any) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


@routes.add("POST", "/auth")
def auth(h: Handler) -> None:
    """`docker login`: the engine checks the credentials against the registry (the client
    stores them; pulls then send them in X-Registry-Auth)."""
    import dataclasses

    from agent import reference
    from agent.pull import registry_config
    from agent.registry import AuthError, RegistryClient, RegistryError

    body = h.body_json()
    server = (body.get("serveraddress") or "docker.io").strip()
    host = urllib.parse.urlsplit(server if "://" in server else "//" + server).netloc or server
    if host in ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"):
        host = "docker.io"
    try:
        ref = reference.parse(f"{host}/pydesk/login-check")
    except ValueError as exc:
        raise EngineError(400, f"invalid registry address {server!r}: {exc}") from None
    creds = {"username": body.get("username") or "", "password": body.get("password") or ""}
    config = dataclasses.replace(registry_config(creds, ref), retries=1, connect_timeout=10.0)
    try:
        RegistryClient(config).login(ref)
    except AuthError as exc:
        raise EngineError(401, str(exc)) from None
    except RegistryError as exc:
        raise EngineError(500, str(exc)) from None
    h.reply(200, {"Status": "Login Succeeded", "IdentityToken": ""})


@routes.add("POST", "/build")
def build(h: Handler) -> None:
    h.error(501, "pydesk does not support `docker build` yet")


# --- containers ---------------------------------------------------------------------------
@routes.add("POST", "/containers/create")
def container_create(h: Handler) -> None:
    c = h.engine.create(h.body_json(), h.query.get("name"))
    h.reply(201, {"Id": c.id, "Warnings": []})


@routes.add("GET", "/containers/json")
def container_list(h: Handler) -> None:
    flt = h.filters(filters.CONTAINERS)
    filters.check_containers(flt)
    h.reply(200, h.engine.list(h.qbool("all"), flt, h.qint("limit", -1) or -1))


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/json")
def container_inspect(h: Handler, ref: str) -> None:
    h.reply(200, h.engine.inspect(h.engine.container(ref)))


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/start")
def container_start(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    if c.running:
        return h.reply(304)
    try:
        h.engine.start(c)
    except EngineError:
        # dockerd removes a --rm container that failed to start before it answers, so the
        # client's wait (condition=removed) ends first and it prints only the start error
        deadline = time.monotonic() + 10
        while c.r["HostConfig"].get("AutoRemove") and (not c.removed or _waiters.busy(c.id)) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        raise
    h.reply(204)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/stop")
def container_stop(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    stopped = h.engine.stop(c, h.qint("t"), h.query.get("signal"))
    h.reply(204 if stopped else 304)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/restart")
def container_restart(h: Handler, ref: str) -> None:
    h.engine.restart(h.engine.container(ref), h.qint("t"))
    h.reply(204)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/kill")
def container_kill(h: Handler, ref: str) -> None:
    h.engine.kill(h.engine.container(ref), h.query.get("signal"))
    h.reply(204)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/(?P<action>pause|unpause)")
def container_pause(h: Handler, ref: str, action: str) -> None:
    h.engine.pause(h.engine.container(ref), resume=action == "unpause")
    h.reply(204)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/rename")
def container_rename(h: Handler, ref: str) -> None:
    h.engine.rename(h.engine.container(ref), h.query.get("name") or "")
    h.reply(204)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/update")
def container_update(h: Handler, ref: str) -> None:
    h.reply(200, {"Warnings": h.engine.update(h.engine.container(ref), h.body_json()) or None})


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/changes")
def container_changes(h: Handler, ref: str) -> None:
    h.reply(200, h.engine.changes(h.engine.container(ref)) or None)


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/wait")
def container_wait(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    condition = h.query.get("condition") or "not-running"
    if condition not in ("not-running", "next-exit", "removed"):
        raise EngineError(400, f"invalid condition: {condition}")
    seq = c.exit_seq  # registered before the headers go out, so a fast exit is not missed
    if condition == "not-running" and not (c.running or c.state.get("Restarting")):
        # (already exited: the answer in one write, each of which costs a round through the relay)
        return h.reply(200, {"StatusCode": int(c.state.get("ExitCode") or 0), "Error": None})
    with _waiters.waiting(c.id):
        h.start_stream()
        code = h.engine.wait(c, condition, seq)
        h.chunk(json.dumps({"StatusCode": code, "Error": None}).encode() + b"\n", last=True)


class _Waiters:
    """How many wait requests per container have not been answered yet."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count: dict[str, int] = {}

    @contextlib.contextmanager
    def waiting(self, cid: str):  # type: ignore[no-untyped-def]
        with self.lock:
            self.count[cid] = self.count.get(cid, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.count[cid] -= 1
                if not self.count[cid]:
                    del self.count[cid]

    def busy(self, cid: str) -> bool:
        with self.lock:
            return cid in self.count


_waiters = _Waiters()


@routes.add("DELETE", r"/containers/(?P<ref>[^/]+)")
def container_remove(h: Handler, ref: str) -> None:
    h.engine.remove(h.engine.container(ref), force=h.qbool("force"), volumes=h.qbool("v"))
    h.reply(204)


@routes.add("POST", "/containers/prune")
def container_prune(h: Handler) -> None:
    flt = h.filters(filters.CONTAINER_PRUNE)
    until = filters.until(flt)
    deleted, space = [], 0
    for c in list(h.engine.containers.values()):
        if c.running or c.state.get("Restarting"):
            continue
        if not filters.labels_pass(c.r["Config"].get("Labels"), flt):
            continue
        if until is not None and _created(c.r["Created"]) >= until:
            continue
        space += _du(c.root / "upper")
        h.engine.remove(c)
        deleted.append(c.id)
    h.engine.events.emit("container", "prune", "", {"reclaimed": str(space)})
    h.reply(200, {"ContainersDeleted": deleted or None, "SpaceReclaimed": space})


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/top")
def container_top(h: Handler, ref: str) -> None:
    h.reply(200, h.engine.top(h.engine.container(ref), h.query.get("ps_args") or ""))


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/stats")
def container_stats(h: Handler, ref: str) -> None:
    """As dockerd: a sample a second, each with the one before as its ``precpu_stats``; one
    sample with ``stream=false``, taken a second after a first one (so it has a CPU figure),
    at once with ``one-shot`` too (and no ``precpu_stats``)."""
    c = h.engine.container(ref)
    if not h.qbool("stream", True):
        if h.qbool("one-shot") or not c.running:
            return h.reply(200, h.engine.stats(c))
        first = h.engine.stats(c)
        time.sleep(STATS_INTERVAL)
        return h.reply(200, h.engine.stats(c, first))
    h.start_stream()
    try:
        pre = None
        while True:
            pre = h.engine.stats(c, pre)
            h.chunk(json.dumps(pre).encode() + b"\n")
            if not c.running:
                break
            time.sleep(STATS_INTERVAL)
        h.end_stream()
    except OSError:
        h.close_connection = True


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/resize")
def container_resize(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    proc = h.engine.procs.get(c.id)
    if proc is not None:
        with contextlib.suppress(OSError):
            proc.resize(h.qint("h", 24) or 24, h.qint("w", 80) or 80)
    h.reply(200, b"", "text/plain")


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/logs")
def container_logs(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    stdout, stderr = h.qbool("stdout"), h.qbool("stderr")
    if not stdout and not stderr:
        raise EngineError(400, "You must choose at least one stream")
    tail_s = h.query.get("tail", "all")
    tail = None if tail_s in ("all", "") else int(tail_s)
    since = float(h.query.get("since") or 0)
    until = float(h.query.get("until") or 0)
    ts = h.qbool("timestamps")
    tty = c.tty
    # running when the log was read: whatever it writes after that is followed, even if it
    # has exited by the time those records are sent
    running = c.running or bool(c.state.get("Restarting"))
    try:  # before the answer's head: see LogReader
        reader = logmod.LogReader(c.log_path)
    except OSError as exc:
        raise EngineError(500, f"cannot read the log of {c.name}: {exc}") from exc
    with reader:
        # the head first: docker-py's `run` sends its next request once it has it
        h.start_stream("application/vnd.docker.raw-stream" if tty else "application/vnd.docker.multiplexed-stream")

        def send(rec: dict[str, Any]) -> None:
            data = rec["log"].encode()
            if ts:
                data = rec["time"].encode() + b" " + data
            h.chunk(data if tty else frame(STREAM_IDS[rec["stream"]], data))

        try:
            for rec in reader.records(stdout=stdout, stderr=stderr, tail=tail, since=since, until=until):
                send(rec)
            if h.qbool("follow") and running:
                for rec in reader.follow(lambda: c.running or bool(c.state.get("Restarting")), c.logfile,
                                         stdout, stderr):
                    send(rec)
            h.end_stream()
        except OSError as exc:  # the client went away, mostly
            log.debug("sending the log of %s stopped: %s", c.name, exc)
            h.close_connection = True


@routes.add("POST", r"/containers/(?P<ref>[^/]+)/attach")
def container_attach(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    want = {s for s in ("stdout", "stderr") if h.qbool(s)}
    use_stdin = h.qbool("stdin")
    tty = c.tty
    if c.logfile is None:
        from agent.logs import LogFile

        c.logfile = LogFile(c.log_path)
    keys = _detach_keys(h.query.get("detachKeys")) if use_stdin and tty else b""
    sub = c.logfile.subscribe()
    sock = h.hijack("application/vnd.docker.raw-stream" if tty else "application/vnd.docker.multiplexed-stream")
    if use_stdin:
        threading.Thread(target=_pump_stdin, daemon=True, kwargs={
            "h": h, "target": lambda: h.engine.procs.get(c.id), "keys": keys,
            "close_stdin": bool(c.r["Config"].get("StdinOnce")), "on_end": lambda: sub.put(None)}).start()
    try:
        if h.qbool("logs"):
            for rec in logmod.read_logs(c.log_path, stdout="stdout" in want, stderr="stderr" in want):
                data = rec["log"].encode()
                sock.sendall(data if tty else frame(STREAM_IDS[rec["stream"]], data))
        if h.qbool("stream", True):
            while True:
                item = sub.get()
                if item is None:
                    break
                stream, data = item
                if stream in want:
                    sock.sendall(data if tty else frame(STREAM_IDS[stream], data))
    except OSError:
        pass
    finally:
        if c.logfile is not None:
            c.logfile.unsubscribe(sub)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def _detach_keys(spec: str | None) -> bytes:
    try:
        return detach_keys.parse(spec)
    except detach_keys.DetachKeysError as exc:
        raise EngineError(400, f"Invalid detach keys ({spec}) provided: {exc}") from None


def _pump_stdin(h: Handler, target: Callable[[], Any], *, keys: bytes = b"", close_stdin: bool = True,
                on_end: Callable[[], None] | None = None) -> None:
    """Client input (after the hijack) to the process's stdin, until the client's input ends.

    A terminal session (``keys``, the detach sequence, given) ends there, as Docker's does:
    at the sequence or at the end of the input, ``on_end`` ends its output too, and the
    process keeps its terminal. Otherwise the end of the input closes the process's stdin if
    ``close_stdin`` (an exec; a container's only with StdinOnce, as Docker)."""
    proc = None
    for _ in range(300):  # attach comes before start: wait for the process
        proc = target()
        if proc is not None:
            break
        time.sleep(0.05)
    scanner = detach_keys.Scanner(keys) if keys else None
    try:
        while True:
            data = h.rfile.read1(65536)
            if not data:
                break
            detached = False
            if scanner is not None:
                data, detached = scanner.feed(data)
            if proc is None:
                proc = target()
            if proc is not None and data:
                proc.write_stdin(data)
            if detached:
                log.debug("detach keys: the session ends, the process runs on")
                break
    except (OSError, ValueError):
        pass
    finally:
        if scanner is not None:
            if on_end is not None:
                on_end()
        elif proc is not None and close_stdin:
            proc.close_stdin()


# --- exec -----------------------------------------------------------------------------------
@routes.add("POST", r"/containers/(?P<ref>[^/]+)/exec")
def exec_create(h: Handler, ref: str) -> None:
    body = h.body_json()
    if "detachKeys" in body:  # docker-py's spelling (Go's JSON matches names in any case)
        body.setdefault("DetachKeys", body.pop("detachKeys"))
    if body.get("DetachKeys"):
        _detach_keys(body["DetachKeys"])
    e = h.engine.exec_create(h.engine.container(ref), body)
    h.reply(201, {"Id": e.id})


@routes.add("POST", r"/exec/(?P<eid>[^/]+)/start")
def exec_start(h: Handler, eid: str) -> None:
    e = h.engine.execs.get(eid)
    if e is None:
        raise EngineError(404, f"No such exec instance: {eid}")
    body = h.body_json()
    if e.running or e.exit_code is not None:
        raise EngineError(409, f"exec {eid} has already started")
    tty = bool(e.config.get("Tty") or body.get("Tty"))
    size = console_size(body.get("ConsoleSize"))
    keys = _detach_keys(e.config.get("DetachKeys")) if tty and e.config.get("AttachStdin") else b""
    if body.get("Detach"):
        h.engine.exec_start(e, lambda s, d: None, size)
        return h.reply(200, b"", "application/json")
    out: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
    proc = h.engine.exec_start(e, lambda s, d: out.put((s, d)), size)
    sock = h.hijack("application/vnd.docker.raw-stream" if tty else "application/vnd.docker.multiplexed-stream")
    if e.config.get("AttachStdin"):
        threading.Thread(target=_pump_stdin, daemon=True, kwargs={
            "h": h, "target": lambda: proc, "keys": keys, "on_end": lambda: out.put(None)}).start()

    def closer() -> None:
        e.done.wait()
        out.put(None)

    threading.Thread(target=closer, daemon=True).start()
    try:
        while (item := out.get()) is not None:
            stream, data = item
            sock.sendall(data if tty else frame(STREAM_IDS[stream], data))
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


@routes.add("POST", r"/exec/(?P<eid>[^/]+)/resize")
def exec_resize(h: Handler, eid: str) -> None:
    e = h.engine.execs.get(eid)
    if e is None:
        raise EngineError(404, f"No such exec instance: {eid}")
    if e.process is not None:
        with contextlib.suppress(OSError):
            e.process.resize(h.qint("h", 24) or 24, h.qint("w", 80) or 80)
    h.reply(200, b"", "text/plain")


@routes.add("GET", r"/exec/(?P<eid>[^/]+)/json")
def exec_inspect(h: Handler, eid: str) -> None:
    e = h.engine.execs.get(eid)
    if e is None:
        raise EngineError(404, f"No such exec instance: {eid}")
    h.reply(200, e.inspect())


# --- images ---------------------------------------------------------------------------------
def _image_summary(e: Engine, img: Any) -> dict[str, Any]:
    return {
        "Id": img.id, "ParentId": "", "RepoTags": [familiar(t) for t in img.tags] or None,
        "RepoDigests": [familiar(d.split("@")[0]) + "@" + d.split("@")[1] for d in img.digests] or None,
        "Created": int(_created(img.created)), "Size": img.size, "VirtualSize": img.size, "SharedSize": -1,
        "Labels": (img.config.get("config") or {}).get("Labels") or {}, "Containers":
            sum(1 for c in e.containers.values() if c.r["Image"] == img.id),
    }


def _created(value: str) -> float:
    try:
        return logmod.parse_time(value[:26].rstrip("Z") + "Z" if "." in value else value)
    except ValueError:
        return 0.0


@routes.add("GET", "/images/json")
def image_list(h: Handler) -> None:
    flt = h.filters(filters.IMAGES)
    refs = flt.get("reference") or []
    # before/since name images (their creation times bound the list); until is a time
    before = min((_created(h.engine.image(r).created) for r in flt.get("before") or ()), default=None)
    since = max((_created(h.engine.image(r).created) for r in flt.get("since") or ()), default=None)
    until = filters.until(flt)
    dangling = filters.boolean(flt, "dangling")
    out = []
    for img in h.engine.store.images():
        if dangling is not None and dangling == bool(img.tags):
            continue
        created = _created(img.created)
        if ((before is not None and created >= before) or (since is not None and created <= since)
                or (until is not None and created > until)):
            continue
        summary = _image_summary(h.engine, img)
        if refs:
            tags = [t for t in summary["RepoTags"] or [] if any(_reference_match(t, r) for r in refs)]
            if not tags:
                continue
            summary["RepoTags"] = tags
        if not filters.labels_pass(summary["Labels"], flt):
            continue
        out.append(summary)
    h.reply(200, out)


def _reference_match(tag: str, pattern: str) -> bool:
    """Docker's `reference` filter: ``repo`` matches every tag of the repository, ``repo:tag``
    only that tag; both may use shell-style wildcards."""
    import fnmatch

    repo, _, _ = tag.rpartition(":")
    if fnmatch.fnmatchcase(tag, pattern):
        return True
    return ":" not in pattern.rsplit("/", 1)[-1] and fnmatch.fnmatchcase(repo, pattern)


@routes.add("GET", r"/images/(?P<name>.+)/json")
def image_inspect(h: Handler, name: str) -> None:
    img = h.engine.image(name)
    cfg = img.config
    h.reply(200, {
        "Id": img.id, "RepoTags": [familiar(t) for t in img.tags], "RepoDigests": [
            familiar(d.split("@")[0]) + "@" + d.split("@")[1] for d in img.digests],
        "Parent": "", "Comment": cfg.get("comment", ""), "Container": cfg.get("container", ""),
        "Created": img.created or cfg.get("created", ""), "DockerVersion": "",
        "Author": cfg.get("author", ""), "Config": cfg.get("config") or {}, "Architecture": cfg.get("architecture", ""),
        "Variant": cfg.get("variant"), "Os": cfg.get("os", "linux"), "Size": img.size, "VirtualSize": img.size,
        "GraphDriver": {"Name": "overlay2", "Data": {"LowerDir": ":".join(str(p) for p in img.lower_dirs)}},
        "RootFS": {"Type": "layers", "Layers": img.diff_ids}, "Metadata": {"LastTagTime": ZERO},
    })


ZERO = "0001-01-01T00:00:00Z"


@routes.add("GET", r"/images/(?P<name>.+)/history")
def image_history(h: Handler, name: str) -> None:
    img = h.engine.image(name)
    hist = img.config.get("history") or []
    sizes = []  # each layer's unpacked size, bottom first
    for chain in img.chain_ids:
        try:
            sizes.append(int(h.engine.store.layer_meta(chain).get("tar_size") or 0))
        except (StoreError, ValueError, OSError):
            sizes.append(0)
    made = iter(sizes)  # the steps that made a layer take the layers' sizes, in order
    steps = [(entry, 0 if entry.get("empty_layer") else next(made, 0)) for entry in hist]
    out = []
    for i, (entry, size) in enumerate(reversed(steps)):
        out.append({"Id": img.id if i == 0 else "<missing>", "Created": int(_created(entry.get("created", ""))),
                    "CreatedBy": entry.get("created_by", ""), "Tags": [familiar(t) for t in img.tags] if i == 0 else None,
                    "Size": size, "Comment": entry.get("comment", "")})
    h.reply(200, out)


@routes.add("POST", r"/images/(?P<name>.+)/tag")
def image_tag(h: Handler, name: str) -> None:
    img = h.engine.image(name)
    repo = h.query.get("repo") or ""
    tag = h.query.get("tag") or "latest"
    h.engine.store.tag(img.id, normalize(f"{repo}:{tag}"))
    h.engine.events.emit("image", "tag", img.id, {"name": f"{repo}:{tag}"})
    h.reply(201)


@routes.add("DELETE", r"/images/(?P<name>.+)")
def image_remove(h: Handler, name: str) -> None:
    img = h.engine.image(name)
    ref = name if name.startswith("sha256:") or img.id.split(":")[1].startswith(name) else normalize(name)
    users = [] if h.qbool("force") else h.engine.image_users(img.id)
    if users:
        if ref == img.id or name == img.id or img.id.split(":")[1].startswith(name) or len(img.tags) <= 1:
            raise EngineError(409, f"conflict: unable to remove repository reference \"{name}\" (must force) - "
                                   f"container {users[0].id[:12]} is using its referenced image {img.short_id}")
    result = h.engine.store.remove_image(ref, force=h.qbool("force"))
    for r in result:
        for k in ("Untagged",):
            if k in r and "@" not in r[k]:
                r[k] = familiar(r[k])
    h.engine.events.emit("image", "delete", img.id, {"name": name})
    h.reply(200, result)


@routes.add("POST", "/images/prune")
def image_prune(h: Handler) -> None:
    flt = h.filters(filters.IMAGE_PRUNE)
    dangling = filters.boolean(flt, "dangling") is not False  # dangling only, unless dangling=false
    images = h.engine.store.images()
    until = filters.until(flt)
    only = None
    if until is not None or flt.get("label") or flt.get("label!"):
        only = {i.id for i in images
                if (until is None or _created(i.created) < until)
                and filters.labels_pass((i.config.get("config") or {}).get("Labels"), flt)}
    space = h.engine.store.prune(dangling_only=dangling, only=only)
    after = {i.id for i in h.engine.store.images()}
    deleted: list[dict[str, str]] = []
    for img in sorted((i for i in images if i.id not in after), key=lambda i: i.id):
        deleted += [{"Untagged": familiar(t)} for t in img.tags]
        deleted.append({"Deleted": img.id})
        h.engine.events.emit("image", "delete", img.id, {"name": img.id})
    h.engine.events.emit("image", "prune", "", {"reclaimed": str(space)})
    h.reply(200, {"ImagesDeleted": deleted or None, "SpaceReclaimed": space})


@routes.add("POST", "/images/create")
def image_create(h: Handler) -> None:
    from agent.pull import pull

    image = h.query.get("fromImage") or ""
    tag = h.query.get("tag") or ""
    if h.query.get("fromSrc"):
        return _image_import(h)
    if not image:
        raise EngineError(400, "fromImage is required")
    ref = image if "@" in image or not tag else f"{image}{'@' if tag.startswith('sha256:') else ':'}{tag}"
    auth = _decode_auth(h.headers.get("X-Registry-Auth"))
    held: list[dict[str, Any]] = []  # "Pulling from" waits until the registry has answered
    started = False
    one_at_a_time = threading.Lock()  # layers download (and report) on threads of their own

    def send(msg: dict[str, Any]) -> None:
        h.chunk(json.dumps(msg).encode() + b"\r\n")

    def emit(msg: dict[str, Any]) -> None:
        with one_at_a_time:
            _emit(msg)

    def _emit(msg: dict[str, Any]) -> None:
        nonlocal started
        if not started:
            if "error" in msg:  # failed before any progress: a plain HTTP error, as dockerd answers
                raise _PullFailed(msg["error"])
            if msg.get("status", "").startswith("Pulling from") and not held:
                held.append(msg)
                return
            h.start_stream()
            started = True
            for m in held:
                send(m)
        send(msg)

    try:
        pull(h.engine, ref, h.query.get("platform") or None, auth, emit)
    except _PullFailed as exc:
        low = str(exc).lower()
        status = 404 if any(w in low for w in ("not found", "unknown", "denied", "does not exist")) else 500
        return h.error(status, str(exc))
    except OSError:
        h.close_connection = True
        return
    if not started:
        h.start_stream()
        for m in held:
            send(m)
    h.end_stream()


class _PullFailed(Exception):
    pass


def _decode_auth(header: str | None) -> dict[str, str] | None:
    if not header:
        return None
    import base64

    try:
        pad = "=" * (-len(header) % 4)
        data = json.loads(base64.urlsafe_b64decode(header + pad))
        return data if isinstance(data, dict) else None
    except ValueError:
        return None


def _image_import(h: Handler) -> None:
    """`docker import`: the body's tar (plain or compressed) as a one-layer image."""
    if h.query.get("fromSrc") != "-":
        raise EngineError(400, "importing from a URL is not supported: the VM reaches no outside address; "
                               "download the file and import it from there")
    repo, tag = h.query.get("repo") or "", h.query.get("tag") or ""
    ref = _new_ref(repo, tag)
    image_id = commit.import_image(h.engine.store, h.body_stream(), tag=ref, message=h.query.get("message") or "",
                                   change_list=_all(h, "changes"), platform=h.query.get("platform"))
    h.engine.events.emit("image", "import", image_id, {"name": familiar(ref) if ref else image_id})
    h.start_stream()
    h.chunk(json.dumps({"status": image_id}).encode() + b"\r\n")
    h.end_stream()


def _new_ref(repo: str, tag: str) -> str | None:
    """The reference a commit or an import is to be tagged with (``repo`` may hold the tag)."""
    if not repo:
        if tag:
            raise EngineError(400, "a tag needs a repository name")
        return None
    return normalize(f"{repo}:{tag}" if tag else repo)


def _all(h: Handler, name: str) -> list[str]:
    """Every value of a query parameter given more than once (`changes`)."""
    return urllib.parse.parse_qs(h._query).get(name) or []


@routes.add("POST", "/commit")
def container_commit(h: Handler) -> None:
    c = h.engine.container(h.query.get("container") or "")
    ref = _new_ref(h.query.get("repo") or "", h.query.get("tag") or "")
    body = h.body_json()
    image_id = commit.commit(h.engine, c, tag=ref, comment=h.query.get("comment") or "",
                             author=h.query.get("author") or "", change_list=_all(h, "changes"),
                             overrides=body if isinstance(body, dict) else None, pause=h.qbool("pause", True))
    h.engine.events.emit("container", "commit", c.id, h.engine.actor(
        c, comment=h.query.get("comment") or "", imageID=image_id, imageRef=familiar(ref) if ref else ""))
    h.reply(201, {"Id": image_id})


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/export")
def container_export(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    with h.engine.container_root(c, own_view=False) as root:
        h.start_stream("application/x-tar")
        out = _ChunkWriter(h)
        try:
            archive.write_tree(root, out)
        except OSError as exc:  # the headers are out: all we can do is cut the stream
            log.warning("export of %s failed mid-stream: %s", c.name, exc)
            h.close_connection = True
            return
        out.flush()
        h.end_stream()
    h.engine.events.emit("container", "export", c.id, h.engine.actor(c))


@routes.add("GET", r"/images/(?P<name>.+)/get")
def image_get_one(h: Handler, name: str) -> None:
    _save(h, [name])


@routes.add("GET", "/images/get")
def image_get(h: Handler) -> None:
    names = urllib.parse.parse_qs(h._query).get("names") or []
    _save(h, names)


def _save(h: Handler, names: list[str]) -> None:
    refs = []
    for n in names:
        img = h.engine.image(n)
        refs.append(n if n.startswith("sha256:") or img.id.split(":")[1].startswith(n) else normalize(n))
    h.start_stream("application/x-tar")

    class Out:
        def write(self, data: bytes) -> int:
            h.chunk(bytes(data))
            return len(data)

        def flush(self) -> None:
            pass

    h.engine.store.save(refs, Out())  # type: ignore[arg-type]
    h.end_stream()


@routes.add("POST", "/images/load")
def image_load(h: Handler) -> None:
    ids = h.engine.store.load(h.body_stream(), normalize=normalize)  # type: ignore[arg-type]
    lines = []
    for i in ids:
        img = h.engine.store.image(i)
        for t in img.tags or [img.id]:
            lines.append({"stream": f"Loaded image: {familiar(t)}\n" if t != img.id else f"Loaded image ID: {img.id}\n"})
    h.start_stream()
    for line in lines:
        h.chunk(json.dumps(line).encode() + b"\n")
    h.end_stream()


# --- networks ---------------------------------------------------------------------------------
def _network_json(e: Engine, net: Any) -> dict[str, Any]:
    r = dict(net.r)
    r["Containers"] = {}
    for c in e.containers.values():
        ep = c.r["NetworkSettings"]["Networks"].get(net.name)
        if ep and c.running and ep.get("IPAddress"):
            r["Containers"][c.id] = {"Name": c.name, "EndpointID": ep.get("EndpointID", ""),
                                     "MacAddress": ep.get("MacAddress", ""),
                                     "IPv4Address": f"{ep['IPAddress']}/{ep.get('IPPrefixLen', 16)}", "IPv6Address": ""}
    return r


@routes.add("GET", "/networks")
def network_list(h: Handler) -> None:
    match = _network_filter(h.filters(filters.NETWORKS))
    nets = [_network_json(h.engine, n) for n in h.engine.networks.nets.values()]
    nets += [_pseudo_net("host"), _pseudo_net("none")]
    h.reply(200, [n for n in nets if match(n)])


_PREDEFINED = ("bridge", "host", "none")


def _network_filter(flt: filters.Filters) -> Callable[[dict[str, Any]], bool]:
    """dockerd's network filters, checked once: name and id by substring, driver and scope
    exactly, labels, ``dangling`` (not predefined, no container) and ``type`` (builtin or
    custom). Their refusals are worded as dockerd's."""
    for v in flt.get("type") or ():
        if v not in ("builtin", "custom"):
            raise filters.FilterError(f"invalid filter: 'type'='{v}'")
    values = flt.get("dangling") or []
    if len(values) > 1:
        raise filters.FilterError('got more than one value for filter key "dangling"')
    if values and values[0] not in ("0", "false", "1", "true"):
        raise filters.FilterError('invalid value for filter \'dangling\', must be "true" (or "1"), or "false" (or "0")')
    dangling = values[0] in ("1", "true") if values else None

    def match(n: dict[str, Any]) -> bool:
        builtin = n["Name"] in _PREDEFINED
        return ((not flt.get("name") or any(v in n["Name"] for v in flt["name"]))
                and (not flt.get("id") or any(v in n["Id"] for v in flt["id"]))
                and (not flt.get("driver") or n["Driver"] in flt["driver"])
                and (not flt.get("scope") or n["Scope"] in flt["scope"])
                and filters.labels_match(n.get("Labels"), flt.get("label") or ())
                and (dangling is None or dangling == (not builtin and not n["Containers"]))
                and (not flt.get("type") or ("builtin" if builtin else "custom") in flt["type"]))
    return match


def _pseudo_net(name: str) -> dict[str, Any]:
    import hashlib

    return {"Name": name, "Id": hashlib.sha256(f"pydesk-network-{name}".encode()).hexdigest(), "Created": ZERO,
            "Scope": "local",
            "Driver": "host" if name == "host" else "null", "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None, "Config": []}, "Internal": False, "Attachable": False,
            "Ingress": False, "ConfigFrom": {"Network": ""}, "ConfigOnly": False, "Containers": {}, "Options": {},
            "Labels": {}}


@routes.add("GET", r"/networks/(?P<ref>[^/]+)")
def network_inspect(h: Handler, ref: str) -> None:
    for pseudo in ("host", "none"):
        if ref == pseudo or (len(ref) >= 12 and _pseudo_net(pseudo)["Id"].startswith(ref)):
            return h.reply(200, _pseudo_net(pseudo))
    try:
        h.reply(200, _network_json(h.engine, h.engine.networks.get(ref)))
    except KeyError:
        raise EngineError(404, f"network {ref} not found") from None


@routes.add("POST", "/networks/create")
def network_create(h: Handler) -> None:
    body = h.body_json()
    name = body.get("Name") or ""
    if not name:
        raise EngineError(400, "network name is required")
    if (body.get("Driver") or "bridge") != "bridge":
        raise EngineError(400, f"plugin \"{body.get('Driver')}\" not found")
    cfg = ((body.get("IPAM") or {}).get("Config") or [{}])
    subnet = (cfg[0] or {}).get("Subnet") if cfg else None
    try:
        net = h.engine.networks.create(name, subnet, bool(body.get("Internal")), body.get("Labels") or {})
    except ValueError as exc:
        raise EngineError(409 if "already exists" in str(exc) else 400, str(exc)) from None
    h.engine.network_event("create", net)
    h.reply(201, {"Id": net.id, "Warning": ""})


@routes.add("DELETE", r"/networks/(?P<ref>[^/]+)")
def network_remove(h: Handler, ref: str) -> None:
    if ref in ("host", "none", "bridge"):
        raise EngineError(403, f"{ref} is a pre-defined network and cannot be removed")
    try:
        net = h.engine.networks.get(ref)
    except KeyError:
        raise EngineError(404, f"network {ref} not found") from None
    h.engine.housekeeper.expedite()  # exited containers' addresses on it are released first
    users = [c.name for c in h.engine.containers.values() if net.name in c.r["NetworkSettings"]["Networks"] and c.running]
    if users:
        raise EngineError(403, f"error while removing network: network {net.name} id {net.id} has active endpoints")
    try:
        h.engine.networks.remove(net)
    except (RuntimeError, PermissionError) as exc:
        raise EngineError(403, str(exc)) from None
    h.engine.network_event("destroy", net)
    h.reply(204)


@routes.add("POST", "/networks/prune")
def network_prune(h: Handler) -> None:
    """Unused user-defined networks go: kept while any container, even a stopped one, names
    it (dockerd keeps only those with a running container's endpoint, so a stopped container
    could not start again)."""
    flt = h.filters(filters.NETWORK_PRUNE)
    until = filters.until(flt)
    h.engine.housekeeper.expedite()
    removed = []
    for net in list(h.engine.networks.nets.values()):
        if until is not None and _created(net.r["Created"]) > until:
            continue
        if not filters.labels_pass(net.r.get("Labels"), flt):
            continue
        if net.user_defined and not any(net.name in c.r["NetworkSettings"]["Networks"] for c in h.engine.containers.values()):
            h.engine.networks.remove(net)
            h.engine.network_event("destroy", net)
            removed.append(net.name)
    h.engine.events.emit("network", "prune", "", {"reclaimed": "0"})
    h.reply(200, {"NetworksDeleted": removed or None})


@routes.add("POST", r"/networks/(?P<ref>[^/]+)/(?P<action>connect|disconnect)")
def network_connect(h: Handler, ref: str, action: str) -> None:
    body = h.body_json()
    try:
        net = h.engine.networks.get(ref)
    except KeyError:
        raise EngineError(404, f"network {ref} not found") from None
    c = h.engine.container(body.get("Container") or "")
    if action == "connect":
        h.engine.connect(c, net, body.get("EndpointConfig") or {})
    else:
        h.engine.disconnect(c, net)
    h.reply(200, b"", "text/plain")


# --- volumes (agent/volumes.py) and archives for cp (agent/archive.py) --------------------------
def _volumes(e: Engine) -> list[str]:
    return e.volumes.names()


def _volume(e: Engine, name: str) -> dict[str, Any]:
    return e.volumes.inspect(name, ref_count=len(e.volume_users(name)), size=True)


@routes.add("GET", "/volumes")
def volume_list(h: Handler) -> None:
    e, flt = h.engine, h.filters(filters.VOLUMES)
    dangling = filters.boolean(flt, "dangling")
    out = []
    for name in e.volumes.names():
        v = e.volumes.inspect(name)
        if flt.get("name") and not any(n in name for n in flt["name"]):
            continue
        if dangling is not None and dangling == bool(e.volume_users(name)):
            continue
        if not filters.labels_match(v["Labels"], flt.get("label") or ()):
            continue
        if flt.get("driver") and "local" not in flt["driver"]:
            continue
        out.append(v)
    h.reply(200, {"Volumes": out, "Warnings": []})


@routes.add("POST", "/volumes/create")
def volume_create(h: Handler) -> None:
    body = h.body_json()
    existed = bool(body.get("Name")) and h.engine.volumes.exists(body["Name"])
    v = h.engine.volumes.create(body.get("Name") or None, labels=body.get("Labels"), options=body.get("DriverOpts"),
                                driver=body.get("Driver"))
    if not existed:
        h.engine.events.emit("volume", "create", v["Name"], {"driver": "local"})
    h.reply(201, v)


@routes.add("GET", r"/volumes/(?P<name>[^/]+)")
def volume_inspect(h: Handler, name: str) -> None:
    h.reply(200, h.engine.volumes.inspect(name))


@routes.add("DELETE", r"/volumes/(?P<name>[^/]+)")
def volume_remove(h: Handler, name: str) -> None:
    h.engine.volumes.remove(name, h.engine.volume_users(name), force=h.qbool("force"))
    h.engine.events.emit("volume", "destroy", name, {"driver": "local"})
    h.reply(204)


@routes.add("POST", "/volumes/prune")
def volume_prune(h: Handler) -> None:
    e, flt = h.engine, h.filters(filters.VOLUME_PRUNE)
    with e.lock:
        used = {m.get("Name") for c in e.containers.values() for m in c.r.get("Mounts") or [] if m.get("Name")}
    everything = (flt.get("all") or ["false"])[0].lower() in ("1", "true")
    deleted, space = e.volumes.prune(used, everything, lambda labels: filters.labels_pass(labels, flt))
    for name in deleted:
        e.events.emit("volume", "destroy", name, {"driver": "local"})
    e.events.emit("volume", "prune", "", {"reclaimed": str(space)})
    h.reply(200, {"VolumesDeleted": deleted or None, "SpaceReclaimed": space})


def _archive_path(h: Handler) -> str:
    path = h.query.get("path")
    if not path:
        raise EngineError(400, "bad parameter: path cannot be empty")
    return path


@routes.add("HEAD", r"/containers/(?P<ref>[^/]+)/archive")
def archive_head(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    with h.engine.container_root(c) as root:
        info = archive.path_stat(root, _archive_path(h))
    h.send_response(200)
    h._common_headers()
    h.send_header("X-Docker-Container-Path-Stat", archive.stat_header(info))
    h.send_header("Content-Length", "0")
    h.end_headers()


@routes.add("GET", r"/containers/(?P<ref>[^/]+)/archive")
def archive_get(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    path = _archive_path(h)
    with h.engine.container_root(c) as root:
        info = archive.path_stat(root, path)
        h.send_response(200)
        h._common_headers()
        h.send_header("X-Docker-Container-Path-Stat", archive.stat_header(info))
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        out = _ChunkWriter(h)
        try:
            archive.write_tar(root, path, out)
        except (archive.ArchiveError, OSError) as exc:  # the headers are out: all we can do is cut the stream
            log.warning("cp from %s:%s failed mid-stream: %s", c.name, path, exc)
            h.close_connection = True
            return
        out.flush()
        h.end_stream()


class _ChunkWriter:
    """A write-only file that sends HTTP chunks of at least 64 KiB."""

    def __init__(self, h: Handler) -> None:
        self.h, self.buf = h, bytearray()

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= 1 << 16:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf:
            self.h.chunk(bytes(self.buf))
            self.buf.clear()


@routes.add("PUT", r"/containers/(?P<ref>[^/]+)/archive")
def archive_put(h: Handler, ref: str) -> None:
    c = h.engine.container(ref)
    if c.r["HostConfig"].get("ReadonlyRootfs"):
        raise EngineError(403, "container rootfs is marked read-only")
    body = h.body_stream()
    try:
        with h.engine.container_root(c) as root:
            archive.extract_tar(root, _archive_path(h), body, copy_owner=h.qbool("copyUIDGID"),
                                no_overwrite_dir_non_dir=h.qbool("noOverwriteDirNonDir"))
        while body.read(1 << 16):  # the tar's zero padding: keep the connection in step
            pass
    except BaseException:
        h.close_connection = True  # the rest of the body was not read
        raise
    h.reply(200, b"", "text/plain")


# --- server -------------------------------------------------------------------------------------
class Server(socketserver.UnixStreamServer):
    """A thread per connection, as ``socketserver.ThreadingMixIn`` does, but from the engine's
    pool (agent/workers.py): a thread start costs milliseconds under TCG, and many clients
    (docker-py among them) open a connection for most requests."""

    allow_reuse_address = True

    def __init__(self, path: str, handler: type[BaseHTTPRequestHandler], pool: workers.Workers | None = None) -> None:
        super().__init__(path, handler)
        self.pool = pool or workers.WORKERS

    def process_request(self, request: Any, client_address: Any) -> None:
        self.pool.spawn(self._serve, request, client_address, name="api")

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client went away mid-request: nothing to answer, nothing to report
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def serve(engine: Engine, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    handler = type("BoundHandler", (Handler,), {"engine": engine})
    old = os.umask(0o177)
    try:
        server = Server(path, handler)
    finally:
        os.umask(old)
    log.info("engine API on %s", path)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
