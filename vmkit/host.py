"""The host we run on: its OS, its CPU architecture and where its QEMU lives.

``Host`` is plain data so ``qemu_argv`` can be computed for any host in tests. Finding
things on the real machine (``detect``, ``find_qemu_dir``) happens here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import sys
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

from vmkit.errors import ToolNotFound
from vmkit.spec import Arch, HostOS


@dataclasses.dataclass(frozen=True)
class Host:
    os: HostOS
    arch: Arch
    qemu_dir: PurePath | None = None  # None: the QEMU binaries are on PATH

    def qemu_binary(self, guest: Arch) -> str:
        name = guest.qemu_system + (".exe" if self.os is HostOS.WINDOWS else "")
        if self.qemu_dir is None:
            return name
        return str(self.qemu_dir / name)

    def qemu_img(self) -> str:
        name = "qemu-img" + (".exe" if self.os is HostOS.WINDOWS else "")
        return name if self.qemu_dir is None else str(self.qemu_dir / name)

    @property
    def path_type(self) -> type[PurePath]:
        return PureWindowsPath if self.os is HostOS.WINDOWS else PurePosixPath


def host_os(platform_name: str = sys.platform) -> HostOS:
    if platform_name.startswith("linux"):
        return HostOS.LINUX
    if platform_name == "darwin":
        return HostOS.DARWIN
    if platform_name in ("win32", "cygwin"):
        return HostOS.WINDOWS
    raise ToolNotFound(f"unsupported host OS {platform_name!r}", hint="pydesk runs on Linux, macOS and Windows")


def qemu_search_dirs(os_: HostOS, environ: dict[str, str] | None = None, frozen_dir: str | None = None) -> list[PurePath]:
    """Where to look for QEMU, in order: a bundled copy, then the usual install places."""
    env = os.environ if environ is None else environ
    dirs: list[PurePath] = []
    if env.get("PYDESK_QEMU_DIR"):
        dirs.append(PurePath(env["PYDESK_QEMU_DIR"]))
    if frozen_dir:
        dirs.append(PurePath(frozen_dir) / "qemu")
    if os_ is HostOS.DARWIN:
        dirs += [PurePosixPath("/opt/homebrew/bin"), PurePosixPath("/usr/local/bin"), PurePosixPath("/opt/local/bin")]
    elif os_ is HostOS.WINDOWS:
        pf = env.get("ProgramFiles", r"C:\Program Files")
        dirs += [PureWindowsPath(pf) / "qemu"]
    return dirs


def qemu_install_hint(os_: HostOS, guest: Arch) -> str:
    if os_ is HostOS.DARWIN:
        return "install it with `brew install qemu`"
    if os_ is HostOS.WINDOWS:
        return "install QEMU (`winget install SoftwareFreedomConservancy.QEMU`) or set PYDESK_QEMU_DIR"
    pkg = "qemu-system-x86" if guest is Arch.X86_64 else "qemu-system-arm"
    return f"install it (Debian/Ubuntu: apt-get install {pkg}) or set PYDESK_QEMU_DIR"


def find_qemu_dir(os_: HostOS, guest: Arch) -> PurePath | None:
    """The folder holding QEMU for ``guest``, or None when it is on PATH."""
    probe = Host(os_, guest)
    name = Path(probe.qemu_binary(guest)).name
    frozen = getattr(sys, "_MEIPASS", None)
    for d in qemu_search_dirs(os_, frozen_dir=frozen):
        if Path(d, name).is_file():
            return d
    if shutil.which(name):
        return None
    raise ToolNotFound(f"QEMU ({name}) not found", hint=qemu_install_hint(os_, guest))


def detect(guest: Arch | None = None) -> Host:
    os_ = host_os()
    arch = Arch.from_machine(platform.machine())
    return Host(os_, arch, find_qemu_dir(os_, guest or arch))
