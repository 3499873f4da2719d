"""Accelerator choice. The kvm probe runs for real on Linux; hvf and whpx cannot run here, so
their probe boots are replaced and the logic around them is tested."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmkit import accel
from vmkit.accel import AccelChoice, choose, native_candidate
from vmkit.errors import ConfigError
from vmkit.host import Host, detect
from vmkit.spec import Accel, Arch, HostOS


def test_native_candidates() -> None:
    assert native_candidate(Host(HostOS.LINUX, Arch.X86_64), Arch.X86_64) is Accel.KVM
    assert native_candidate(Host(HostOS.DARWIN, Arch.AARCH64), Arch.AARCH64) is Accel.HVF
    assert native_candidate(Host(HostOS.WINDOWS, Arch.X86_64), Arch.X86_64) is Accel.WHPX
    # a foreign guest architecture always needs tcg
    assert native_candidate(Host(HostOS.DARWIN, Arch.AARCH64), Arch.X86_64) is None


def test_foreign_arch_gets_tcg_with_reason() -> None:
    c = choose(Host(HostOS.LINUX, Arch.X86_64), Arch.AARCH64, "/nonexistent")
    assert c == AccelChoice(Accel.TCG, "no hardware accelerator for aarch64 guests on a x86_64 host")


def test_probe_result_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Accel] = []

    def fake_probe(host, guest, a, kernel, deadline=5.0):  # hvf cannot boot on Linux
        calls.append(a)
        return None

    monkeypatch.setattr(accel, "probe_boot", fake_probe)
    monkeypatch.setattr(accel, "precheck", lambda a: None)
    host = Host(HostOS.DARWIN, Arch.AARCH64)
    cache = tmp_path / "probe.json"
    assert choose(host, Arch.AARCH64, "/k", cache_file=cache).accel is Accel.HVF
    assert choose(host, Arch.AARCH64, "/k", cache_file=cache).accel is Accel.HVF
    assert calls == [Accel.HVF]


def test_failed_probe_falls_back_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "probe_boot", lambda *a, **k: "QEMU failed with whpx: WHPX: No accelerator found")
    monkeypatch.setattr(accel, "precheck", lambda a: None)
    c = choose(Host(HostOS.WINDOWS, Arch.X86_64), Arch.X86_64, "/k", cache_file=tmp_path / "c.json")
    assert c.accel is Accel.TCG
    assert c.reason.startswith("whpx unusable: QEMU failed with whpx: WHPX: No accelerator found; using tcg")


def test_requested_accelerator_that_fails_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "precheck", lambda a: "/dev/kvm does not exist")
    with pytest.raises(ConfigError, match="accelerator kvm does not work here: /dev/kvm does not exist"):
        choose(Host(HostOS.LINUX, Arch.X86_64), Arch.X86_64, "/k", requested=Accel.KVM)
    with pytest.raises(ConfigError, match="hvf is not available on linux"):
        choose(Host(HostOS.LINUX, Arch.X86_64), Arch.X86_64, "/k", requested=Accel.HVF)
    assert choose(Host(HostOS.LINUX, Arch.X86_64), Arch.X86_64, "/k", requested=Accel.TCG).accel is Accel.TCG


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs a Linux host")
def test_real_kvm_probe_agrees_with_a_real_boot(guest_kernel: str) -> None:
    """The real probe, real QEMU: on this CI machine /dev/kvm exists but cannot boot a guest,
    and the probe must say so; on a machine with working KVM it must pick kvm."""
    host = detect()
    why_kvm = accel.precheck(Accel.KVM) or accel.probe_boot(host, Arch.X86_64, Accel.KVM, guest_kernel)
    assert accel.probe_boot(host, Arch.X86_64, Accel.TCG, guest_kernel) is None  # tcg always boots
    c = choose(host, Arch.X86_64, guest_kernel)
    if why_kvm is None:
        assert c.accel is Accel.KVM
    else:
        assert c.accel is Accel.TCG and "kvm unusable" in c.reason
        if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.W_OK):
            assert "printed nothing" in why_kvm or "QEMU failed" in why_kvm
