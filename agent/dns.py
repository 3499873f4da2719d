"""The embedded DNS server for user-defined networks.

Docker resolves container names and aliases on user-defined networks (not on the default
bridge) with a resolver it injects into each container at 127.0.0.11. Ours listens on each
user network's gateway address instead (the address is on the guest's bridge, so no
per-container redirect rules are needed), and containers on those networks get it as their
nameserver. It answers A queries for the names of running containers on *that* network
(name, aliases, short ID) and forwards every other query unchanged to the container's own
``--dns`` servers or the VM's resolver. Lookups never go anywhere else: in the test set-up the
VM's resolver is 127.0.0.1 in the guest, so outside names fail fast and stay on the machine.

Only UDP is served: answers for container names are small, and a truncated forwarded answer
is passed back as it is (the client then retries over TCP to the upstream server directly,
which containers on user networks cannot reach — a known limit, documented).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from ipaddress import IPv4Address

log = logging.getLogger(__name__)

TTL = 600
QTYPE_A = 1
QCLASS_IN = 1
FORWARD_TIMEOUT = 3.0

#: (network id of the listener, source address, lower-cased name) -> addresses, or None if
#: the name is not ours
Lookup = Callable[[str, str, str], "list[str] | None"]
#: source address of the query -> upstream servers for it
Upstreams = Callable[[str], "list[str]"]


class DNSFormatError(ValueError):
    pass


def parse_question(packet: bytes) -> tuple[int, int, str, int, int, int]:
    """(id, flags, qname, qtype, qclass, end of question) of a query with one question."""
    if len(packet) < 12:
        raise DNSFormatError("short packet")
    qid, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if qdcount != 1:
        raise DNSFormatError("expected exactly one question")
    labels, pos = [], 12
    while True:
        if pos >= len(packet):
            raise DNSFormatError("truncated name")
        n = packet[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0 or pos + n > len(packet):
            raise DNSFormatError("bad label")
        labels.append(packet[pos:pos + n].decode("ascii", errors="replace"))
        pos += n
    if pos + 4 > len(packet):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", packet[pos:pos + 4])
    return qid, flags, ".".join(labels), qtype, qclass, pos + 4


def answer(packet: bytes, addresses: list[str], rcode: int = 0) -> bytes:
    """A response to ``packet`` with A records for ``addresses`` (none: NOERROR/NODATA)."""
    qid, flags, _, qtype, _, end = parse_question(packet)
    rd = flags & 0x0100
    records = addresses if qtype == QTYPE_A else []
    header = struct.pack("!HHHHHH", qid, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, len(records), 0, 0)
    body = packet[12:end]
    for a in records:
        body += struct.pack("!HHHIH", 0xC00C, QTYPE_A, QCLASS_IN, TTL, 4) + IPv4Address(a).packed
    return header + body


def servfail(packet: bytes) -> bytes:
    qid, flags, _, _, _, end = parse_question(packet)
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x0100) | 0x0080 | 2, 1, 0, 0, 0) + packet[12:end]


class NameServer:
    """One UDP listener per user-defined network, on the network's gateway address."""

    def __init__(self, lookup: Lookup, upstreams: Upstreams) -> None:
        self.lookup = lookup
        self.upstreams = upstreams
        self.lock = threading.Lock()
        self.sockets: dict[str, socket.socket] = {}

    def listen(self, network_id: str, address: str) -> None:
        with self.lock:
            if network_id in self.sockets:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, 53))
            self.sockets[network_id] = s
        threading.Thread(target=self._serve, args=(network_id, s), name=f"dns-{network_id[:12]}",
                         daemon=True).start()
        log.info("DNS for network %s on %s:53", network_id[:12], address)

    def close(self, network_id: str) -> None:
        with self.lock:
            s = self.sockets.pop(network_id, None)
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _serve(self, network_id: str, s: socket.socket) -> None:
        while True:
            try:
                packet, peer = s.recvfrom(4096)
            except OSError:
                return
            threading.Thread(target=self._reply, args=(network_id, s, packet, peer), daemon=True).start()

    def _reply(self, network_id: str, s: socket.socket, packet: bytes, peer: tuple[str, int]) -> None:
        try:
            _, flags, qname, _, qclass, _ = parse_question(packet)
        except DNSFormatError:
            return  # not a query we can parse: no answer, as for any garbage on port 53
        if flags & 0x8000:
            return  # a response, not a query
        try:
            addresses = self.lookup(network_id, peer[0], qname.rstrip(".").lower()) if qclass == QCLASS_IN else None
            reply = answer(packet, addresses) if addresses is not None else self._forward(packet, peer[0])
        except Exception:
            log.exception("DNS query for %s failed", qname)
            reply = servfail(packet)
        with contextlib.suppress(OSError):
            s.sendto(reply, peer)

    def _forward(self, packet: bytes, source: str) -> bytes:
        for server in self.upstreams(source):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(FORWARD_TIMEOUT)
                try:
                    up.connect((server, 53))
                    up.send(packet)
                    return up.recv(65535)
                except OSError as exc:
                    log.debug("upstream %s: %s", server, exc)
        return servfail(packet)


def resolv_conf_servers(path: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return []
    return [parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2 and parts[0] == "nameserver"]
