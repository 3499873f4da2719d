"""crun at fixed addresses under TCG (agent/runtime.py ``fixed_addresses``): what the engine
starts in the block, from the thread that starts it, runs without address-space
randomisation; nothing else does, and every container's config gives its own processes the
default personality back. Real processes read their personality from /proc."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import runtime
from agent.__main__ import guest_accel

SAY = f"""#!{sys.executable}
print(open("/proc/self/personality").read().strip())
"""


def personality() -> int:
    return int(subprocess.run(["cat", "/proc/self/personality"], capture_output=True, text=True,
                              check=True).stdout, 16)


@pytest.fixture
def fixed() -> Iterator[None]:
    runtime.use_fixed_addresses(True)
    yield
    runtime.use_fixed_addresses(False)


def test_children_of_the_block_run_at_fixed_addresses(fixed: None) -> None:
    base = personality()
    assert not base & runtime.ADDR_NO_RANDOMIZE
    go, done = threading.Event(), threading.Event()
    other: list[int] = []

    def elsewhere() -> None:  # a thread of the engine's pool, started before the block
        go.wait(10)
        other.append(personality())
        done.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    with runtime.fixed_addresses():
        assert personality() == base | runtime.ADDR_NO_RANDOMIZE
        go.set()  # another thread's child, started meanwhile, keeps its randomisation
        assert done.wait(10)
    t.join()
    assert other == [base]
    assert personality() == base  # and the block leaves the thread as it found it


def test_off_unless_the_engine_turns_it_on() -> None:
    base = personality()
    with runtime.fixed_addresses():
        assert personality() == base


def test_crun_calls_start_crun_at_fixed_addresses(fixed: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = tmp_path / "crun"
    stand_in.write_text(SAY)
    stand_in.chmod(0o755)
    monkeypatch.setattr(runtime, "CRUN", str(stand_in))
    out = runtime.crun("state", "x").stdout.decode().strip()
    assert int(out, 16) & runtime.ADDR_NO_RANDOMIZE


def test_every_container_gets_the_default_personality_back() -> None:
    spec = runtime.ContainerSpec(id="c" * 64, rootfs="/r", process=runtime.ProcessSpec(args=("true",)),
                                 hostname="h")
    assert runtime.oci_config(spec)["linux"]["personality"] == {"domain": "LINUX"}


def test_the_engine_reads_the_accelerator_from_the_guest_settings(tmp_path: Path) -> None:
    config = tmp_path / "config"
    assert guest_accel(config) is None  # no settings file
    config.write_text("dns=1.1.1.1\naccel=tcg\nmirror=docker.io=http://127.0.0.1:5000\n")
    assert guest_accel(config) == "tcg"
    config.write_text("accel=kvm\n")
    assert guest_accel(config) == "kvm"
    config.write_text("# no overrides\n")
    assert guest_accel(config) is None
