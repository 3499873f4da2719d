"""The guest image recipe: what goes into the pydesk VM, per architecture.

The recipe is data. Its hash (with the overlay files and the in-guest agent sources) names
the cache entry, so changing any of them builds a new image and an unchanged recipe reuses
the one already built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from vmkit.spec import Arch

GUEST_VERSION = "0.1"
SUITE = "bookworm"

#: Packages of the root file system. Installed with mmdebstrap's ``extract`` variant (no
#: maintainer scripts run), which builds any architecture without emulation; the files the
#: scripts would have made (users, /bin/sh, applet links) come from ``files/`` and build.py.
PACKAGES = (
    "busybox-static",  # init, acpid and the small tools the boot scripts use
    "dash",
    "python3",  # the engine (agent/) is Python
    "openssh-server",  # the agent channel: sshd -i on virtio-serial
    "openssh-sftp-server",
    "crun",  # the OCI runtime
    "iproute2",
    "nftables",
    "e2fsprogs",  # formats and checks the data disk
    "kmod",
    "ca-certificates",
    "zstd",  # zstd-compressed layers
    "tini",  # `--init` (tini-static is bind-mounted into containers)
    "mount",  # overlay mounts with long lowerdir lists (busybox mount is limited)
    "sshfs",  # host folder shares: SFTP on a virtio-serial port (vmkit/sftp_share.py)
)

#: Kernel modules the guest loads (their dependencies are added from modules.dep).
MODULES = (
    "virtio_pci", "virtio_console", "virtio_blk", "virtio_net", "virtio_rng", "qemu_fw_cfg",
    "button", "evdev", "erofs", "overlay", "fuse", "virtiofs", "veth", "bridge", "br_netfilter",
    "tun", "nf_tables", "nft_chain_nat", "nft_masq", "nft_nat", "nft_ct", "nft_fib_inet",
    "nft_reject_inet", "nf_conntrack", "vmw_vsock_virtio_transport",
    "sch_fq_codel", "vmxnet3",
)

#: Modules the boot initramfs of the erofs layout needs to reach the root disk.
BOOT_MODULES = ("virtio_pci", "virtio_blk", "erofs")

#: Paths removed from the root file system: documentation, locales, and the perl that only
#: maintainer scripts would use.
PRUNE = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "usr/share/bash-completion", "usr/share/perl", "usr/share/perl5", "usr/bin/perl*",
    "usr/lib/*/perl", "usr/lib/*/perl-base", "usr/lib/python3.11/test",
    "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data", "var/cache/*", "var/lib/apt",
    "var/log/*", "usr/share/zoneinfo/right", "usr/share/zoneinfo/posix",
)

KERNEL_PACKAGE = {Arch.X86_64: "linux-image-cloud-amd64", Arch.AARCH64: "linux-image-arm64"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    arch: Arch
    suite: str = SUITE
    packages: tuple[str, ...] = PACKAGES
    modules: tuple[str, ...] = MODULES
    boot_modules: tuple[str, ...] = BOOT_MODULES
    prune: tuple[str, ...] = PRUNE
    version: str = GUEST_VERSION

    @property
    def kernel_package(self) -> str:
        return KERNEL_PACKAGE[self.arch]

    def digest(self) -> str:
        """A hash of everything that decides the image's content."""
        h = hashlib.sha256()
        fields = dataclasses.asdict(self) | {"kernel": self.kernel_package}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
        root = Path(__file__).resolve().parent
        for base in (root / "files", root / "build.py", root.parent / "agent"):
            paths = sorted(base.rglob("*")) if base.is_dir() else [base]
            for p in paths:
                if p.is_file() and "__pycache__" not in p.parts:
                    h.update(str(p.relative_to(root.parent)).encode() + b"\0")
                    h.update(oct(p.stat().st_mode & 0o111).encode())
                    h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def release(self) -> str:
        return f"{self.version}+{self.digest()}"
