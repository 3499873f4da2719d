"""A real SSH connection inside the test process: a paramiko server and client on a socket
pair, the server taking any user without authentication and opening any channel."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import paramiko


class OpenServer(paramiko.ServerInterface):
    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED


@contextlib.contextmanager
def ssh_pair(configure: Callable[[paramiko.Transport], None] | None = None,
             interface: paramiko.ServerInterface | None = None
             ) -> Iterator[tuple[paramiko.Transport, paramiko.Transport]]:
    """(client, server) transports, connected and authenticated; ``configure`` sees the
    server before it starts (to add subsystem handlers); ``interface`` replaces OpenServer."""
    a, b = socket.socketpair()
    server = paramiko.Transport(a)
    server.add_server_key(paramiko.RSAKey.generate(1024))
    if configure is not None:
        configure(server)
    threading.Thread(target=server.start_server, kwargs={"server": interface or OpenServer()}, daemon=True).start()
    client = paramiko.Transport(b)
    try:
        client.start_client()
        client.auth_none("u")
        yield client, server
    finally:
        client.close()
        server.close()
