from __future__ import annotations

from pathlib import Path

import pytest

from vmkit import settings as st
from vmkit.errors import ConfigError
from vmkit.spec import Accel, PortForward, Protocol


def test_defaults_when_missing(tmp_path: Path) -> None:
    assert st.load(tmp_path / "none.json") == st.Settings()


def test_round_trip(tmp_path: Path) -> None:
    s = st.Settings(cpus=1, memory_mib=1024, disk_gib=8, ports=(PortForward.parse("8080:80"),), dns=("1.1.1.1",))
    path = st.save(s, tmp_path / "settings.json")
    assert st.load(path) == s


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "is not valid JSON (line 1, column 2"),
    ("[1, 2]", "expected a JSON object"),
    ('{"cpu": 2}', "unknown setting 'cpu'"),
    ('{"cpus": 0}', "cpus must be between"),
    ('{"memory_mib": 12}', "memory must be at least 256M"),
    ('{"memory_mib": "lots"}', "invalid memory 'lots'"),
    ('{"accel": "xen"}', "unknown accelerator 'xen'"),
    ('{"ports": ["80"]}', "invalid port forward '80'"),
])
def test_corrupt_or_invalid_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        st.load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert path.read_text() == text  # never overwritten


@pytest.mark.parametrize(("text", "mib"), [("2G", 2048), ("1536M", 1536), ("1536", 1536), ("4GiB", 4096), (512, 512)])
def test_parse_mib(text, mib) -> None:
    assert st.parse_mib(text, what="memory") == mib


def test_port_forward_parse() -> None:
    p = PortForward.parse("0.0.0.0:5353:53/udp")
    assert (p.host_ip, p.host_port, p.guest_port, p.protocol) == ("0.0.0.0", 5353, 53, Protocol.UDP)
    assert PortForward.parse("8080:80").host_ip == "127.0.0.1"  # loopback unless asked
    for bad in ("", "80", "a:b", "70000:80", "1.2.3:80:80", "80:80/sctp"):
        with pytest.raises(ConfigError):
            PortForward.parse(bad)


def test_guest_config_lines() -> None:
    from vmkit.vm import guest_config

    s = st.Settings(dns=("1.1.1.1", "9.9.9.9"), host_services=("5000:5001",),
                    registry_mirrors=("docker.io=http://127.0.0.1:5000",), mirror_only=True)
    assert guest_config(s).splitlines() == ["dns=1.1.1.1", "dns=9.9.9.9", "host-service=5000",
                                            "mirror=docker.io=http://127.0.0.1:5000", "mirror-only=1"]
    assert guest_config(s, accel=Accel.TCG).splitlines()[0] == "accel=tcg"
