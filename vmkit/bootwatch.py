"""Telling a guest stuck before userspace from a slow one, and what its vCPUs were doing.

A fresh guest prints its first console line ("file systems mounted", guest rc.boot) about 3 s
into a TCG boot here, before it mounts the data disk or opens the agent port. Once (cycle 15
of the twenty start/stop cycles test, in a full test run) a guest printed nothing at all and
never opened the port; the test passed when run again. ``VM.start`` starts such a guest again,
with a new QEMU, once, after logging the state of its vCPUs (``vcpu_summary``), and reports
that state if the boot still fails.
"""

from __future__ import annotations

import re
from pathlib import Path

#: Seconds a fresh boot may stay silent (nothing on the console, the agent port closed) before
#: the guest is started again: 20 times a normal boot's first console line, under TCG.
BOOT_SILENCE = 60.0

_CPU = re.compile(r"^CPU#(\d+)", re.MULTILINE)
_IP = re.compile(r"\b([RE]IP)=([0-9a-fA-F]+)\b.*?\bCPL=(\d)\b.*?\bHLT=(\d)")  # 64- or 32-bit mode
_PC = re.compile(r"\bPC=([0-9a-fA-F]+)\b")


def console_silent(path: Path) -> bool:
    """Nothing but whitespace on the guest console (a missing log counts as silent)."""
    try:
        with open(path, "rb") as f:
            return not f.read(4096).strip()
    except FileNotFoundError:
        return True


def vcpu_summary(info_registers: str) -> str:
    """One line from HMP ``info registers -a``: each vCPU's instruction pointer, privilege
    level and whether it sits in HLT (x86), or its PC (other targets)."""
    parts = []
    blocks = _CPU.split(info_registers)
    # re.split with one group: [before, "0", block0, "1", block1, ...]
    for number, block in zip(blocks[1::2], blocks[2::2]):
        if m := _IP.search(block):
            name, ip, cpl, hlt = m.groups()
            parts.append(f"vCPU{number} {name}={ip.lower()} CPL={cpl}{' halted' if hlt == '1' else ''}")
        elif m := _PC.search(block):
            parts.append(f"vCPU{number} PC={m.group(1).lower()}")
        else:
            parts.append(f"vCPU{number} ?")
    return ", ".join(parts) or "no vCPU state"
