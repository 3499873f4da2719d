"""A wider listen backlog for QEMU's host-forward sockets (Linux hosts).

libslirp listens on every host forward with a backlog of one. A burst of connections to a
published port (a browser opening several, a test opening fifty) overflows that queue at once;
the host kernel then falls back to SYN cookies and resets some of the connections ("Connection
reset by peer" on the client, "Possible SYN flooding" in the kernel log). pydesk cannot change
QEMU's ``listen()`` call, but calling ``listen()`` again on a listening socket only updates
its backlog, and on Linux ``pidfd_getfd(2)`` (5.6+) hands the daemon a duplicate of QEMU's
socket to call it on. QEMU names the descriptor of each forward in ``info usernet``.

``pidfd_getfd`` needs ptrace access to QEMU: the daemon that started QEMU has it (QEMU is its
child), as has root; a daemon that adopted a running QEMU as a normal user under Yama's
default policy does not, and the forward then keeps QEMU's backlog (logged once). macOS and
Windows have no such call; there the backlog stays one (macOS drops the extra SYNs, so clients
retry after a second; Windows refuses them).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


class BacklogError(OSError):
    """QEMU's socket could not be reached or is not the listener it should be."""


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if new < 0:
        err = ctypes.get_errno()
        raise BacklogError(err, os.strerror(err))
    return int(new)


def supported(platform: str = sys.platform) -> bool:
    return platform.startswith("linux") and hasattr(os, "pidfd_open")


def widen(pid: int, fd: int, host_ip: str, host_port: int, backlog: int = BACKLOG) -> None:
    """Give QEMU's (``pid``) listening socket ``fd`` on ``host_ip:host_port`` a ``backlog``.
    Raises BacklogError (an OSError) when it cannot, and never touches any other socket."""
    pidfd = os.pidfd_open(pid)
    try:
        dup = _pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    sock = socket.socket(fileno=dup)
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise BacklogError(errno.EINVAL, f"QEMU's fd {fd} is not a listening TCP socket")
        ip, port = sock.getsockname()[:2]
        if port != host_port or (host_ip not in ("*", "0.0.0.0") and ip != host_ip):
            raise BacklogError(errno.EINVAL, f"QEMU's fd {fd} listens on {ip}:{port}, not {host_ip}:{host_port}")
        sock.listen(backlog)
    finally:
        sock.close()  # our duplicate only; QEMU's descriptor stays open
