"""Telling a guest stuck before userspace from a slow one.

A fresh guest prints its first console line ("file systems mounted", guest rc.boot) about 3 s
into a TCG boot here, before it mounts the data disk or opens the agent port. Once (cycle 15
of the twenty start/stop cycles test, in a full test run) a guest printed nothing at all and
never opened the port; the test passed when run again. ``VM.start`` starts such a guest again,
with a new QEMU, once, after logging the state of its vCPUs and virtqueues (``vmkit.stuck``),
and reports its vCPUs' state if the boot still fails.
"""

from __future__ import annotations

from pathlib import Path

#: Seconds a fresh boot may stay silent (nothing on the console, the agent port closed) before
#: the guest is started again: 20 times a normal boot's first console line, under TCG.
BOOT_SILENCE = 60.0


def console_silent(path: Path) -> bool:
    """Nothing but whitespace on the guest console (a missing log counts as silent)."""
    try:
        with open(path, "rb") as f:
            return not f.read(4096).strip()
    except FileNotFoundError:
        return True
