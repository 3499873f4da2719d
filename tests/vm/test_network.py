"""Networking end to end on the shared VM: published ports on the host's loopback (TCP through
QEMU host forwards, UDP through the agent-channel relay), names on user-defined networks,
the default bridge and `--network none`, and host.docker.internal.

The shared VM runs with `--restrict-network`: the only way out of it is what pydesk forwards
explicitly (the registry as a host service), which these tests also check.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import Pydesk

pytestmark = pytest.mark.vm

BULK_SERVER = (Path(__file__).parent.parent / "support" / "bulk_server.py").read_text()
BLOCK = bytes(range(256)) * 4096  # bulk_server.py's 1 MiB pattern


def name() -> str:
    return "n" + uuid.uuid4().hex[:10]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 10) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
        return r.status, r.read()


def wait_http(port: int, deadline: float = 60) -> bytes:
    end = time.monotonic() + deadline
    while True:
        try:
            return http_get(port, timeout=5)[1]
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


def wait_tcp(port: int, hello: bytes, expect: bytes, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(hello)
                if s.makefile("rb").readline() == expect:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"nothing answered on 127.0.0.1:{port}")
        time.sleep(0.3)


def diagnose(vm: Pydesk, container: str) -> str:
    """What a failed transfer test reports: the server's state and the guest's view."""
    state = vm("inspect", "-f", "{{json .State}}", container).stdout.strip()
    logs = vm("logs", "--tail", "20", container)
    guest = vm.sh("dmesg | tail -n 20; cat /proc/net/stat/nf_conntrack; grep -v 'dport=22 ' /proc/net/nf_conntrack; "
                  "nft list ruleset; nstat -az | grep -E -i 'rst|reset|drop|overflow|abort'; "
                  "for n in $(ip netns list | cut -d' ' -f1); do echo \"netns $n\"; "
                  "ip netns exec $n nstat -az | grep -E -i 'rst|reset|drop|overflow|abort' | grep -v ' 0 '; done").stdout
    return f"state: {state}\nlogs: {logs.stdout}{logs.stderr}\nguest:\n{guest}"


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            return False
    except ConnectionRefusedError:
        return True


@pytest.fixture(scope="module")
def vm(shared_vm: Pydesk) -> Pydesk:
    for image in ("busybox", "nginx", "python"):
        shared_vm("pull", image, check=True)
    return shared_vm


@pytest.fixture
def cleanup(vm: Pydesk) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for n in names:
        vm("rm", "-f", n)


# --- published ports ----------------------------------------------------------------------
def test_published_port_answers_on_loopback_and_closes_on_stop(vm: Pydesk, cleanup: list[str]) -> None:
    port, web = free_port(), name()
    cleanup.append(web)
    vm("run", "-d", "--name", web, "-p", f"{port}:80", "nginx", check=True)
    assert b"Welcome to nginx on pydesk" in wait_http(port)
    # bound on 127.0.0.1 only, unlike Docker's 0.0.0.0 default
    assert vm("port", web, check=True).stdout == f"80/tcp -> 127.0.0.1:{port}\n"
    ps = vm("ps", "--filter", f"name={web}", "--format", "{{.Ports}}", check=True).stdout
    assert ps.strip() == f"127.0.0.1:{port}->80/tcp"
    inspect = json.loads(vm("inspect", web, check=True).stdout)[0]
    assert inspect["NetworkSettings"]["Ports"]["80/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": str(port)}]

    vm("stop", web, check=True)
    assert refused(port), "the host port stays open after the container stopped"
    vm("start", web, check=True)
    assert b"Welcome to nginx" in wait_http(port)
    vm("rm", "-f", web, check=True)
    assert refused(port)


def test_random_ranges_and_publish_all(vm: Pydesk, cleanup: list[str]) -> None:
    web = name()
    cleanup.append(web)
    lo = free_port()
    vm("run", "-d", "--name", web, "-p", "80", "-p", f"127.0.0.1:{lo}-{lo + 3}:80", "-P", "nginx", check=True)
    lines = vm("port", web, "80/tcp", check=True).stdout.split()
    ports = sorted(int(line.rsplit(":", 1)[1]) for line in lines)
    assert len(ports) == 2 and lo in ports, lines
    for p in ports:
        assert b"Welcome to nginx" in wait_http(p)


def test_a_taken_host_port_fails_the_start_clearly(vm: Pydesk, cleanup: list[str]) -> None:
    web = name()
    cleanup.append(web)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = vm("run", "-d", "--name", web, "-p", f"{port}:80", "nginx")
    assert r.returncode == 125
    assert f"Bind for 127.0.0.1:{port} failed: port is already allocated" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("pydesk: error:")]) == 1
    state = json.loads(vm("inspect", web, check=True).stdout)[0]["State"]
    assert not state["Running"]
    # the port is free again: the same container starts
    vm("start", web, check=True)
    assert b"Welcome to nginx" in wait_http(port)


@pytest.mark.parametrize("spec, message", [
    ("80:80:80:80", "invalid port format"), ("http:80", "invalid hostPort"),
    ("8080-8082:80-81", "invalid ranges"), ("80/sctp", "unsupported protocol"),
])
def test_bad_port_specs(vm: Pydesk, spec: str, message: str) -> None:
    r = vm("run", "--rm", "-p", spec, "busybox", "true")
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr


def test_udp_echo_through_a_published_port(vm: Pydesk, cleanup: list[str]) -> None:
    echo, port = name(), free_port(socket.SOCK_DGRAM)
    cleanup.append(echo)
    script = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('0.0.0.0', 53))\n"
              "while True:\n    d, a = s.recvfrom(65535)\n    s.sendto(b'echo:' + d, a)\n")
    vm("run", "-d", "--name", echo, "-p", f"{port}:53/udp", "python", "python3", "-c", script, check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        deadline = time.monotonic() + 60
        while True:  # the server needs a moment to start under TCG
            s.sendto(b"ping", ("127.0.0.1", port))
            try:
                assert s.recv(100) == b"echo:ping"
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "no UDP answer"
        resent = 0
        for i in range(20):
            s.sendto(b"n%d" % i, ("127.0.0.1", port))
            deadline = time.monotonic() + 30
            while True:
                try:
                    got = s.recv(100)
                except TimeoutError:
                    # UDP promises no delivery, and a TCG guest can stall past the timeout while
                    # other VMs boot: send it again, but only a few may need that
                    assert time.monotonic() < deadline, f"no answer to datagram {i}"
                    resent += 1
                    s.sendto(b"n%d" % i, ("127.0.0.1", port))
                    continue
                if got == b"echo:n%d" % i:
                    break
                assert got in {b"echo:n%d" % j for j in range(i)}, got  # only a late answer to an earlier one
        assert resent <= 3
    vm("stop", "-t", "1", echo, check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the host port is released
        s.bind(("127.0.0.1", port))


def test_concurrent_connections_and_a_1gib_transfer(vm: Pydesk, cleanup: list[str]) -> None:
    bulk, port = name(), free_port()
    cleanup.append(bulk)
    vm("run", "-d", "--name", bulk, "-p", f"{port}:7000", "python", "python3", "-c", BULK_SERVER, check=True)
    wait_tcp(port, b"PING\n", b"PONG\n")

    def fetch(i: int) -> str:
        size = (i + 1) * 65536
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            try:
                s.sendall(b"GET %d\n" % size)
                data = b"".join(iter(lambda: s.recv(1 << 16), b""))
            except OSError as exc:
                raise OSError(f"connection {i} from {s.getsockname()}: {exc!r}") from exc
        assert len(data) == size, (i, len(data))
        return hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(50) as pool:
        try:
            digests = list(pool.map(fetch, range(50)))
        except (OSError, AssertionError) as exc:
            raise AssertionError(f"{exc!r}\n{diagnose(vm, bulk)}") from exc
    for i, d in enumerate(digests):
        size = (i + 1) * 65536
        assert d == hashlib.sha256((BLOCK * 4)[:size]).hexdigest()

    total = 1 << 30
    h, got = hashlib.sha256(), 0
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(b"GET %d\n" % total)
        while chunk := s.recv(1 << 20):
            h.update(chunk)
            got += len(chunk)
    expected = hashlib.sha256()
    for _ in range(total // len(BLOCK)):
        expected.update(BLOCK)
    assert got == total and h.hexdigest() == expected.hexdigest()


# --- networks and names --------------------------------------------------------------------
def test_names_resolve_on_user_networks_not_on_the_default_bridge(vm: Pydesk, cleanup: list[str]) -> None:
    net, srv = name(), name()
    cleanup.append(srv)
    created = vm("network", "create", net, check=True).stdout.strip()
    try:
        assert len(created) == 64
        assert net in vm("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()
        vm("run", "-d", "--name", srv, "--network", net, "--network-alias", "api", "nginx", check=True)
        r = vm("run", "--rm", "--network", net, "busybox", "sh", "-c",
               f"for i in $(seq 30); do wget -qO- http://{srv}/ >/dev/null && break; sleep 1; done; "
               f"wget -qO- http://{srv}/ && wget -qO- http://api/ && nslookup {srv}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("Welcome to nginx") == 2
        ip = json.loads(vm("inspect", srv, check=True).stdout)[0]["NetworkSettings"]["Networks"][net]["IPAddress"]
        assert f"Address: {ip}" in r.stdout
        # outside names are forwarded to the VM's resolver, which (in tests) answers nothing
        r = vm("run", "--rm", "--network", net, "busybox", "nslookup", "example.org")
        assert r.returncode != 0
        # the default bridge has no name resolution between containers, as in Docker
        r = vm("run", "--rm", "busybox", "nslookup", srv)
        assert r.returncode != 0
        info = json.loads(vm("network", "inspect", net, check=True).stdout)[0]
        assert info["Name"] == net and any(c["Name"] == srv for c in info["Containers"].values())
        rm = vm("network", "rm", net)
        assert rm.returncode == 1 and "has active endpoints" in rm.stderr
    finally:
        vm("rm", "-f", srv)
        vm("network", "rm", net)
    assert net not in vm("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()


def test_connect_and_disconnect_a_running_container(vm: Pydesk, cleanup: list[str]) -> None:
    """As in Docker, a container's resolver is chosen when it starts: `box` starts on its own
    user network, and after `network connect` its DNS server also answers for `net`."""
    net, home, srv, box = name(), name(), name(), name()
    cleanup += [srv, box]
    vm("network", "create", net, check=True)
    vm("network", "create", home, check=True)
    try:
        vm("run", "-d", "--name", srv, "--network", net, "nginx", check=True)
        vm("run", "-d", "--name", box, "--network", home, "busybox", "sleep", "600", check=True)
        assert vm("exec", box, "nslookup", srv).returncode != 0
        vm("network", "connect", net, box, check=True)
        r = vm("exec", box, "sh", "-c", f"ip -o -4 addr show; wget -qO- http://{srv}/")
        assert r.returncode == 0 and "Welcome to nginx" in r.stdout, r.stderr
        assert "eth1" in r.stdout
        vm("network", "disconnect", net, box, check=True)
        r = vm("exec", box, "ip", "-o", "-4", "addr", "show")
        assert "eth1" not in r.stdout
        assert vm("exec", box, "nslookup", srv).returncode != 0
    finally:
        vm("rm", "-f", srv, box)
        vm("network", "rm", net, home)


def _spares(vm: Pydesk, net_id: str) -> list[str]:
    """The spare namespaces the engine holds for a network (agent/network.py SPARE_PREFIX)."""
    r = vm("vm", "shell", "--", "ls", "/run/netns", check=True)
    return [n for n in r.stdout.split() if n.startswith(f"pydesk-spare-{net_id[:12]}-")]


def _wait_spares(vm: Pydesk, net_id: str, want: int, deadline: float = 60) -> list[str]:
    end = time.monotonic() + deadline
    while len(spares := _spares(vm, net_id)) != want:
        assert time.monotonic() < end, f"{len(spares)} spare namespaces, not {want}"
        time.sleep(1)
    return spares


def test_addresses_on_a_network_with_a_spare_namespace(vm: Pydesk, cleanup: list[str]) -> None:
    """Each network in use keeps spare namespaces holding its next addresses (agent/network.py):
    four once the engine is quiet, which a burst of starts takes over; a container that asks
    for a spare's address gets it, addresses stay unique, spares never show as endpoints,
    and removing the network removes them."""
    net, a, b, c, d = name(), name(), name(), name(), name()
    cleanup += [a, b, c, d]
    net_id = vm("network", "create", "--subnet", "10.77.0.0/24", net, check=True).stdout.strip()
    try:
        assert _spares(vm, net_id) == []  # a network nobody has used keeps none
        vm("run", "-d", "--name", a, "--network", net, "busybox", "sleep", "600", check=True)
        # a's start found none: one is made at once, the pool filled up to four when quiet,
        # holding 10.77.0.3 to 10.77.0.6
        before = _wait_spares(vm, net_id, 4)
        # b asks for the address of one of them; c takes one over
        vm("run", "-d", "--name", b, "--network", net, "--ip", "10.77.0.3", "busybox", "sleep", "600", check=True)
        vm("run", "-d", "--name", c, "--network", net, "busybox", "sleep", "600", check=True)
        after = _spares(vm, net_id)
        assert len(set(before) - set(after)) >= 2  # one dropped for b, one taken by c
        # every namespace added a port to the network's bridge; its MAC address stays its own (a
        # port with a lower one would take over, and the containers' gateway entry go stale)
        r = vm("vm", "shell", "--", "sh", "-c", "br=$(ip -o -4 addr show to 10.77.0.1 | cut -d' ' -f2); "
               "cat /sys/class/net/$br/address /sys/class/net/$br/addr_assign_type; ls /sys/class/net/$br/brif | wc -l",
               check=True)
        mac, assign, ports = r.stdout.split()
        assert (mac, assign) == ("02:42:0a:4d:00:01", "3") and int(ports) >= 5, r.stdout
        ips = {}
        for n in (a, b, c):
            info = json.loads(vm("inspect", n, check=True).stdout)[0]
            ips[n] = info["NetworkSettings"]["Networks"][net]["IPAddress"]
            r = vm("exec", n, "ip", "-o", "-4", "addr", "show", "eth0", check=True)
            assert f"inet {ips[n]}/24" in r.stdout
        assert ips[a] == "10.77.0.2" and ips[b] == "10.77.0.3" and len(set(ips.values())) == 3
        r = vm("exec", a, "ping", "-c1", "-W5", ips[c])
        assert r.returncode == 0, r.stdout + r.stderr
        endpoints = json.loads(vm("network", "inspect", net, check=True).stdout)[0]["Containers"]
        assert sorted(e["Name"] for e in endpoints.values()) == sorted([a, b, c])
        # b's address is free again as soon as b is gone, though its namespace is deleted later
        vm("rm", "-f", b, check=True)
        vm("run", "-d", "--name", d, "--network", net, "--ip", "10.77.0.3", "busybox", "sleep", "600", check=True)
        info = json.loads(vm("inspect", d, check=True).stdout)[0]
        assert info["NetworkSettings"]["Networks"][net]["IPAddress"] == "10.77.0.3"
    finally:
        vm("rm", "-f", a, b, c, d)
        r = vm("network", "rm", net)
    assert r.returncode == 0, r.stderr
    assert net not in vm("network", "ls", "--format", "{{.Name}}", check=True).stdout.split()
    _wait_spares(vm, net_id, 0, deadline=10)  # (one still being made is discarded when it finds the network gone)


def test_network_none_has_only_loopback(vm: Pydesk) -> None:
    r = vm("run", "--rm", "--network", "none", "busybox", "sh", "-c", "ls /sys/class/net")
    assert r.returncode == 0 and r.stdout.split() == ["lo"]


def test_hostname_dns_and_add_host_reach_the_files(vm: Pydesk) -> None:
    r = vm("run", "--rm", "--hostname", "box1", "--dns", "10.9.8.7", "--dns-search", "example.test",
           "--add-host", "db.local:10.1.2.3", "--add-host", "hostgw:host-gateway",
           "busybox", "sh", "-c", "hostname; cat /etc/resolv.conf /etc/hosts")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.splitlines()[0] == "box1"
    assert "nameserver 10.9.8.7" in out and "search example.test" in out
    assert "10.1.2.3\tdb.local" in out and "10.0.2.2\thostgw" in out and "10.0.2.2\thost.docker.internal" in out


# --- containers -> the host ----------------------------------------------------------------
@pytest.fixture
def other_host_server() -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 that the VM was NOT given as a host service."""
    class Quiet(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"secret")

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_host_docker_internal_reaches_host_services_only(vm: Pydesk, other_host_server: int) -> None:
    # the registry is the VM's host service 5000 -> the host's 127.0.0.1:<registry port>
    r = vm("run", "--rm", "busybox", "wget", "-qO-", "http://host.docker.internal:5000/v2/")
    assert r.returncode == 0 and r.stdout.strip() == "{}", r.stderr
    # the same from a user-defined network, through its DNS server
    net = name()
    vm("network", "create", net, check=True)
    try:
        r = vm("run", "--rm", "--network", net, "busybox", "sh", "-c",
               "nslookup host.docker.internal && wget -qO- http://host.docker.internal:5000/v2/")
        assert r.returncode == 0 and "10.0.2.2" in r.stdout and r.stdout.rstrip().endswith("{}"), r.stderr
    finally:
        vm("network", "rm", net)
    # anything else on the host stays out of reach
    for target in (f"host.docker.internal {other_host_server}", f"10.0.2.2 {other_host_server}", "10.0.2.2 22"):
        r = vm("run", "--rm", "busybox", "sh", "-c", f"nc -w 3 {target} </dev/null")
        assert r.returncode != 0, target
