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


@dataclasses.dataclass(frozen=True)
class Settings:
    cpus: int = 2
    memory_mib: int = 2048
    disk_gib: int = 20
    accel: str = "auto"  # auto, or one of Accel
    ports: tuple[PortForward, ...] = ()
    shares: tuple[Share, ...] = ()
    dns: tuple[str, ...] = ()
    restrict_network: bool = False
    layout: str = "auto"  # auto (the image's default), or one of BootLayout

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

    @property
    def requested_accel(self) -> Accel | None:
        return None if self.accel == "auto" else Accel(self.accel)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ports"] = [str(p) for p in self.ports]
        d["shares"] = [dataclasses.asdict(s) for s in self.shares]
        d["dns"] = list(self.dns)
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
                kw["shares"] = tuple(Share(**s) for s in kw["shares"])
            if "dns" in kw:
                kw["dns"] = tuple(str(x) for x in kw["dns"])
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
