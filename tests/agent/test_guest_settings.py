"""The one reader of the VM's settings in the guest (agent/guest_settings.py), on what the
host writes (vmkit/vm.py guest_config)."""

from __future__ import annotations

from pathlib import Path

from agent import guest_settings
from vmkit.settings import Settings
from vmkit.spec import Accel
from vmkit.vm import guest_config


def test_reads_what_the_host_writes(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(guest_config(Settings(dns=("1.1.1.1",), host_services=("5000:5001",),
                                          registry_mirrors=("docker.io=http://127.0.0.1:5000",),
                                          mirror_only=True), accel=Accel.TCG))
    assert guest_settings.read(path) == [("accel", "tcg"), ("dns", "1.1.1.1"), ("host-service", "5000"),
                                         ("mirror", "docker.io=http://127.0.0.1:5000"), ("mirror-only", "1")]
    assert guest_settings.values("mirror", path) == ["docker.io=http://127.0.0.1:5000"]
    assert guest_settings.values("insecure", path) == []


def test_no_file_and_lines_without_a_value(tmp_path: Path) -> None:
    assert guest_settings.read(tmp_path / "missing") == []
    path = tmp_path / "config"
    path.write_text(guest_config(Settings()))  # "# no overrides"
    assert guest_settings.read(path) == []
