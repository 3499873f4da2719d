"""Where pydesk keeps things on the host (platformdirs locations).

``PYDESK_HOME`` moves config, state and runtime files under one folder (tests use it to
run isolated VMs); ``PYDESK_CACHE`` moves the cache (built guest images), so isolated runs
can still share one built image.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import platformdirs

from vmkit.errors import ConfigError

APP = "pydesk"

# A unix socket path must fit in sockaddr_un.sun_path: 108 bytes on Linux, 104 on macOS.
SUN_PATH_MAX = 104

PIPE_DIR = "\\\\.\\pipe\\"  # \\.\pipe\ : the local machine's named pipes
ENGINE_PIPE = "pydesk_engine"
PIPE_NAME_MAX = 256  # characters after PIPE_DIR


def _home() -> Path | None:
    value = os.environ.get("PYDESK_HOME")
    return Path(value).resolve() if value else None


def config_dir() -> Path:
    home = _home()
    return home / "config" if home else Path(platformdirs.user_config_dir(APP, appauthor=False))


def state_dir() -> Path:
    home = _home()
    return home / "state" if home else Path(platformdirs.user_state_dir(APP, appauthor=False))


def cache_dir() -> Path:
    value = os.environ.get("PYDESK_CACHE")
    if value:
        return Path(value).resolve()
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def runtime_dir(platform: str = sys.platform) -> Path:
    """Sockets live here. Kept short so every socket path fits sun_path."""
    home = _home()
    if home:
        base = home / "run"
    elif platform == "darwin":
        # platformdirs' macOS runtime dir is too long for sun_path with our names.
        base = Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"
    else:
        with warnings.catch_warnings():  # no XDG_RUNTIME_DIR: platformdirs falls back, and says so
            warnings.simplefilter("ignore")
            base = Path(platformdirs.user_runtime_dir(APP, appauthor=False))
    if len(str(base)) > SUN_PATH_MAX - 40:
        digest = hashlib.sha256(str(base).encode()).hexdigest()[:12]  # stable across processes
        base = Path(tempfile.gettempdir()) / f"{APP}-{digest}"
    return base


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` readable by this user only."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sys.platform != "win32":
        os.chmod(path, 0o700)
    return path


class VMPaths:
    """Every file of one VM, by name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = state_dir() / "vms" / name
        self.run = runtime_dir() / name

    def ensure(self) -> VMPaths:
        ensure_private_dir(self.state)
        ensure_private_dir(self.run)
        return self

    # state: survives the VM
    @property
    def data_disk(self) -> Path:
        return self.state / "data.qcow2"

    @property
    def client_key(self) -> Path:
        return self.state / "id_ed25519"

    @property
    def host_key(self) -> Path:
        return self.state / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.state / "authorized_keys"

    @property
    def known_host(self) -> Path:
        return self.state / "ssh_host_ed25519_key.pub"

    @property
    def lock(self) -> Path:
        return self.state / "vm.lock"

    @property
    def status_file(self) -> Path:
        return self.state / "status.json"

    @property
    def console_log(self) -> Path:
        return self.state / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.state / "qemu.log"

    @property
    def daemon_log(self) -> Path:
        return self.state / "daemon.log"

    @property
    def guest_config(self) -> Path:
        return self.state / "guest.conf"

    @property
    def pidfile(self) -> Path:
        return self.state / "qemu.pid"

    # runtime: gone when the VM stops
    @property
    def qmp(self) -> Path:
        return self.run / "qmp.sock"

    @property
    def agent(self) -> Path:
        return self.run / "agent.sock"

    @property
    def engine_port(self) -> Path:
        return self.run / "engine-port.sock"

    def share_port(self, index: int) -> Path:
        return self.run / f"share{index}.sock"

    @property
    def control(self) -> Path:
        return self.run / "daemon.sock"

    @property
    def engine(self) -> Path:
        return self.run / "engine.sock"

    @property
    def standby_pid(self) -> Path:
        return self.run / "standby.pid"

    @property
    def engine_pipe(self) -> str:
        """The engine's named pipe on Windows: ``\\\\.\\pipe\\pydesk_engine`` for the VM named
        "default", ``pydesk_engine_<name>`` for others. Pipe names are machine-wide, so under
        ``PYDESK_HOME`` a hash of that folder is added: isolated homes never share a pipe."""
        return engine_pipe(self.name, _home())


def engine_pipe(name: str, home: Path | None = None) -> str:
    if not name or any(c in name for c in "\\/") or not name.isprintable():
        raise ConfigError(f"VM name {name!r} cannot name a pipe", hint="use letters, digits, '-', '_' or '.'")
    pipe = ENGINE_PIPE if name == "default" else f"{ENGINE_PIPE}_{name}"
    if home is not None:
        pipe += "-" + hashlib.sha256(str(home).encode()).hexdigest()[:12]
    if len(pipe) > PIPE_NAME_MAX:
        raise ConfigError(f"VM name {name!r} is too long for a pipe name", hint="use a shorter --name")
    return PIPE_DIR + pipe
