"""vmkit/bootwatch.py: the silent-console check and the one-line vCPU summary, on output
captured from QEMU 7.2's HMP ``info registers -a``."""

from __future__ import annotations

from pathlib import Path

from vmkit.bootwatch import console_silent, vcpu_summary

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


def test_console_silence(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert console_silent(log)  # not written yet
    log.write_bytes(b"")
    assert console_silent(log)
    log.write_bytes(b"\r\n  \n")
    assert console_silent(log)
    log.write_bytes(b"[2.44] pydesk-guest: file systems mounted\n")
    assert not console_silent(log)
