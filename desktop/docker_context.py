"""`pydesk context`: how docker clients reach pydesk's engine (socket, or named pipe on Windows).

Prints the ``DOCKER_HOST`` to use, and can create (and select) a docker CLI context named
``pydesk`` with the real ``docker context`` command, so nothing here writes the docker CLI's
own files.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

from vmkit import engine_endpoint
from vmkit.errors import VMKitError
from vmkit.paths import VMPaths

CONTEXT_NAME = "pydesk"


class ContextError(VMKitError):
    pass


def docker_host(name: str, platform: str = sys.platform) -> str:
    """``unix://<runtime dir>/<name>/engine.sock``, or on Windows the named pipe
    ``npipe:////./pipe/pydesk_engine`` (``pydesk_engine_<name>`` for other VMs)."""
    return engine_endpoint.docker_host(VMPaths(name), platform)


def shell_line(host: str, platform: str = sys.platform) -> str:
    """The line that sets ``DOCKER_HOST``: POSIX shell, or PowerShell on Windows (so
    ``eval "$(pydesk context)"`` and ``pydesk context | Invoke-Expression`` both work)."""
    if platform == "win32":
        return f'$env:DOCKER_HOST = "{host}"'
    return f"export DOCKER_HOST={host}"


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker")
    if exe is None:
        raise ContextError("the docker CLI is not installed", hint="install it, or use DOCKER_HOST instead")
    return subprocess.run([exe, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL)


def create_context(host: str, use: bool) -> str:
    """Create or update the ``pydesk`` context pointing at ``host``; returns what was done."""
    exists = _docker("context", "inspect", CONTEXT_NAME).returncode == 0
    verb = "update" if exists else "create"
    proc = _docker("context", verb, CONTEXT_NAME, "--description", "pydesk VM", "--docker", f"host={host}")
    if proc.returncode != 0:
        raise ContextError(f"docker context {verb} failed: {(proc.stderr or proc.stdout).strip()}")
    done = f"docker context {CONTEXT_NAME!r} {verb}d ({host})"
    if use:
        proc = _docker("context", "use", CONTEXT_NAME)
        if proc.returncode != 0:
            raise ContextError(f"docker context use failed: {(proc.stderr or proc.stdout).strip()}")
        done += "; now the current context"
    return done


def cmd_context(args: argparse.Namespace) -> int:
    host = docker_host(args.name)
    if args.create or args.use:
        print(create_context(host, args.use))
        return 0
    print(shell_line(host))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("context", help="show the DOCKER_HOST for docker clients, or create a docker context")
    s.add_argument("--create", action="store_true", help=f"create (or update) the docker context {CONTEXT_NAME!r}")
    s.add_argument("--use", action="store_true", help="create it and make it docker's current context")
    s.set_defaults(func=cmd_context)
