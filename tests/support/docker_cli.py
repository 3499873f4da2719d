"""The real Debian `docker` and `docker-compose` clients, pointed at a pydesk engine socket.

The Makefile installs Debian's ``docker.io`` (the CLI, 20.10, API 1.41) and ``docker-compose``
(1.29). The environment is built from scratch for every call: ``DOCKER_HOST`` is pydesk's
socket, ``DOCKER_CONFIG`` a private folder and no ``DOCKER_CONTEXT``, so a dockerd that the
``docker.io`` package may have started on this machine is never used by accident. A newer
``docker`` elsewhere on PATH (e.g. /usr/local/bin) is not used either: the tests run the binary
the Makefile installed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass
from pathlib import Path

DOCKER = "/usr/bin/docker"
COMPOSE = "/usr/bin/docker-compose"


def missing_clients(*binaries: str) -> list[str]:
    return [b for b in binaries if not (os.access(b, os.X_OK) or shutil.which(b))]


def client_env(host: str, config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    env.update(DOCKER_HOST=host, DOCKER_CONFIG=str(config_dir), DOCKER_CLI_HINTS="false")
    config_dir.mkdir(parents=True, exist_ok=True)
    return env


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class DockerCLI:
    """``cli("ps", "-a")`` runs the Debian docker client against ``host``."""

    def __init__(self, host: str, config_dir: Path, binary: str = DOCKER) -> None:
        self.host = host
        self.binary = binary
        self.env = client_env(host, config_dir)

    def __call__(self, *args: str, timeout: float = 300, input: str | None = None, cwd: Path | None = None) -> Result:
        proc = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL, cwd=cwd)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kw: object) -> str:
        r = self(*args, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"{self.binary} {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def spawn(self, *args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.binary, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, cwd=cwd)

    def pty(self, *args: str, size: tuple[int, int] = (24, 80)) -> PtySession:
        return PtySession([self.binary, *args], self.env, size=size)


class PtySession:
    """A client under a real pseudo-terminal (as `docker exec -it` needs), read with expect().

    ``size`` is the terminal's (rows, columns) when the client starts; ``resize`` changes it
    as a terminal window would, and the kernel sends the client SIGWINCH."""

    def __init__(self, argv: list[str], env: dict[str, str], *, size: tuple[int, int] = (24, 80),
                 cwd: str | Path | None = None) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child: the pty is our controlling terminal and stdio
            try:
                _set_size(0, size)  # before exec, so the client's first look sees it
                if cwd is not None:
                    os.chdir(cwd)
                os.execve(argv[0], argv, {**env, "TERM": "xterm"})
            finally:
                os._exit(127)
        self.output = b""
        self.code: int | None = None

    def resize(self, rows: int, cols: int) -> None:
        _set_size(self.fd, (rows, cols))

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def expect(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.output!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"terminal closed before {text!r}; got {self.output!r}")
                self.output += chunk
        return self.output.decode(errors="replace")

    def wait_for_size(self, rows: int, cols: int, timeout: float = 30) -> None:
        """Ask the shell on the other end for its terminal's size until it is ``rows cols``: a
        resize reaches the container asynchronously, as with Docker. The echoed command
        line cannot match: the shell computes the markers."""
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            n += 1
            self.send(f"echo size-$(({n}*1000+1)) $(stty size) end-$(({n}*1000+2))\r")
            out = self.expect(f"end-{n * 1000 + 2}")
            got = re.findall(rf"size-{n * 1000 + 1} (\d+ \d+) end", out)
            if got == [f"{rows} {cols}"]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"terminal size stayed {got}, not {rows} {cols}: {out[-400:]!r}")
            time.sleep(0.3)

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while True:
            with_fd = select.select([self.fd], [], [], 0.1)[0]
            if with_fd:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
                os.close(self.fd)
                return self.code
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"client did not exit; output {self.output!r}")

    def close(self) -> None:
        """Kill the client if it still runs (a test that failed half-way)."""
        if self.code is None:
            os.kill(self.pid, signal.SIGKILL)
            self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            os.close(self.fd)


def _set_size(fd: int, size: tuple[int, int]) -> None:
    rows, cols = size
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
