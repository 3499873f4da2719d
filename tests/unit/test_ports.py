"""Published ports: the -p parsing in the guest engine, and the host half against a real QEMU.

The host half changes QEMU user-network forwards over QMP; a QEMU with no machine (`-M none`)
and one user netdev is enough to exercise it for real: ports are really bound on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ports import Binding, PortBroker, PortError, docker_port_map, requested
from vmkit import backlog
from vmkit.ports import ForwardTable, HostForward, PortPublisher, parse_usernet, usernet_fds
from vmkit.qemu import Monitor


# --- the request side (guest) -----------------------------------------------------------
def test_requested_defaults_to_loopback_and_keeps_ranges() -> None:
    got = requested({"80/tcp": [{"HostIp": "", "HostPort": "8080"}],
                     "53/udp": [{"HostPort": "5353"}],
                     "81/tcp": [{"HostIp": "0.0.0.0", "HostPort": "9000-9002"}],
                     "82/tcp": [{"HostIp": "", "HostPort": ""}]})
    assert got == [
        (Binding("tcp", "127.0.0.1", 0, 80), [8080]),
        (Binding("udp", "127.0.0.1", 0, 53), [5353]),
        (Binding("tcp", "0.0.0.0", 0, 81), [9000, 9001, 9002]),
        (Binding("tcp", "127.0.0.1", 0, 82), []),
    ]


def test_publish_all_adds_exposed_ports_not_already_bound() -> None:
    got = requested({"80/tcp": [{"HostPort": "8080"}]}, {"80/tcp": {}, "443/tcp": {}, "53/udp": {}}, publish_all=True)
    assert [(b.proto, b.container_port, c) for b, c in got] == [("tcp", 80, [8080]), ("tcp", 443, []), ("udp", 53, [])]


@pytest.mark.parametrize("bindings, message", [
    ({"80/sctp": [{}]}, "unsupported protocol"),
    ({"http/tcp": [{}]}, "invalid container port"),
    ({"80/tcp": [{"HostPort": "99999"}]}, "invalid host port"),
    ({"80/tcp": [{"HostPort": "90-80"}]}, "invalid host port range"),
    ({"80/tcp": [{"HostIp": "::1", "HostPort": "80"}]}, "only IPv4"),
    ({"80/tcp": [{"HostIp": "localhost", "HostPort": "80"}]}, "invalid host IP"),
])
def test_bad_port_specs_are_clear_errors(bindings: dict, message: str) -> None:
    with pytest.raises(PortError, match=message):
        requested(bindings)


def test_docker_port_map_shape() -> None:
    got = docker_port_map([Binding("tcp", "127.0.0.1", 8080, 80, 20000), Binding("udp", "127.0.0.1", 0, 53, 20001)])
    assert got == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
                   "53/udp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}


def test_broker_refuses_a_host_port_it_already_published(monkeypatch: pytest.MonkeyPatch) -> None:
    broker = PortBroker()
    monkeypatch.setattr(broker, "_apply_rules", lambda: None)  # nft needs the guest's kernel
    broker._next_port = 29999  # guest ports go round-robin and wrap
    first = broker.publish("a" * 64, "172.17.0.2", requested({"80/tcp": [{"HostPort": "8080"}]}))
    assert first[0].guest_port == 29999 and first[0].host_port == 8080
    with pytest.raises(PortError, match="Bind for 0.0.0.0:8080 failed: port is already allocated"):
        broker.publish("b" * 64, "172.17.0.3", requested({"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]}))
    # another address is another port
    other = broker.publish("c" * 64, "172.17.0.4", requested({"80/tcp": [{"HostIp": "127.0.0.2", "HostPort": "8080"}]}))
    assert other[0].guest_port in (20000, 20001)
    broker.unpublish("a" * 64)
    # a freed guest port is not handed out again at once: a new flow must never meet an old
    # one's conntrack entry
    again = broker.publish("d" * 64, "172.17.0.5", requested({"80/tcp": [{"HostPort": "8080"}], "81/tcp": None}))
    assert [b.guest_port for b in again] == [other[0].guest_port + 1, other[0].guest_port + 2]


# --- the host side, with a real QEMU ---------------------------------------------------
USERNET = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]   9               * 18093       10.0.2.15 20003     0     0
  UDP[HOST_FORWARD]   8       127.0.0.1 51811       10.0.2.15 20002     0     0
  TCP[ESTABLISHED]   12       10.0.2.15 41234        10.0.2.2  5000     0     0
"""


def test_parse_usernet() -> None:
    assert parse_usernet(USERNET) == [HostForward("tcp", "0.0.0.0", 18093, 20003),
                                      HostForward("udp", "127.0.0.1", 51811, 20002)]


@pytest.fixture
def qemu_table(tmp_path: Path) -> Iterator[ForwardTable]:
    qmp = tmp_path / "qmp.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
                             "-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:0-10.0.2.15:22",
                             "-qmp", f"unix:{qmp},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(200):
        if qmp.exists():
            break
        time.sleep(0.05)
    monitor = Monitor("test")
    monitor.connect(str(qmp))
    try:
        yield ForwardTable(monitor.hmp, qemu_pid=proc.pid)
    finally:
        monitor.close()
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_add_remove_and_random_ports_through_qemu(qemu_table: ForwardTable) -> None:
    pub = PortPublisher(qemu_table, open_stream=lambda path: None)
    port = _free_port()
    reply = pub.handle("add", [{"proto": "tcp", "host_ip": "127.0.0.1", "host_port": port, "guest_port": 20000},
                               {"proto": "udp", "host_ip": "127.0.0.1", "host_port": 0, "guest_port": 20001}])
    assert "error" not in reply, reply
    tcp, udp = reply["rules"]
    assert tcp["host_port"] == port and _listening(port)
    assert udp["host_port"] > 0 and udp["guest_port"] == 20001
    # TCP is a QEMU forward, UDP a relay of the daemon's own; the static forward to guest
    # port 22 is not ours to report or remove
    assert [f.guest_port for f in qemu_table.current()] == [20000]
    assert _listening(udp["host_port"], socket.SOCK_DGRAM)
    assert pub.handle("remove", reply["rules"]) == {}
    assert qemu_table.current() == [] and not _listening(port)
    assert not _listening(udp["host_port"], socket.SOCK_DGRAM)
    assert any(f.guest_port == 22 for f in parse_usernet(qemu_table.hmp("info usernet")))


def _backlog(port: int) -> int:
    """The listen backlog of the TCP listener on 127.0.0.1:port (ss shows it as Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[2])


@pytest.mark.skipif(not backlog.supported(), reason="pidfd_getfd needs a Linux host")
def test_forwards_get_a_wide_listen_backlog(qemu_table: ForwardTable) -> None:
    # libslirp listens with a backlog of one, which a burst of connections overflows
    static = next(f for f in parse_usernet(qemu_table.hmp("info usernet")) if f.guest_port == 22)
    assert _backlog(static.host_port) == 1
    qemu_table.widen_all()
    assert _backlog(static.host_port) == min(backlog.BACKLOG, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    added = qemu_table.add(HostForward("tcp", "127.0.0.1", 0, 20000))
    assert _backlog(added.host_port) == _backlog(static.host_port) > 1
    # the socket must be the one named: a wrong descriptor or port is refused, nothing changed
    fds = {f.guest_port: fd for f, fd in usernet_fds(qemu_table.hmp("info usernet")).items()}
    assert qemu_table.qemu_pid is not None
    with pytest.raises(backlog.BacklogError, match="not 127.0.0.1"):
        backlog.widen(qemu_table.qemu_pid, fds[20000], "127.0.0.1", added.host_port + 1)
    with pytest.raises(OSError):
        backlog.widen(qemu_table.qemu_pid, 0, "127.0.0.1", added.host_port)  # stdin: /dev/null


def test_taken_port_fails_the_whole_add(qemu_table: ForwardTable) -> None:
    pub = PortPublisher(qemu_table, open_stream=lambda path: None)
    free = _free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        reply = pub.handle("add", [{"proto": "tcp", "host_ip": "127.0.0.1", "host_port": free, "guest_port": 20000},
                                   {"proto": "tcp", "host_ip": "127.0.0.1", "host_port": taken, "guest_port": 20001}])
        assert reply == {"error": f"Bind for 127.0.0.1:{taken} failed: port is already allocated"}
        assert qemu_table.current() == [] and not _listening(free)  # rolled back
        # a range skips the taken port
        reply = pub.handle("add", [{"proto": "tcp", "host_ip": "127.0.0.1", "host_port": 0, "guest_port": 20002,
                                    "candidates": [taken, free]}])
        assert reply["rules"][0]["host_port"] == free


def test_sync_makes_qemu_match_the_guest(qemu_table: ForwardTable) -> None:
    pub = PortPublisher(qemu_table, open_stream=lambda path: None)
    keep, stale, new = _free_port(), _free_port(), _free_port()
    pub.handle("add", [{"proto": "tcp", "host_ip": "127.0.0.1", "host_port": keep, "guest_port": 20000},
                       {"proto": "tcp", "host_ip": "127.0.0.1", "host_port": stale, "guest_port": 20001}])
    reply = pub.handle("sync", [{"proto": "tcp", "host_ip": "127.0.0.1", "host_port": keep, "guest_port": 20000},
                                {"proto": "tcp", "host_ip": "127.0.0.1", "host_port": new, "guest_port": 20005}])
    assert reply["errors"] == []
    assert sorted((f.host_port, f.guest_port) for f in qemu_table.current()) == sorted([(keep, 20000), (new, 20005)])
    assert not _listening(stale)


def test_publisher_serves_a_stream_and_reconnects(qemu_table: ForwardTable) -> None:
    """The daemon side of the guest link: JSON lines in, replies out, a new stream after EOF."""
    streams: list[socket.socket] = []

    def open_channel(path: str) -> socket.socket:
        assert path == "/run/pydesk/ports.sock"
        a, b = socket.socketpair()
        streams.append(b)
        return a

    port = _free_port()
    with PortPublisher(qemu_table, open_channel) as pub:
        assert pub.connected.wait(5)
        guest = streams[0]
        guest.sendall(b'{"id": 7, "op": "add", "rules": [{"proto": "tcp", "host_ip": "127.0.0.1", '
                      b'"host_port": %d, "guest_port": 20000}]}\n' % port)
        guest.settimeout(10)
        line = guest.makefile("rb").readline()
        assert b'"id": 7' in line and b'"host_port": %d' % port in line
        guest.close()  # the engine restarted: the publisher opens a new stream
        deadline = time.monotonic() + 10
        while len(streams) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(streams) >= 2
    with contextlib.suppress(OSError):
        for s in streams:
            s.close()


def test_vm_level_forwards_may_not_use_the_published_range() -> None:
    from vmkit.errors import ConfigError
    from vmkit.spec import PortForward

    with pytest.raises(ConfigError, match="reserved for containers' published ports"):
        PortForward.parse("8080:20000")
    assert PortForward.parse("8080:31990").guest_port == 31990
    from agent.ports import GUEST_PORTS
    from vmkit.spec import PUBLISHED_GUEST_PORTS
    assert GUEST_PORTS == PUBLISHED_GUEST_PORTS  # the guest and host halves agree
