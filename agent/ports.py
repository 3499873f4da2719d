"""Published ports (`-p`): the guest half.

A published port is two hops:

1. on the host, a QEMU user-network host forward ``HOST_IP:HOST_PORT -> 10.0.2.15:GUEST_PORT``,
   added and removed at run time by the host daemon over QMP (vmkit/ports.py);
2. in the guest, an nftables DNAT rule ``eth0:GUEST_PORT -> CONTAINER_IP:CONTAINER_PORT``.

Each binding gets its own guest port from ``GUEST_PORTS``, so two host addresses may publish
the same host port number. Guest ports are handed out round-robin from a random start: QEMU
keeps the host client's source port, so reusing a just-freed guest port could give a new
connection the tuple of a recent one whose conntrack entry still points at an earlier
container. The host daemon connects to ``SOCKET`` and then *serves* this side's requests over that one stream (JSON lines, guest -> host: ``add``, ``remove``, ``sync``), because
only the host can bind host ports. The guest side is the source of truth: after every (re)connect
it sends the whole table (``sync``), and the host makes QEMU's forwards match it. That is what
makes published ports survive a host-daemon restart and come back after a VM restart.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import random
import socket
import struct
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from agent import guest_settings

log = logging.getLogger(__name__)

SOCKET = "/run/pydesk/ports.sock"
#: Streams of UDP datagrams from the host daemon (vmkit/udp_relay.py has the framing).
UDP_SOCKET = "/run/pydesk/udp.sock"
UDP_IDLE = 120.0
#: Guest-side ports for published bindings (below Linux's ephemeral range, above well-known).
GUEST_PORTS = range(20000, 30000)
GUEST_ADDRESS = "10.0.2.15"
#: QEMU's user network maps this address to the host's loopback.
HOST_GATEWAY = "10.0.2.2"
UPLINK = "eth0"
#: How long a container start waits for the host to answer an ``add``.
REQUEST_TIMEOUT = 15.0


class PortError(Exception):
    """A port could not be published (bad spec, host port taken, host not answering)."""


@dataclass(frozen=True)
class Binding:
    proto: str            # "tcp" | "udp"
    host_ip: str          # where the host listens; 127.0.0.1 unless the user asked otherwise
    host_port: int        # 0: the host picks a free port
    container_port: int
    guest_port: int = 0
    container_ip: str = ""

    @property
    def key(self) -> str:
        return f"{self.container_port}/{self.proto}"

    def wire(self) -> dict[str, Any]:
        return {"proto": self.proto, "host_ip": self.host_ip, "host_port": self.host_port,
                "guest_port": self.guest_port}


def _port(text: str, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise PortError(f"invalid {what}: {text!r}") from None
    if not 0 <= n <= 65535:
        raise PortError(f"invalid {what}: {text!r}")
    return n


def requested(port_bindings: dict[str, Any] | None, exposed: Iterable[str] = (),
              publish_all: bool = False) -> list[tuple[Binding, list[int]]]:
    """The bindings a container asks for, from HostConfig.PortBindings (+ ``-P``).

    Each comes with its candidate host ports: ``[]`` means any free port, a range
    (``"8000-8010"``) means the first free one in it.
    """
    out: list[tuple[Binding, list[int]]] = []
    seen: set[str] = set()
    for key, binds in (port_bindings or {}).items():
        num, _, proto = key.partition("/")
        proto = proto or "tcp"
        if proto not in ("tcp", "udp"):
            raise PortError(f"unsupported protocol {proto!r} in {key!r} (tcp and udp are)")
        cport = _port(num, "container port")
        seen.add(f"{cport}/{proto}")
        for b in binds or [{}]:
            host_ip = (b or {}).get("HostIp") or "127.0.0.1"
            try:
                addr = ipaddress.ip_address(host_ip)
            except ValueError:
                raise PortError(f"invalid host IP {host_ip!r} for {key}") from None
            if addr.version != 4:
                raise PortError(f"cannot publish {key} on {host_ip}: only IPv4 host addresses are supported")
            spec = str((b or {}).get("HostPort") or "")
            if "-" in spec:
                lo_s, _, hi_s = spec.partition("-")
                lo, hi = _port(lo_s, "host port"), _port(hi_s, "host port")
                if lo > hi or lo == 0:
                    raise PortError(f"invalid host port range {spec!r}")
                candidates = list(range(lo, hi + 1))
            else:
                p = _port(spec, "host port") if spec else 0
                candidates = [p] if p else []
            out.append((Binding(proto, host_ip, 0, cport), candidates))
    if publish_all:
        for key in exposed:
            num, _, proto = key.partition("/")
            proto = proto or "tcp"
            if f"{_port(num, 'container port')}/{proto}" not in seen and proto in ("tcp", "udp"):
                out.append((Binding(proto, "127.0.0.1", 0, int(num)), []))
    return out


def docker_port_map(bindings: Iterable[Binding]) -> dict[str, list[dict[str, str]]]:
    """NetworkSettings.Ports entries for the bindings that are in place."""
    ports: dict[str, list[dict[str, str]]] = {}
    for b in bindings:
        ports.setdefault(b.key, []).append({"HostIp": b.host_ip, "HostPort": str(b.host_port) if b.host_port else ""})
    return ports


class HostLink:
    """The host daemon's connection: requests go out, replies come back by id."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb", buffering=0)
        self.lock = threading.Lock()
        self.next_id = 0
        self.waiting: dict[int, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self.closed = threading.Event()

    def request(self, op: str, rules: list[dict[str, Any]], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        with self.lock:
            self.next_id += 1
            rid = self.next_id
            done: tuple[threading.Event, list[dict[str, Any]]] = (threading.Event(), [])
            self.waiting[rid] = done
            try:
                self.file.write(json.dumps({"id": rid, "op": op, "rules": rules}).encode() + b"\n")
            except OSError as exc:
                self.waiting.pop(rid, None)
                raise PortError(f"the host daemon is not connected ({exc})") from exc
        if not done[0].wait(timeout) or not done[1]:
            self.waiting.pop(rid, None)
            raise PortError("the host daemon did not answer the port request")
        return done[1][0]

    def read_replies(self) -> None:
        try:
            for line in self.file:
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("bad line from the host daemon: %r", line[:200])
                    continue
                entry = self.waiting.pop(msg.get("id"), None)
                if entry:
                    entry[1].append(msg)
                    entry[0].set()
        except OSError:
            pass
        finally:
            self.closed.set()
            for event, _ in list(self.waiting.values()):
                event.set()  # wakes waiters with no reply: they report the host as gone
            self.waiting.clear()
            with contextlib.suppress(OSError):
                self.sock.close()


class PortBroker:
    """All published bindings in the guest, their DNAT rules, and the link to the host."""

    def __init__(self, host_services: Iterable[int] = ()) -> None:
        self.lock = threading.RLock()
        self.bindings: dict[str, list[Binding]] = {}  # container id -> bindings in place
        self.host_services = tuple(host_services)
        self.link: HostLink | None = None
        self._next_port = random.randrange(GUEST_PORTS.start, GUEST_PORTS.stop)

    # --- container lifecycle -------------------------------------------------------
    def publish(self, container_id: str, container_ip: str, wanted: list[tuple[Binding, list[int]]]) -> list[Binding]:
        """Reserve host ports and install the DNAT rules; all of ``wanted`` or nothing."""
        if not wanted:
            return []
        with self.lock:
            used = {b.guest_port for bs in self.bindings.values() for b in bs}
            chosen: list[Binding] = []
            for b, candidates in wanted:
                gport = self._free_guest_port(used)
                used.add(gport)
                chosen.append(replace(b, guest_port=gport, container_ip=container_ip,
                                      host_port=candidates[0] if len(candidates) == 1 else 0))
            self._check_duplicates(container_id, chosen)
            link = self.link
            if link is not None and not link.closed.is_set():
                chosen = self._add_on_host(link, chosen, [c for _, c in wanted])
            else:  # no host daemon yet (restart at boot): the next sync publishes them
                log.info("host daemon not connected; %d port(s) of %s wait for it", len(chosen), container_id[:12])
            self.bindings[container_id] = chosen
            self._apply_rules()
            return chosen

    def _free_guest_port(self, used: set[int]) -> int:
        """The next guest port after the last one handed out that is not in use."""
        span = len(GUEST_PORTS)
        for i in range(span):
            port = GUEST_PORTS.start + (self._next_port - GUEST_PORTS.start + i) % span
            if port not in used:
                self._next_port = GUEST_PORTS.start + (port - GUEST_PORTS.start + 1) % span
                return port
        raise PortError("no free guest ports left for publishing")

    def _check_duplicates(self, container_id: str, chosen: list[Binding]) -> None:
        """A host port this engine already published is taken (0.0.0.0 overlaps every address)."""
        taken = [b for cid, bs in self.bindings.items() if cid != container_id for b in bs if b.host_port]
        for i, b in enumerate(chosen):
            if not b.host_port:
                continue
            for t in taken + chosen[:i]:
                if (t.proto == b.proto and t.host_port == b.host_port
                        and (t.host_ip == b.host_ip or "0.0.0.0" in (t.host_ip, b.host_ip))):
                    raise PortError(f"Bind for {b.host_ip}:{b.host_port} failed: port is already allocated")

    def _add_on_host(self, link: HostLink, chosen: list[Binding], candidates: list[list[int]]) -> list[Binding]:
        rules = [b.wire() for b in chosen]
        alternatives = [c if len(c) > 1 else [] for c in candidates]
        for r, alt in zip(rules, alternatives):
            if alt:
                r["candidates"] = alt
        reply = link.request("add", rules)
        if reply.get("error"):
            raise PortError(reply["error"])
        by_gport = {r["guest_port"]: int(r["host_port"]) for r in reply.get("rules") or []}
        return [replace(b, host_port=by_gport.get(b.guest_port, b.host_port)) for b in chosen]

    def unpublish(self, container_id: str) -> None:
        with self.lock:
            gone = self.bindings.pop(container_id, [])
            if not gone:
                return
            self._apply_rules()
            link = self.link
        if link is not None and not link.closed.is_set():
            try:
                link.request("remove", [b.wire() for b in gone], timeout=5)
            except PortError as exc:
                log.warning("removing host forwards of %s: %s", container_id[:12], exc)

    def of(self, container_id: str) -> list[Binding]:
        with self.lock:
            return list(self.bindings.get(container_id, []))

    # --- the host link -------------------------------------------------------------
    def serve(self, path: str = SOCKET) -> None:
        """Accept host daemon connections (one at a time; a new one replaces the old)."""
        srv = _listen_unix(path, 4)
        threading.Thread(target=self._accept, args=(srv,), name="ports-accept", daemon=True).start()

    def serve_udp(self, path: str = UDP_SOCKET) -> None:
        """Relay streams for published UDP ports: one per host-side client address."""
        srv = _listen_unix(path, 16)

        def accept() -> None:
            while True:
                conn, _ = srv.accept()
                threading.Thread(target=self._relay_udp, args=(conn,), name="udp-relay", daemon=True).start()

        threading.Thread(target=accept, name="udp-accept", daemon=True).start()

    def _relay_udp(self, conn: socket.socket) -> None:
        f = conn.makefile("rb", buffering=0)
        try:
            header = json.loads(f.readline() or b"{}")
            gport = int(header.get("guest_port") or 0)
            with self.lock:
                target = next((b for bs in self.bindings.values() for b in bs
                               if b.proto == "udp" and b.guest_port == gport), None)
            if target is None or not target.container_ip:
                log.info("udp relay for unknown guest port %s", gport)
                return
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                out.connect((target.container_ip, target.container_port))
                out.settimeout(UDP_IDLE)

                def replies() -> None:
                    while True:
                        try:
                            data = out.recv(65535)
                        except OSError:  # timeout or closed: the flow is over
                            break
                        try:
                            conn.sendall(struct.pack("!H", len(data)) + data)
                        except OSError:
                            break
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)

                threading.Thread(target=replies, daemon=True).start()
                while True:
                    head = _read_exact(f, 2)
                    if head is None:
                        break
                    data = _read_exact(f, struct.unpack("!H", head)[0])
                    if data is None:
                        break
                    with contextlib.suppress(OSError):  # e.g. ECONNREFUSED from an earlier send
                        out.send(data)
        except (OSError, ValueError) as exc:
            log.debug("udp relay ended: %s", exc)
        finally:
            conn.close()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            conn, _ = srv.accept()
            link = HostLink(conn)
            threading.Thread(target=link.read_replies, name="ports-link", daemon=True).start()
            old, self.link = self.link, link
            if old is not None:
                with contextlib.suppress(OSError):
                    old.sock.close()
            log.info("host daemon connected for published ports")
            threading.Thread(target=self._sync, args=(link,), name="ports-sync", daemon=True).start()

    def _sync(self, link: HostLink) -> None:
        with self.lock:
            rules = [b.wire() for bs in self.bindings.values() for b in bs]
            try:
                reply = link.request("sync", rules)
            except PortError as exc:
                log.warning("port sync failed: %s", exc)
                return
            for err in reply.get("errors") or []:
                log.error("publishing a port after reconnect failed: %s", err)
            by_gport = {r["guest_port"]: int(r["host_port"]) for r in reply.get("rules") or []}
            for cid, bs in self.bindings.items():
                self.bindings[cid] = [replace(b, host_port=by_gport.get(b.guest_port, b.host_port)) for b in bs]

    # --- DNAT ------------------------------------------------------------------------
    def _apply_rules(self) -> None:
        lines = ["table ip pydesk_ports", "delete table ip pydesk_ports", "table ip pydesk_ports {",
                 "  chain prerouting { type nat hook prerouting priority dstnat; policy accept;"]
        for port in self.host_services:  # host.docker.internal:PORT -> the agent's forward
            lines.append(f"    ip daddr {HOST_GATEWAY} tcp dport {port} dnat to {GUEST_ADDRESS}")
        for bs in self.bindings.values():
            for b in bs:
                if b.container_ip and b.proto == "tcp":  # UDP arrives through the relay socket
                    lines.append(f"    iifname \"{UPLINK}\" {b.proto} dport {b.guest_port} "
                                 f"dnat to {b.container_ip}:{b.container_port}")
        lines += ["  }", "}"]
        proc = subprocess.run(["nft", "-f", "-"], input=("\n".join(lines) + "\n").encode(), capture_output=True)
        if proc.returncode != 0:
            raise PortError(f"nft: {proc.stderr.decode(errors='replace').strip()}")

    def setup(self) -> None:
        """At engine start: the host-service rules (no bindings yet). Connection tracking is
        liberal about TCP windows: QEMU's user-net TCP stack may shrink its window, and a
        packet conntrack calls out-of-window would skip the reverse NAT and reset the flow."""
        self._apply_rules()  # loads nf_conntrack (the nat chain needs it)
        with contextlib.suppress(OSError):
            with open("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal", "w") as f:
                f.write("1")


def _listen_unix(path: str, backlog: int) -> socket.socket:
    """A fresh root-only unix listener at ``path`` (a stale socket from an earlier engine goes)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(backlog)
    return srv


def _read_exact(f: Any, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def host_service_ports() -> list[int]:
    """The guest ports of the VM's host services (``host-service=PORT`` lines)."""
    return [int(v) for v in guest_settings.values("host-service") if v.isdigit()]
