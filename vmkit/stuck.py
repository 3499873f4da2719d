"""What a guest that stopped answering looks like from the host, in one line each.

Used when a boot stays silent (``VM.start``) and when a gentle stop step misses
(``VM.stop``), so the daemon's log says where the guest was instead of only that it did not
answer:

- ``vcpu_summary``: each vCPU's instruction pointer, privilege level and whether it sits in
  HLT, from HMP ``info registers -a``. Firmware or kernel addresses, spinning or halted.
- ``virtqueue_summary``: every virtqueue that is not at rest, from HMP ``info virtio`` and
  ``info virtio-queue-status`` (QEMU 7.2+). A queue with requests in use is one whose
  requests the device (QEMU) has not completed; a used index ahead of the last signalled one
  is a completion the guest was not told about; on a disk, an available index ahead of the
  device's is requests the device has not picked up. A guest whose disk writes never complete and one whose
  completions are never seen look the same from inside; these say which.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_CPU = re.compile(r"^CPU#(\d+)", re.MULTILINE)
_IP = re.compile(r"\b([RE]IP)=([0-9a-fA-F]+)\b.*?\bCPL=(\d)\b.*?\bHLT=(\d)")  # 64- or 32-bit mode
_PC = re.compile(r"\bPC=([0-9a-fA-F]+)\b")
_DEVICE = re.compile(r"^(/\S+) \[([\w-]+)\]\s*$", re.MULTILINE)
_FIELD = re.compile(r"^\s*(\w+):\s+(\S+)\s*$", re.MULTILINE)
MAX_QUEUES = 64  # a device's queues are asked for until QEMU says there is no such queue


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


def virtio_devices(info_virtio: str) -> list[tuple[str, str]]:
    """(QOM path, device name) of each line of HMP ``info virtio``, in QEMU's order."""
    return _DEVICE.findall(info_virtio)


def queue_fields(status: str) -> dict[str, str] | None:
    """The fields of HMP ``info virtio-queue-status``; None for an error (no such queue)."""
    if status.lstrip().startswith("Error:"):
        return None
    fields = dict(_FIELD.findall(status))
    return fields if "queue_index" in fields else None


def queue_note(fields: dict[str, str]) -> str | None:
    """What is unusual about one queue, or None for a queue at rest (or never set up)."""
    if int(fields.get("desc", "0"), 16) == 0:
        return None  # the guest never set this queue up
    inuse = int(fields.get("inuse", "0"))
    used, signalled = int(fields.get("used_idx", "0")), int(fields.get("signalled_used", "0"))
    avail, shadow = int(fields.get("last_avail_idx", "0")), int(fields.get("shadow_avail_idx", "0"))
    notes = []
    if inuse:
        notes.append(f"{inuse} in use")
    if fields.get("signalled_used_valid") == "true" and used != signalled:
        notes.append(f"used {used} signalled {signalled}")
    if shadow != avail and fields.get("device_name") == "virtio-blk":
        # Only a disk's queues carry requests; on the others the guest posts buffers ahead for
        # the device to fill (serial input, entropy), so buffers not taken are normal there.
        notes.append(f"available {shadow} taken {avail}")
    return ", ".join(notes) or None


def virtqueue_summary(hmp: Callable[[str], str]) -> str:
    """One line naming every virtqueue not at rest, e.g. ``virtio-blk#1 q0: 1 in use``
    (``#n`` counts devices of that name in QEMU's order), or that all are at rest."""
    seen: dict[str, int] = {}
    notes = []
    for path, name in reversed(virtio_devices(hmp("info virtio"))):  # QEMU lists the last created first
        number = seen[name] = seen.get(name, -1) + 1
        for q in range(MAX_QUEUES):
            fields = queue_fields(hmp(f"info virtio-queue-status {path} {q}"))
            if fields is None:
                break
            if note := queue_note(fields):
                notes.append(f"{name}#{number} q{q}: {note}")
    return "virtqueues: " + ("; ".join(notes) if notes else "all at rest")
