"""Host folders over virtiofs: the Linux fast path.

QEMU's C virtiofsd (Debian: ``/usr/lib/qemu/virtiofsd``, package qemu-system-common) serves
one folder over vhost-user; the guest mounts it with the kernel's ``virtiofs`` (a module in
the Debian cloud kernel). File data then moves through shared guest memory, with no SSH
encryption and no Python on the way, which under TCG is the difference between a few MB/s and
tens of MB/s (docs/benchmarks.md).

Only where it can work: a Linux host, the daemon running as root (virtiofsd's sandbox needs
it: namespaces and pivot_root into the folder), a virtiofsd binary, and a read-write share
(this virtiofsd has no read-only mode; read-only shares stay on sftp, which
refuses changes on the host side). The sandbox confines virtiofsd to the shared folder, so the
guest cannot reach anything outside it by ``..``, symlinks or hard links.

Each virtiofsd is detached like QEMU (a restarted daemon re-adopts a running QEMU, and its
shares must live on); it exits when QEMU closes the vhost-user connection. ``Virtiofsd.close``
ends any still running once QEMU is gone and removes the sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from vmkit.errors import LaunchError
from vmkit.run import spawn
from vmkit.spec import HostOS, Share, VMSpec

log = logging.getLogger(__name__)

CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/virtiofsd")


def find_virtiofsd() -> str | None:
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("virtiofsd")


def available(os_: HostOS) -> tuple[bool, str]:
    """(usable, why not)."""
    if os_ is not HostOS.LINUX:
        return False, "virtiofsd exists only on Linux hosts"
    if find_virtiofsd() is None:
        return False, "no virtiofsd (apt-get install qemu-system-common)"
    if os.geteuid() != 0:
        return False, "virtiofsd's sandbox needs root; the daemon runs as a user"
    return True, ""


def tag(index: int) -> str:
    return f"pydesk{index}"


def mount_command(share: Share, index: int) -> str:
    g = shlex.quote(share.guest_path)
    return (f"modprobe virtiofs 2>/dev/null; mkdir -p {g} && "
            f"{{ grep -qs ' {share.guest_path} virtiofs ' /proc/mounts || mount -t virtiofs {tag(index)} {g}; }}")


class Virtiofsd:
    """The virtiofsd processes of one VM (one per virtiofs share)."""

    def __init__(self, spec: VMSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log_dir = log_dir
        self.procs: list[Any] = []

    def socket(self, index: int) -> Path:
        assert self.spec.files.virtiofs_dir is not None
        return Path(self.spec.files.virtiofs_dir) / f"virtiofs{index}.sock"

    def start(self) -> None:
        binary = find_virtiofsd()
        if binary is None:
            raise LaunchError("virtiofsd not found",
                              hint="apt-get install qemu-system-common, or share over sftp (--share-transport sftp)")
        for i, share in enumerate(self.spec.virtiofs):
            sock = self.socket(i)
            sock.unlink(missing_ok=True)
            argv = [binary, f"--socket-path={sock}", "-o", f"source={share.host_path}", "-o", "cache=auto",
                    "-o", "log_level=warn"]
            with open(self.log_dir / f"virtiofsd{i}.log", "wb") as out:
                self.procs.append(spawn(argv, stdout=out, stderr=out, detach=True))
        deadline = time.monotonic() + 10
        for i, proc in enumerate(self.procs):
            while not self.socket(i).exists():
                if proc.poll() is not None:
                    msg = (self.log_dir / f"virtiofsd{i}.log").read_text(errors="replace").strip().splitlines()
                    self.close(force=True)
                    raise LaunchError(f"virtiofsd for {self.spec.virtiofs[i].host_path} exited: "
                                      f"{msg[-1] if msg else proc.returncode}")
                if time.monotonic() > deadline:
                    self.close(force=True)
                    raise LaunchError(f"virtiofsd for {self.spec.virtiofs[i].host_path} did not open its socket")
                time.sleep(0.02)

    def close(self, force: bool = False) -> None:
        """After QEMU is gone (or ``force``): end what is left, remove the sockets."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    proc.wait(5 if not force else 0.1)
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
                with contextlib.suppress(Exception):
                    proc.wait(5)
        self.procs.clear()
        for i in range(len(self.spec.virtiofs)):
            self.socket(i).unlink(missing_ok=True)
