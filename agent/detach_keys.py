"""Detach keys: the key sequence that ends an attached terminal session and leaves the
container (or the exec) running, Docker's ``--detach-keys`` / ``detachKeys``.

The spelling is Docker's: keys separated by commas, each a single character or ``ctrl-<c>``
for <c> one of ``a``-``z``, ``@``, ``[``, ``\\``, ``]``, ``^``, ``_``; the default is
``ctrl-p,ctrl-q``. Used on both ends: the engine watches the input of a terminal session it
serves (for API clients), and the ``pydesk`` CLI watches its own terminal, as the docker CLI
does, so that it can stop at once.
"""

from __future__ import annotations

DEFAULT = "ctrl-p,ctrl-q"

_CTRL = {f"ctrl-{c}": i for i, c in enumerate("@abcdefghijklmnopqrstuvwxyz[\\]^_")}


class DetachKeysError(ValueError):
    """A detach key sequence that is not one."""


def parse(spec: str | None) -> bytes:
    """The bytes of a detach key sequence; ``None`` or ``""`` is the default."""
    if not spec:
        spec = DEFAULT
    out = bytearray()
    for key in spec.split(","):
        if len(key) == 1:
            if not 0x20 <= ord(key) < 0x7F:
                raise DetachKeysError(f"invalid detach keys {spec!r}: {key!r} is not a printable ASCII key")
            out.append(ord(key))
        elif key in _CTRL:
            out.append(_CTRL[key])
        else:
            raise DetachKeysError(f"invalid detach keys {spec!r}: unknown key {key!r} "
                                  "(a single character or ctrl-<a-z, @, [, \\, ], ^ or _>)")
    return bytes(out)


class Scanner:
    """Watches a stream of input for the sequence. ``feed`` returns what to pass on and whether
    the sequence has been typed; bytes that may be its beginning are held back until the next
    input shows whether they are (then they are dropped) or not (then they go on, in order)."""

    def __init__(self, keys: bytes) -> None:
        if not keys:
            raise DetachKeysError("empty detach key sequence")
        self.keys = keys
        self._held = 0  # how many of keys[:n] the input has ended with

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        keys = self.keys
        for i, byte in enumerate(data):
            if byte == keys[self._held]:
                self._held += 1
                if self._held == len(keys):
                    self._held = 0
                    return bytes(out), True  # what followed the sequence is not passed on
                continue
            if not self._held:
                out.append(byte)
                continue
            # a mismatch after part of the sequence: keep the longest tail of what was held
            # plus this byte that still begins the sequence; the rest goes on
            seen = keys[:self._held] + data[i:i + 1]
            keep = next(k for k in range(len(seen), -1, -1) if k < len(keys) and seen[len(seen) - k:] == keys[:k])
            out += seen[:len(seen) - keep]
            self._held = keep
        return bytes(out), False

    def flush(self) -> bytes:
        """The bytes held back, at the end of the input."""
        held, self._held = self.keys[:self._held], 0
        return held
