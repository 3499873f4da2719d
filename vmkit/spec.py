"""What a VM is: frozen dataclasses and enums whose ``str()`` is the spelling QEMU and the
CLI use. Nothing here touches the host."""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from pathlib import PurePath

from vmkit.errors import ConfigError


class Arch(enum.StrEnum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"

    @property
    def debian(self) -> str:
        return {Arch.X86_64: "amd64", Arch.AARCH64: "arm64"}[self]

    @property
    def qemu_system(self) -> str:
        return f"qemu-system-{self}"

    @classmethod
    def from_machine(cls, machine: str) -> Arch:
        m = machine.lower()
        if m in ("x86_64", "amd64", "x64"):
            return cls.X86_64
        if m in ("aarch64", "arm64", "armv8", "arm64e"):
            return cls.AARCH64
        raise ConfigError(f"unsupported host architecture {machine!r}", hint="pydesk runs on x86_64 and aarch64")


class Accel(enum.StrEnum):
    KVM = "kvm"
    HVF = "hvf"
    WHPX = "whpx"
    TCG = "tcg"


class NicModel(enum.StrEnum):
    """The guest's network card; ``str()`` is QEMU's device name."""

    VIRTIO = "virtio-net-pci"
    VMXNET3 = "vmxnet3"


class HostOS(enum.StrEnum):
    LINUX = "linux"
    DARWIN = "darwin"
    WINDOWS = "win32"


class Protocol(enum.StrEnum):
    TCP = "tcp"
    UDP = "udp"


class BootLayout(enum.StrEnum):
    """How the guest's root file system reaches the kernel."""

    INITRAMFS = "initramfs"  # the whole root in the initramfs
    EROFS = "erofs"  # a tiny initramfs, then a read-only erofs disk as root


#: Guest ports the engine hands out for containers' published ports (agent/ports.py); a
#: VM-level forward may not use them, and vmkit/ports.py owns every forward to them.
PUBLISHED_GUEST_PORTS = range(20000, 30000)


@dataclasses.dataclass(frozen=True)
class PortForward:
    """A VM-level forward: ``host_ip:host_port`` on the host to ``guest_port`` in the VM."""

    host_port: int
    guest_port: int
    host_ip: str = "127.0.0.1"
    protocol: Protocol = Protocol.TCP

    @classmethod
    def parse(cls, text: str) -> PortForward:
        """Parse ``[ip:]host:guest[/tcp|/udp]``."""
        m = re.fullmatch(r"(?:(?P<ip>[0-9.]+):)?(?P<host>\d+):(?P<guest>\d+)(?:/(?P<proto>tcp|udp))?", text.strip())
        if not m:
            raise ConfigError(f"invalid port forward {text!r}", hint="use [IP:]HOSTPORT:GUESTPORT[/tcp|/udp], e.g. 8080:80")
        ip = m["ip"] or "127.0.0.1"
        try:
            ipaddress.IPv4Address(ip)
        except ValueError as exc:
            raise ConfigError(f"invalid IP address {ip!r} in port forward {text!r}") from exc
        host, guest = int(m["host"]), int(m["guest"])
        for port in (host, guest):
            if not 1 <= port <= 65535:
                raise ConfigError(f"port {port} out of range in {text!r}", hint="ports are 1-65535")
        if guest in PUBLISHED_GUEST_PORTS:
            raise ConfigError(f"guest port {guest} in {text!r} is reserved for containers' published ports",
                              hint=f"use a guest port outside {PUBLISHED_GUEST_PORTS.start}-"
                                   f"{PUBLISHED_GUEST_PORTS.stop - 1}, or publish the container's port with -p")
        return cls(host, guest, ip, Protocol(m["proto"] or "tcp"))

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.guest_port}/{self.protocol}"


@dataclasses.dataclass(frozen=True)
class Share:
    """A host folder shared into the VM (``guest_path`` "" = the default place for it, see
    vmkit/shares.py)."""

    host_path: str
    guest_path: str = ""
    read_only: bool = False


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel plus either a whole-root initramfs or boot initramfs + erofs root."""

    arch: Arch
    release: str
    kernel: PurePath
    initrd: PurePath
    root_disk: PurePath | None = None

    @property
    def layout(self) -> BootLayout:
        return BootLayout.EROFS if self.root_disk else BootLayout.INITRAMFS


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A local stream endpoint: a unix socket, or TCP on loopback where unix sockets are not
    usable (Windows)."""

    path: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.port is None):
            raise ValueError("an Endpoint is either a path or a port")

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def chardev_opts(self) -> str:
        """The address part of a QEMU ``-chardev socket`` option."""
        if self.path is not None:
            return f"path={qemu_escape(self.path)}"
        return f"host={self.host},port={self.port}"

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path is not None else f"tcp://{self.host}:{self.port}"


def qemu_escape(value: str) -> str:
    """QEMU option values double their commas."""
    return str(value).replace(",", ",,")


@dataclasses.dataclass(frozen=True)
class RuntimeFiles:
    """Where one VM's sockets, disks and logs live (chosen by vmkit.paths)."""

    qmp: Endpoint
    agent: Endpoint
    console_log: PurePath
    data_disk: PurePath
    host_key: PurePath  # the guest's SSH host key, handed in through fw_cfg
    authorized_keys: PurePath
    guest_config: PurePath
    pidfile: PurePath
    virtiofs_dir: PurePath | None = None  # where the virtiofsd sockets are
    share_ports: tuple[Endpoint, ...] = ()  # one per share (VMSpec.shares); sftp shares use theirs
    engine_port: Endpoint | None = None  # the engine's own port (vmkit/engine_link.py); None: no engine


@dataclasses.dataclass(frozen=True)
class VMSpec:
    name: str
    arch: Arch
    cpus: int
    memory_mib: int
    disk_gib: int
    accel: Accel
    image: GuestImage
    files: RuntimeFiles
    shares: tuple[Share, ...] = ()
    ports: tuple[PortForward, ...] = ()
    restrict_network: bool = False  # QEMU user-net restrict=on: no traffic leaves the host
    dns: tuple[str, ...] = ()
    host_services: tuple[tuple[int, int], ...] = ()  # (guest port, host port) over the agent channel
    #: The shares served by virtiofsd (Linux fast path, vmkit/virtiofs.py); the rest of
    #: ``shares`` are SFTP on a virtio-serial port of their own (vmkit/sftp_share.py).
    virtiofs: tuple[Share, ...] = ()
