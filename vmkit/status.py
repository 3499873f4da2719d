"""The VM's last known state on disk, for when no daemon is there to ask."""

from __future__ import annotations

import json
import os
from typing import Any

from vmkit.paths import VMPaths


def write_status(paths: VMPaths, status: dict[str, Any]) -> None:
    paths.state.mkdir(parents=True, exist_ok=True)
    tmp = paths.status_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2, default=str) + "\n")
    os.replace(tmp, paths.status_file)


def read_status(paths: VMPaths) -> dict[str, Any]:
    try:
        data = json.loads(paths.status_file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
