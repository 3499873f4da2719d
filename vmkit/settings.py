"""User settings for a VM, stored as JSON in the config dir (``settings.json``).

Unknown keys are an error (a typo should not be silently ignored); a damaged file is
reported with its path and position and never overwritten.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from vmkit.errors import ConfigError
from vmkit.paths import config_dir
from vmkit.spec import Accel, BootLayout, PortForward, Share

MIN_MEMORY_MIB = 256


def parse_mib(text: str | int, *, what: str, default_unit: str = "M") -> int:
    """'2G', '512M', '2048' (read in ``default_unit``) -> MiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, suffix = text, default_unit
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([MmGg])?(?:[iI]?[bB])?\s*", str(text))
        if not m:
            raise ConfigError(f"invalid {what} {text!r}", hint="use a number with M or G, e.g. 2G")
        value, suffix = int(m[1]), (m[2] or default_unit).upper()
    return value * 1024 if suffix == "G" else value


def parse_host_service(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not m or not all(1 <= int(x) <= 65535 for x in m.groups()):
        raise ConfigError(f"invalid host service {text!r}", hint="use GUESTPORT:HOSTPORT, e.g. 5000:5000")
    return int(m[1]), int(m[2])


@dataclasses.dataclass(frozen=True)
class Settings:
    cpus: int = 2
    memory_mib: int = 2048
    disk_gib: int = 20
    accel: str = "auto"  # auto, or one of Accel
    ports: tuple[PortForward, ...] = ()
    #: Host folders shared into the VM, besides the home folder (see vmkit/shares.py).
    shares: tuple[Share, ...] = ()
    #: Share the user's home folder (at the same path in the VM).
    share_home: bool = True
    #: How shares reach the VM: "auto" (virtiofs where it works: Linux host, daemon as root,
    #: virtiofsd installed, read-write share; else sftp on its own port), "sftp" or "virtiofs".
    share_transport: str = "auto"
    dns: tuple[str, ...] = ()
    restrict_network: bool = False
    layout: str = "auto"  # auto (the image's default), or one of BootLayout
    #: Host services the guest may reach: "GUESTPORT:HOSTPORT" makes 127.0.0.1:GUESTPORT in
    #: the VM a connection to 127.0.0.1:HOSTPORT on the host (over the agent channel).
    host_services: tuple[str, ...] = ()
    #: Registry mirrors, "REGISTRY=URL" (e.g. "docker.io=http://127.0.0.1:5000").
    registry_mirrors: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    #: Never fall back from a mirror to the registry itself.
    mirror_only: bool = False

    def __post_init__(self) -> None:
        ncpu = os.cpu_count() or 1
        if not isinstance(self.cpus, int) or not 1 <= self.cpus <= max(ncpu, 1) * 4:
            raise ConfigError(f"cpus must be between 1 and {ncpu * 4}, not {self.cpus!r}")
        if not isinstance(self.memory_mib, int) or self.memory_mib < MIN_MEMORY_MIB:
            raise ConfigError(f"memory must be at least {MIN_MEMORY_MIB}M, not {self.memory_mib!r}M")
        if not isinstance(self.disk_gib, int) or not 1 <= self.disk_gib <= 4096:
            raise ConfigError(f"disk must be between 1G and 4096G, not {self.disk_gib!r}G")
        if self.accel != "auto" and self.accel not in set(Accel):
            raise ConfigError(f"unknown accelerator {self.accel!r}", hint="use auto, kvm, hvf, whpx or tcg")
        if self.layout != "auto" and self.layout not in set(BootLayout):
            raise ConfigError(f"unknown boot layout {self.layout!r}", hint="use auto, erofs or initramfs")
        if self.share_transport not in ("auto", "sftp", "virtiofs"):
            raise ConfigError(f"unknown share_transport {self.share_transport!r}", hint="use auto, sftp or virtiofs")
        for svc in self.host_services:
            parse_host_service(svc)
        for m in self.registry_mirrors:
            reg, eq, url = m.partition("=")
            if not eq or not reg or not re.match(r"^https?://[^/\s]+", url):
                raise ConfigError(f"invalid registry mirror {m!r}", hint="use REGISTRY=URL, e.g. docker.io=http://127.0.0.1:5000")

    @property
    def requested_accel(self) -> Accel | None:
        return None if self.accel == "auto" else Accel(self.accel)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ports"] = [str(p) for p in self.ports]
        d["shares"] = [dataclasses.asdict(s) for s in self.shares]
        for key in ("dns", "host_services", "registry_mirrors", "insecure_registries"):
            d[key] = list(getattr(self, key))
        return d

    @classmethod
    def from_json(cls, data: object, source: str = "settings") -> Settings:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}", hint=f"known settings: {', '.join(sorted(known))}")
        kw: dict[str, Any] = dict(data)
        try:
            if "ports" in kw:
                kw["ports"] = tuple(PortForward.parse(p) for p in kw["ports"])
            if "shares" in kw:
                if not isinstance(kw["shares"], list) or not all(isinstance(s, dict) for s in kw["shares"]):
                    raise ConfigError(f"{source}: shares must be a list of objects like "
                                      '{"host_path": "/path", "read_only": false}')
                kw["shares"] = tuple(Share(**s) for s in kw["shares"])
            for key in ("dns", "host_services", "registry_mirrors", "insecure_registries"):
                if key in kw:
                    if not isinstance(kw[key], list):
                        raise ConfigError(f"{source}: {key} must be a list")
                    kw[key] = tuple(str(x) for x in kw[key])
            if "memory_mib" in kw and isinstance(kw["memory_mib"], str):
                kw["memory_mib"] = parse_mib(kw["memory_mib"], what="memory")
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        return cls(**kw)


def settings_path() -> Path:
    return config_dir() / "settings.json"


def load(path: Path | None = None) -> Settings:
    path = path or settings_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Settings()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                          hint="fix the file, or delete it to go back to the defaults") from exc
    return Settings.from_json(data, source=f"config file {path}")


def save(settings: Settings, path: Path | None = None) -> Path:
    path = path or settings_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path
