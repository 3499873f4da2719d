"""The one way vmkit starts processes.

``run`` runs a command to completion; ``spawn`` starts a long-lived one, optionally detached
into its own session (POSIX) or process group without a console (Windows) so it outlives
the process that started it. Both log the command line at debug level, default stdin to
/dev/null, and turn a missing binary into a sentence.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from vmkit.errors import HostError, ToolNotFound

log = logging.getLogger(__name__)

Cmd = Sequence[str | os.PathLike[str]]

#: Debian package that provides each tool, for the "not found" hint.
PROVIDERS = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "mmdebstrap": "mmdebstrap",
    "mkfs.erofs": "erofs-utils",
    "zstd": "zstd",
    "cpio": "cpio",
    "depmod": "kmod",
}


def _argv(cmd: Cmd) -> list[str]:
    return [os.fspath(c) for c in cmd]


def missing_tool(name: str) -> ToolNotFound:
    pkg = PROVIDERS.get(Path(name).name)
    hint = f"install it (Debian/Ubuntu: apt-get install {pkg})" if pkg else "install it and make sure it is on PATH"
    return ToolNotFound(f"{Path(name).name} not found", hint=hint)


def which(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise missing_tool(name)
    return path


def detach_kwargs(platform: str = sys.platform) -> dict[str, Any]:
    """Popen arguments that detach a child from our terminal and signals."""
    if platform == "win32":
        flags = 0x00000008 | 0x00000200  # DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP
        return {"creationflags": flags, "close_fds": True}
    return {"start_new_session": True, "close_fds": True}


def run(
    cmd: Cmd,
    *,
    check: bool = True,
    capture: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    argv = _argv(cmd)
    log.debug("+ %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
        )
    except FileNotFoundError as exc:
        raise missing_tool(argv[0]) from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{Path(argv[0]).name} did not finish within {timeout:g}s") from exc
    if check and proc.returncode != 0:
        err = (proc.stderr or b"").decode(errors="replace").strip().splitlines()
        last = err[-1] if err else f"exit status {proc.returncode}"
        raise HostError(f"{Path(argv[0]).name} failed: {last}")
    return proc


def spawn(
    cmd: Cmd,
    *,
    stdout: IO[Any] | int | None = subprocess.DEVNULL,
    stderr: IO[Any] | int | None = subprocess.DEVNULL,
    stdin: IO[Any] | int | None = subprocess.DEVNULL,
    detach: bool = False,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    argv = _argv(cmd)
    log.debug("+ %s%s", shlex.join(argv), " (detached)" if detach else "")
    kwargs: dict[str, Any] = detach_kwargs() if detach else {}
    if pass_fds:
        kwargs["pass_fds"] = tuple(pass_fds)
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=dict(env) if env is not None else None, **kwargs)
    except FileNotFoundError as exc:
        raise missing_tool(argv[0]) from exc
