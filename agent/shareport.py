"""`python3 -m agent.shareport PORT NONCE GUEST_PATH OPTIONS`: mount a host folder with sshfs
speaking SFTP straight over the share's own virtio-serial port (vmkit/sftp_share.py serves it
on the host).

The port carries nothing but SFTP: no sshd, no encryption, no second process relaying every
request. (Over the agent's SSH channel the guest's sshd was most of the cost: a `tar x` of 500
small files took about ten times longer than the same sshfs talking to a local sftp-server.)

A port keeps whatever an earlier session left in it, in both directions, so a new session
starts with a handshake, as the agent port's does: stale bytes from the host are drained,
``PYDESK-SHARE <nonce>`` goes to the host, and everything up to the host's
``PYDESK-SHARE-READY <nonce>`` line is skipped. The host skips likewise up to our line. Then
a previous sshfs on this share is stopped, the mount point lazily unmounted, and sshfs is
started in a session of its own with the port as its stdin and stdout, so it outlives the
agent connection that asked for it.

A read-only share is mounted read-write where only the agent looks (``rw_path``) and bound
read-only at its guest path: containers get EROFS, and the host refuses changes anyway
(vmkit/sftp_share.py), but the agent can still replay host changes as inotify events.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

PORTS = Path("/sys/class/virtio-ports")
RUN = Path("/run/pydesk")
RW_ROOT = "/run/pydesk/share-rw"
HANDSHAKE_TIMEOUT = 30.0


class ShareError(Exception):
    """The port is missing or the host never answered."""


def find_port(name: str, ports: Path = PORTS) -> str:
    for p in sorted(ports.iterdir()) if ports.is_dir() else []:
        with contextlib.suppress(OSError):
            if (p / "name").read_text().strip() == name:
                return f"/dev/{p.name}"
    raise ShareError(f"virtio-serial port {name} not found")


def _set_blocking(fd: int, blocking: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK if blocking else flags | os.O_NONBLOCK)


def drain(fd: int, quiet: float = 0.1) -> int:
    """Read and drop what is waiting in the port until it has been quiet for ``quiet``."""
    dropped = 0
    _set_blocking(fd, False)
    try:
        while select.select([fd], [], [], quiet)[0]:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:  # no host connected: reads return end-of-file
                break
            dropped += len(data)
    finally:
        _set_blocking(fd, True)
    return dropped


def handshake(fd: int, nonce: str, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    drain(fd)
    os.write(fd, f"PYDESK-SHARE {nonce}\n".encode())
    want = f"PYDESK-SHARE-READY {nonce}\n".encode()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(want):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ShareError("the host did not answer on the share port")
        byte = os.read(fd, 1)  # one at a time: nothing after the line may be consumed here
        if not byte:
            time.sleep(0.05)  # the host is not connected (yet)
            continue
        buf = (buf + byte)[-len(want):]


def rw_path(mountpoint: str) -> str:
    """Where a read-only share's sshfs is mounted read-write, for the agent's eyes only:
    agent/hostchanges.py replays host changes there (a chmod on the read-only bind would
    fail with EROFS); containers see the read-only bind at ``mountpoint``."""
    return RW_ROOT + os.path.normpath(mountpoint)


def _umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)


def stop_previous(pidfile: Path, mountpoint: str, timeout: float = 5.0) -> None:
    """Stop this share's previous sshfs (it holds the port: a second open fails with EBUSY)."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    _umount(mountpoint)
    _umount(rw_path(mountpoint))


def mounted(path: str, mounts: str = "/proc/mounts") -> bool:
    escaped = path.replace(" ", "\\040")
    with open(mounts) as f:
        return any(line.split()[1] == escaped for line in f if len(line.split()) > 2)


def wait_mounted(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if proc.poll() is not None:
            raise ShareError(f"sshfs exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise ShareError("sshfs did not mount in time")
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python3 -m agent.shareport PORT NONCE GUEST_PATH SSHFS_OPTIONS", file=sys.stderr)
        return 2
    name, nonce, mountpoint, options = argv
    index = name.rsplit(".", 1)[-1]
    pidfile = RUN / f"share-{index}.pid"
    opts = options.split(",")
    read_only = "ro" in opts
    stop_previous(pidfile, mountpoint)
    try:
        fd = os.open(find_port(name), os.O_RDWR | os.O_CLOEXEC)
        handshake(fd, nonce)
    except (ShareError, OSError) as exc:
        print(f"share {mountpoint}: {exc}", file=sys.stderr)
        return 1
    target = rw_path(mountpoint) if read_only else mountpoint
    os.makedirs(mountpoint, exist_ok=True)
    os.makedirs(target, exist_ok=True)
    log = open(RUN / f"share-{index}.log", "ab")  # noqa: SIM115 - handed to sshfs
    sshfs_opts = ",".join(o for o in opts if o != "ro")  # read-only: the bind below, and the host
    proc = subprocess.Popen(["sshfs", "-f", "-o", sshfs_opts, "pydesk:/", target], stdin=fd, stdout=fd, stderr=log,
                            start_new_session=True, close_fds=True)
    pidfile.write_text(str(proc.pid))
    if read_only:
        try:
            wait_mounted(target, proc)
            for cmd in (["mount", "--bind", target, mountpoint], ["mount", "-o", "remount,bind,ro", mountpoint]):
                subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=True)
        except (ShareError, subprocess.CalledProcessError) as exc:
            err = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
            print(f"share {mountpoint}: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
