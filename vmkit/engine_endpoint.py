r"""Where docker clients reach a VM's engine on the host: chosen here and nowhere else.

POSIX hosts: the unix socket ``engine.sock`` (mode 0600) in the VM's runtime dir, made by
``transport.Listener``. Windows: the named pipe ``\\.\pipe\pydesk_engine[_name]`` (see
``VMPaths.engine_pipe``), made by ``named_pipe.PipeListener`` with an ACL for this user only.
Both have ``accept()`` and ``close()``, and what ``accept`` returns works with
``transport.pump``. pydesk's own processes keep using ``transport`` (TCP loopback + token on
Windows); this endpoint is the one the docker CLI, docker-py and compose use.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from vmkit.paths import VMPaths
from vmkit.transport import Listener, use_unix_sockets


class EngineListener(Protocol):
    def accept(self) -> Any: ...

    def close(self) -> None: ...


def engine_listener(paths: VMPaths, platform: str = sys.platform, *, wait: float = 0.0,
                    api: Any = None) -> EngineListener:
    """Listen on the engine endpoint of the VM at ``paths``. ``wait``: on Windows, how long to
    retry while an exiting daemon or standby still holds the pipe's name. ``api``: the Win32
    boundary (tests pass a fake)."""
    if use_unix_sockets(platform):
        return Listener(paths.engine, platform=platform)
    from vmkit.named_pipe import PipeListener

    return PipeListener(paths.engine_pipe, api=api, wait=wait)


def docker_host(paths: VMPaths, platform: str = sys.platform) -> str:
    """The ``DOCKER_HOST`` value for this endpoint: ``unix:///...`` or ``npipe:////./pipe/...``."""
    if use_unix_sockets(platform):
        return "unix://" + str(paths.engine)
    return "npipe://" + paths.engine_pipe.replace("\\", "/")  # \\.\pipe\x -> npipe:////./pipe/x


def may_exist(paths: VMPaths, platform: str = sys.platform) -> bool:
    r"""Whether connecting is worth a try. For a pipe there is no cheap check that does not
    itself connect (opening or stat-ing ``\\.\pipe\x`` takes an instance), so always."""
    if use_unix_sockets(platform):
        return paths.engine.exists()
    return True
