"""Per-OS host facts, with the platform forced to darwin and win32."""

from __future__ import annotations

import ast
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

from vmkit.host import Host, host_os, qemu_install_hint, qemu_search_dirs
from vmkit.paths import runtime_dir
from vmkit.run import detach_kwargs
from vmkit.spec import Arch, HostOS

ROOT = Path(__file__).resolve().parents[2]
POSIX_ONLY = {"fcntl", "termios", "pwd", "grp", "tty", "pty", "resource", "posix"}


def test_host_os_mapping() -> None:
    assert host_os("linux") is HostOS.LINUX
    assert host_os("darwin") is HostOS.DARWIN
    assert host_os("win32") is HostOS.WINDOWS


def test_binary_names() -> None:
    assert Host(HostOS.WINDOWS, Arch.X86_64, PureWindowsPath(r"C:\q")).qemu_binary(Arch.X86_64) == r"C:\q\qemu-system-x86_64.exe"
    assert Host(HostOS.DARWIN, Arch.AARCH64).qemu_binary(Arch.AARCH64) == "qemu-system-aarch64"
    assert Host(HostOS.WINDOWS, Arch.X86_64).qemu_img() == "qemu-img.exe"


def test_qemu_search_dirs() -> None:
    assert qemu_search_dirs(HostOS.DARWIN, environ={}) == [
        PurePosixPath("/opt/homebrew/bin"), PurePosixPath("/usr/local/bin"), PurePosixPath("/opt/local/bin")]
    assert qemu_search_dirs(HostOS.WINDOWS, environ={"ProgramFiles": r"D:\Apps"}) == [PureWindowsPath(r"D:\Apps\qemu")]
    dirs = qemu_search_dirs(HostOS.LINUX, environ={"PYDESK_QEMU_DIR": "/opt/q"}, frozen_dir="/app")
    assert dirs == [PurePosixPath("/opt/q"), PurePosixPath("/app/qemu")]
    assert "brew install qemu" in qemu_install_hint(HostOS.DARWIN, Arch.AARCH64)
    assert "winget" in qemu_install_hint(HostOS.WINDOWS, Arch.X86_64)


def test_detach_per_platform() -> None:
    assert detach_kwargs("linux")["start_new_session"] is True
    assert detach_kwargs("win32")["creationflags"] == 0x00000008 | 0x00000200


def test_runtime_dir_fits_sun_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYDESK_HOME", raising=False)
    for plat in ("linux", "darwin"):
        assert len(str(runtime_dir(plat)) + "/default/engine.sock") <= 104


def _module_level_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.parse(path.read_text()).body:  # module level only
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("package", ["vmkit", "desktop"])
def test_no_unconditional_posix_only_imports(package: str) -> None:
    """Host-side code must import on Windows: POSIX-only modules only inside functions, also
    in the guest-side modules it imports (agent/engine_port.py holds the engine link's wire)."""
    todo = list((ROOT / package).rglob("*.py"))
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for lineno, module in _module_level_imports(path):
            bad = POSIX_ONLY.intersection([module.split(".")[0]])
            assert not bad, f"{path.relative_to(ROOT)}:{lineno} imports {bad} at module level"
            if module.startswith("agent."):
                todo.append(ROOT / (module.replace(".", "/") + ".py"))
