"""Shared fixtures: isolated pydesk homes, the CLI as a subprocess, one shared VM."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.fixtures import registry, test_images, token_registry  # noqa: E402,F401
from vmkit import standby  # noqa: E402


class Pydesk:
    """Runs the real `pydesk` entry point with its own PYDESK_HOME."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = os.environ.copy()
        self.env["PYDESK_HOME"] = str(home)
        self.env.pop("PYDESK_QEMU_DIR", None)
        self.env.update(extra_env or {})

    def __call__(self, *args: str, input: bytes | None = None, timeout: float = 300,
                 check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "desktop.cli", *args], cwd=ROOT, env=self.env,
            input=input.decode() if input is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pydesk {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self("vm", "shell", "--", "sh", "-c", script, **kw)  # type: ignore[arg-type]

    @property
    def state(self) -> Path:
        return self.home / "state" / "vms" / "default"

    @property
    def run_dir(self) -> Path:
        from vmkit.paths import VMPaths

        old = os.environ.get("PYDESK_HOME")
        os.environ["PYDESK_HOME"] = str(self.home)
        try:
            return VMPaths("default").run
        finally:
            if old is None:
                del os.environ["PYDESK_HOME"]
            else:
                os.environ["PYDESK_HOME"] = old

    def qemu_pid(self) -> int | None:
        try:
            return int((self.state / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that had a pydesk home shows the end of its daemon's log and of the
    guest's console: CI prints only the test's output, and the cause is often there."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for name, value in getattr(item, "funcargs", {}).items():
        # by name: test modules import this file as tests.conftest, pytest as conftest
        if type(value).__name__ != Pydesk.__name__:
            continue
        for log, keep in (("daemon.log", 60), ("console.log", 40)):  # room for a stop's diagnostics
            path = value.state / log
            with contextlib.suppress(OSError):
                lines = [ln for ln in path.read_text(errors="replace").splitlines() if " DEBUG " not in ln]
                report.sections.append((f"{name}: end of {log}", "\n".join(lines[-keep:])))


#: Small VMs: the suite runs several on a 2-core machine, one at a time.
VM_FLAGS = ("--memory", "1G", "--cpus", "2", "--disk", "4G", "--restrict-network", "--dns", "127.0.0.1")


@pytest.fixture
def pydesk(tmp_path: Path) -> Iterator[Pydesk]:
    """A fresh pydesk home; any VM started in it is stopped (or killed) afterwards."""
    p = Pydesk(tmp_path / "home")
    yield p
    _teardown(p)


def _teardown(p: Pydesk) -> None:
    # --quit: no engine-socket standby (vmkit/standby.py) is left behind for a test home
    if (p.run_dir / "daemon.sock").exists() or p.qemu_pid() or (p.run_dir / "standby.pid").exists():
        p("vm", "stop", "--quit", timeout=120)
    # a daemon that went away as the test ended (a crash it noticed) spawned its standby last
    # thing: that one may not have written standby.pid yet, so it is found by its home
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if standby.MARKER in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("PYDESK_HOME") == str(p.home):
                proc.terminate()
                proc.wait(10)
    pid = p.qemu_pid()
    if pid:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def registry_flags(registry) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    """The test registry as the VM's docker.io mirror, reached over the agent channel, with no
    fallback to the real registry (VM_FLAGS also take away the DNS server): nothing can leave
    this machine."""
    return ("--host-service", f"5000:{registry.port}", "--registry-mirror", "docker.io=http://127.0.0.1:5000",
            "--mirror-only")


@pytest.fixture(scope="session")
def shared_vm(tmp_path_factory: pytest.TempPathFactory, registry) -> Iterator[Pydesk]:  # type: ignore[no-untyped-def]
    """One running VM shared by every test that does not need its own. Its docker.io is the
    test registry."""
    p = Pydesk(tmp_path_factory.mktemp("shared") / "home")
    # Host folders shared into this VM (tests/vm/test_shares.py): one read-write, one read-only.
    p.share = tmp_path_factory.mktemp("share")  # type: ignore[attr-defined]
    p.share_ro = tmp_path_factory.mktemp("share-ro")  # type: ignore[attr-defined]
    p("vm", "start", *VM_FLAGS, *registry_flags(registry), "--share", str(p.share),  # type: ignore[attr-defined]
      "--share", f"{p.share_ro}:ro", check=True)  # type: ignore[attr-defined]
    yield p
    _teardown(p)


@pytest.fixture(scope="session")
def engine_socket(shared_vm: Pydesk) -> str:
    return "unix://" + str(shared_vm.run_dir / "engine.sock")


@pytest.fixture(scope="session")
def docker_client(engine_socket: str):  # type: ignore[no-untyped-def]
    import docker

    client = docker.DockerClient(base_url=engine_socket, version="auto", timeout=300)
    yield client
    client.close()


@pytest.fixture(scope="session")
def guest_image():  # type: ignore[no-untyped-def]
    """The built guest image for this host (built on first use, then cached)."""
    import platform

    from guest.build import build, load_image
    from guest.recipe import Recipe
    from vmkit.spec import Arch

    recipe = Recipe(Arch.from_machine(platform.machine()))
    build(recipe)
    return load_image(recipe)


@pytest.fixture(scope="session")
def guest_kernel(guest_image) -> str:  # type: ignore[no-untyped-def]
    return str(guest_image.kernel)
