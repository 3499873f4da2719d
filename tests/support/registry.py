"""Run Debian's real ``docker-registry`` (distribution 2.8) on 127.0.0.1 for tests.

    with run_registry(tmp) as reg:             # anonymous
        reg.url, reg.address, reg.blob_path(digest)
    with run_token_registry(tmp, "alice", "s3cret") as reg:   # Docker Hub style token auth
        reg.token_server.requests

``push_layout`` copies an OCI layout into it with skopeo.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .tokenserver import TokenServer, run_token_server

REGISTRY_BIN = "/usr/bin/docker-registry"


def missing_tools(*tools: str) -> list[str]:
    """Host tools (by path or name) that are not installed."""
    return [t for t in tools if not (os.path.exists(t) if t.startswith("/") else shutil.which(t))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningRegistry:
    host: str
    port: int
    root: Path                       # the registry's storage root directory
    log_path: Path
    token_server: TokenServer | None = None
    username: str | None = None      # credentials accepted by the token server, if any
    password: str | None = None
    images: dict[str, object] = field(default_factory=dict)  # filled by callers (see images.py)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` — the registry part of references to this registry."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def blob_path(self, digest: str) -> Path:
        """Where distribution's filesystem driver stores a blob's bytes."""
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "docker/registry/v2/blobs" / algorithm / hexpart[:2] / hexpart / "data"

    def ref(self, name: str) -> str:
        return f"{self.address}/{name}"


def _config(storage: Path, port: int, token: TokenServer | None) -> str:
    lines = [
        "version: 0.1",
        "log:",
        "  level: warn",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "  redirect:",
        "    disable: true",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        "  secret: pydesk-test-secret",
    ]
    if token is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token.realm}",
            f"    service: {token.service}",
            f"    issuer: {token.issuer}",
            f"    rootcertbundle: {token.cert_path}",
        ]
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test process dies without cleaning up (no orphans)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v2/", timeout=2):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:      # token auth: up and asking for a token
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer /v2/ within {timeout}s: {log_path.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@contextmanager
def run_registry(workdir: Path, token: TokenServer | None = None, storage: Path | None = None) -> Iterator[RunningRegistry]:
    """Start ``docker-registry serve`` on a free loopback port; stop it when the block ends.

    ``storage`` may point at another registry's root to serve the same content."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = storage or workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for _ in range(3):  # the free port can be taken between probing and binding
        port = free_port()
        config = workdir / f"config-{port}.yml"
        config.write_text(_config(storage, port, token))
        log_path = workdir / f"registry-{port}.log"
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc, log_path)
        except RuntimeError as exc:
            _stop(proc)
            last = exc
            continue
        try:
            yield RunningRegistry("127.0.0.1", port, storage, log_path, token)
        finally:
            _stop(proc)
        return
    raise RuntimeError(f"could not start docker-registry: {last}")


@contextmanager
def run_token_registry(workdir: Path, username: str | None = "pydesk", password: str | None = "hunter2",
                       storage: Path | None = None) -> Iterator[RunningRegistry]:
    """A registry that only accepts JWTs from a token server started alongside it."""
    with run_token_server(workdir / "token", username, password) as token, \
            run_registry(workdir, token, storage) as reg:
        reg.username, reg.password = username, password
        yield reg


def push_layout(reg: RunningRegistry, layout: Path, tag: str, name: str, dest_tag: str | None = None) -> None:
    """``skopeo copy --all --preserve-digests oci:LAYOUT:TAG docker://REG/NAME:TAG``."""
    argv = ["skopeo", "--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests",
            "--dest-tls-verify=false"]
    if reg.username and reg.token_server is not None:
        argv.append(f"--dest-creds={reg.username}:{reg.password}")
    argv += [f"oci:{layout}:{tag}", f"docker://{reg.address}/{name}:{dest_tag or tag}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
