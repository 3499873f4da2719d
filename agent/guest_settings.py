"""The VM's settings as the host gave them to the guest: ``key=value`` lines, written by the
host (vmkit/vm.py ``guest_config``), passed through fw_cfg and copied to GUEST_SETTINGS by the
guest's rc.boot. One reader for every part of the engine that needs one of them."""

from __future__ import annotations

from pathlib import Path

GUEST_SETTINGS = Path("/run/pydesk/config")


def read(path: Path | str = GUEST_SETTINGS) -> list[tuple[str, str]]:
    """(key, value) of every ``key=value`` line, in order; none if there is no settings file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [(key, value) for key, sep, value in (line.partition("=") for line in lines) if sep]


def values(key: str, path: Path | str = GUEST_SETTINGS) -> list[str]:
    """The values of every ``key=`` line, in order."""
    return [v for k, v in read(path) if k == key]
