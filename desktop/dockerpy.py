"""docker-py, imported the way the CLI needs it.

docker-py imports paramiko (for ``ssh://`` engine hosts) when it is imported, and paramiko
with what it pulls in is about a third of `pydesk run`'s start-up. pydesk's engine is always
a local socket or pipe, so the CLI imports docker-py with paramiko kept out; paramiko itself
can still be imported afterwards (`pydesk vm shell` uses it).
"""

from __future__ import annotations

import sys
from types import ModuleType


def load() -> ModuleType:
    """The ``docker`` package, without its SSH transport."""
    if "docker" in sys.modules:
        return sys.modules["docker"]
    keep_out = "paramiko" not in sys.modules
    if keep_out:
        sys.modules["paramiko"] = None  # type: ignore[assignment]  # `import paramiko` raises ImportError
    try:
        import docker
    finally:
        if keep_out and sys.modules.get("paramiko", ...) is None:
            del sys.modules["paramiko"]
    return docker
