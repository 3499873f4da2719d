"""SSH keys for the agent channel, made on the host and handed to the guest via fw_cfg.

The guest's host key is ours too, so the daemon pins it exactly: no trust-on-first-use.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vmkit.paths import VMPaths


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _generate(private: Path, comment: str) -> bytes:
    """Create an ed25519 key at ``private`` unless present; return its public line."""
    if not private.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        _write_private(private, pem)
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return pub + f" {comment}\n".encode()


def ensure_keys(paths: VMPaths) -> None:
    """The client key, the guest host key, and the authorized_keys the guest reads."""
    client_pub = _generate(paths.client_key, "pydesk-daemon")
    host_pub = _generate(paths.host_key, "pydesk-guest")
    _write_private(paths.authorized_keys, client_pub)
    _write_private(paths.known_host, host_pub)
