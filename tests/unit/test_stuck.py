"""vmkit/stuck.py: the one-line vCPU and virtqueue summaries, on output captured from QEMU
7.2's HMP ``info registers -a``, ``info virtio`` and ``info virtio-queue-status`` (the
indices of the stuck queues edited in), and vmkit/bootwatch.py's silent-console check."""

from __future__ import annotations

from pathlib import Path

from vmkit.bootwatch import console_silent
from vmkit.stuck import queue_fields, queue_note, vcpu_summary, virtio_devices, virtqueue_summary

#: The guest kernel idling 6 s into a TCG boot (two vCPUs; register lines trimmed).
KERNEL = """\
CPU#0
RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=ffffffff88417a0b RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 ffffffff 00c00000
CPU#1
RAX=0000000000000001 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000000000
RIP=ffffffff87fdacf8 RFL=00000257 [---ZAPC] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 0000000000000000 ffffffff 00c00000
"""

#: A vCPU at the reset vector (32-bit register names), as QEMU started with -S shows it.
RESET = """\
CPU#0
EAX=00000000 EBX=00000000 ECX=00000000 EDX=00060fb1
ESI=00000000 EDI=00000000 EBP=00000000 ESP=00000000
EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 00000000 0000ffff 00009300
"""

#: The shape of an aarch64 guest's dump (no RIP, a PC).
ARM = """\
CPU#0
 PC=ffff80000801d3c4  X00=0000000000000000 X01=0000000000000000
CPU#1
 PC=FFFF80000801D3C4  X00=0000000000000000 X01=0000000000000000
"""


def test_each_vcpu_in_one_line() -> None:
    assert vcpu_summary(KERNEL) == ("vCPU0 RIP=ffffffff88417a0b CPL=0 halted, "
                                    "vCPU1 RIP=ffffffff87fdacf8 CPL=0")


def test_a_vcpu_in_32_bit_mode() -> None:
    assert vcpu_summary(RESET) == "vCPU0 EIP=0000fff0 CPL=0"


def test_other_targets_give_their_pc() -> None:
    assert vcpu_summary(ARM) == "vCPU0 PC=ffff80000801d3c4, vCPU1 PC=ffff80000801d3c4"


def test_unreadable_dumps_still_make_a_line() -> None:
    assert vcpu_summary("") == "no vCPU state"
    assert vcpu_summary("CPU#0\nsomething else\n") == "vCPU0 ?"


#: HMP ``info virtio`` of a pydesk guest under TCG: the root and data disks, the serial ports, the RNG.
INFO_VIRTIO = ("/machine/peripheral-anon/device[3]/virtio-backend [virtio-rng]\r\n"
               "/machine/peripheral-anon/device[2]/virtio-backend [virtio-serial]\r\n"
               "/machine/peripheral-anon/device[1]/virtio-backend [virtio-blk]\r\n"
               "/machine/peripheral-anon/device[0]/virtio-backend [virtio-blk]\r\n")


def queue_status(path: str, name: str, index: int, inuse: int = 0, used: int = 0, signalled: int = 0,
                 valid: bool = True, avail: int = 0, shadow: int = 0, desc: int = 0x10a2c000) -> str:
    return (f"{path}:\r\n  device_name:          {name}\r\n  queue_index:          {index}\r\n"
            f"  inuse:                {inuse}\r\n  used_idx:             {used}\r\n"
            f"  signalled_used:       {signalled}\r\n  signalled_used_valid: {str(valid).lower()}\r\n"
            f"  last_avail_idx:       {avail}\r\n  shadow_avail_idx:     {shadow}\r\n  VRing:\r\n"
            f"    num:          256\r\n    num_default:  256\r\n    align:        4096\r\n"
            f"    desc:         0x{desc:016x}\r\n    avail:        0x{desc + 0x1000:016x}\r\n"
            f"    used:         0x{desc + 0x2000:016x}\r\n")


def fake_monitor(queues: dict[tuple[str, int], str]):  # type: ignore[no-untyped-def]
    def hmp(command: str) -> str:
        if command == "info virtio":
            return INFO_VIRTIO
        _, _, path, index = command.split()
        if (path, int(index)) in queues:
            return queues[(path, int(index))]
        return f"Error: Invalid virtqueue number {index}\r\n"
    return hmp


def test_devices_in_qemus_listing() -> None:
    assert virtio_devices(INFO_VIRTIO) == [
        ("/machine/peripheral-anon/device[3]/virtio-backend", "virtio-rng"),
        ("/machine/peripheral-anon/device[2]/virtio-backend", "virtio-serial"),
        ("/machine/peripheral-anon/device[1]/virtio-backend", "virtio-blk"),
        ("/machine/peripheral-anon/device[0]/virtio-backend", "virtio-blk")]


def test_queue_fields_and_errors() -> None:
    fields = queue_fields(queue_status("/p", "virtio-blk", 1, inuse=2, used=7, signalled=7, avail=9, shadow=9))
    assert fields is not None
    assert (fields["queue_index"], fields["inuse"], fields["used_idx"], fields["desc"]) == ("1", "2", "7", "0x0000000010a2c000")
    assert queue_fields("Error: Invalid virtqueue number 2\r\n") is None
    assert queue_fields("Error: Path /nonexistent is not a VirtIODevice\r\n") is None


def test_what_makes_a_queue_worth_naming() -> None:
    def note(**kw: int | bool) -> str | None:
        fields = queue_fields(queue_status("/p", "virtio-blk", 0, **kw))  # type: ignore[arg-type]
        assert fields is not None
        return queue_note(fields)

    assert note(used=41, signalled=41, avail=41, shadow=41) is None  # at rest
    assert note(inuse=1, used=40, signalled=40, avail=41, shadow=41) == "1 in use"
    assert note(used=41, signalled=40, avail=41, shadow=41) == "used 41 signalled 40"
    assert note(used=41, signalled=40, valid=False, avail=41, shadow=41) is None  # nothing signalled yet
    assert note(used=40, signalled=40, avail=40, shadow=42) == "available 42 taken 40"
    serial = queue_fields(queue_status("/p", "virtio-serial", 4, used=17, signalled=17, avail=17, shadow=145))
    assert serial is not None and queue_note(serial) is None  # input buffers posted ahead: normal
    assert note(inuse=3, used=5, signalled=4, avail=8, shadow=9) == "3 in use, used 5 signalled 4, available 9 taken 8"
    assert note(inuse=1, desc=0) is None  # a queue the guest never set up


def test_summary_names_devices_in_creation_order() -> None:
    root, data = "/machine/peripheral-anon/device[0]/virtio-backend", "/machine/peripheral-anon/device[1]/virtio-backend"
    serial = "/machine/peripheral-anon/device[2]/virtio-backend"
    rng = "/machine/peripheral-anon/device[3]/virtio-backend"
    quiet = {(root, 0): queue_status(root, "virtio-blk", 0, used=900, signalled=900, avail=900, shadow=900),
             (root, 1): queue_status(root, "virtio-blk", 1),
             (data, 0): queue_status(data, "virtio-blk", 0, used=12, signalled=12, avail=12, shadow=12),
             (data, 1): queue_status(data, "virtio-blk", 1, used=30, signalled=30, avail=30, shadow=30),
             **{(serial, q): queue_status(serial, "virtio-serial", q) for q in range(8)},
             (rng, 0): queue_status(rng, "virtio-rng", 0, desc=0)}
    assert virtqueue_summary(fake_monitor(quiet)) == "virtqueues: all at rest"
    stuck = dict(quiet)
    stuck[(data, 1)] = queue_status(data, "virtio-blk", 1, inuse=1, used=30, signalled=30, avail=31, shadow=31)
    stuck[(serial, 5)] = queue_status(serial, "virtio-serial", 5, used=77, signalled=76, avail=80, shadow=80)
    # an input queue with buffers posted ahead, as a running guest's serial ports always have
    stuck[(serial, 4)] = queue_status(serial, "virtio-serial", 4, used=17, signalled=17, avail=17, shadow=145)
    assert virtqueue_summary(fake_monitor(stuck)) == (
        "virtqueues: virtio-blk#1 q1: 1 in use; virtio-serial#0 q5: used 77 signalled 76")
    stuck[(data, 0)] = queue_status(data, "virtio-blk", 0, used=12, signalled=12, avail=12, shadow=14)
    assert virtqueue_summary(fake_monitor(stuck)) == (
        "virtqueues: virtio-blk#1 q0: available 14 taken 12; virtio-blk#1 q1: 1 in use; "
        "virtio-serial#0 q5: used 77 signalled 76")


def test_console_silence(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console_silent(log)  # not written yet
    log.write_bytes(b"")
    assert console_silent(log)
    log.write_bytes(b"\r\n  \n")
    assert console_silent(log)
    log.write_bytes(b"[2.44] pydesk-guest: file systems mounted\n")
    assert not console_silent(log)
