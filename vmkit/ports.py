"""Published container ports on the host: QEMU user-network host forwards, added at run time.

The guest engine decides *what* is published (agent/ports.py); this module is the host half.
(UDP goes through vmkit/udp_relay.py instead; see there for why.)
The daemon keeps one stream open to the engine's ports socket in the guest and answers its
requests (``add``, ``remove``, ``sync``) by changing QEMU's host forwards over QMP
(``hostfwd_add``/``hostfwd_remove`` through ``human-monitor-command``). QEMU itself then
listens on the host and carries each connection into the guest through its user network, so
no byte of container traffic passes through Python.

QEMU's own table (``info usernet``) is the only host-side state: a daemon that restarts and
re-adopts a running VM reads it back instead of remembering anything.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vmkit import backlog
from vmkit.guest_link import GuestLink
from vmkit.spec import PUBLISHED_GUEST_PORTS
from vmkit.udp_relay import UdpRelay

log = logging.getLogger(__name__)

GUEST_SOCKET = "/run/pydesk/ports.sock"
GUEST_ADDRESS = "10.0.2.15"
#: Guest ports the engine hands out for published bindings; forwards to other guest ports
#: (the static ``--port`` settings, which may not use this range) are never touched here.
DYNAMIC_GUEST_PORTS = PUBLISHED_GUEST_PORTS

_USERNET_LINE = re.compile(
    r"^\s*(?P<proto>TCP|UDP)\[HOST_FORWARD\]\s+(?P<fd>\d+)\s+(?P<host_ip>\S+)\s+(?P<host_port>\d+)\s+"
    r"(?P<guest_ip>\S+)\s+(?P<guest_port>\d+)")


class PublishError(Exception):
    """QEMU refused a host forward (the port is taken, or the address is not ours)."""


@dataclass(frozen=True)
class HostForward:
    proto: str
    host_ip: str
    host_port: int
    guest_port: int

    @property
    def rule(self) -> str:
        """The hostfwd_add spelling."""
        return f"{self.proto}:{self.host_ip}:{self.host_port}-{GUEST_ADDRESS}:{self.guest_port}"

    @property
    def host_key(self) -> str:
        """The hostfwd_remove spelling."""
        return f"{self.proto}:{self.host_ip}:{self.host_port}"

    @classmethod
    def from_wire(cls, r: dict[str, Any]) -> HostForward:
        return cls(str(r["proto"]), str(r["host_ip"]), int(r.get("host_port") or 0), int(r["guest_port"]))

    def wire(self) -> dict[str, Any]:
        return {"proto": self.proto, "host_ip": self.host_ip, "host_port": self.host_port, "guest_port": self.guest_port}


def parse_usernet(text: str) -> list[HostForward]:
    """The host forwards in ``info usernet`` output (``*`` is QEMU's spelling of 0.0.0.0)."""
    return list(usernet_fds(text))


def usernet_fds(text: str) -> dict[HostForward, int]:
    """The host forwards in ``info usernet`` output with QEMU's descriptor for each."""
    out: dict[HostForward, int] = {}
    for line in text.splitlines():
        m = _USERNET_LINE.match(line)
        if m:
            ip = m["host_ip"]
            fwd = HostForward(m["proto"].lower(), "0.0.0.0" if ip == "*" else ip,
                              int(m["host_port"]), int(m["guest_port"]))
            out[fwd] = int(m["fd"])
    return out


class ForwardTable:
    """QEMU's host forwards for one user-network netdev, changed through HMP."""

    def __init__(self, hmp: Callable[[str], str], netdev: str = "net0", qemu_pid: int | None = None) -> None:
        self.hmp = hmp
        self.netdev = netdev
        self.qemu_pid = qemu_pid  # for widening QEMU's listen backlog (vmkit/backlog.py)
        self._backlog_warned = False

    def current(self) -> list[HostForward]:
        return [f for f in parse_usernet(self.hmp("info usernet")) if f.guest_port in DYNAMIC_GUEST_PORTS]

    def add(self, fwd: HostForward) -> HostForward:
        """Add one forward; port 0 lets QEMU pick, and the port it bound is returned."""
        out = self.hmp(f"hostfwd_add {self.netdev} {fwd.rule}").strip()
        if out:  # HMP prints nothing on success
            raise PublishError(f"Bind for {fwd.host_ip}:{fwd.host_port} failed: port is already allocated"
                               if fwd.host_port else f"cannot listen on {fwd.host_ip}: {out}")
        for f, fd in usernet_fds(self.hmp("info usernet")).items():
            if f.guest_port == fwd.guest_port and f.proto == fwd.proto and f.host_ip == fwd.host_ip \
                    and (f.host_port == fwd.host_port or not fwd.host_port):
                if f.proto == "tcp":
                    self._widen(f, fd)
                return f
        if fwd.host_port:
            return fwd
        raise PublishError(f"QEMU did not report the port it bound for {fwd.rule}")

    def widen_all(self) -> None:
        """Widen the backlog of every TCP forward (the static ``--port`` ones at start, and all
        of them after adopting a running QEMU)."""
        for f, fd in usernet_fds(self.hmp("info usernet")).items():
            if f.proto == "tcp":
                self._widen(f, fd)

    def _widen(self, f: HostForward, fd: int) -> None:
        if self.qemu_pid is None or not backlog.supported():
            return
        try:
            backlog.widen(self.qemu_pid, fd, f.host_ip, f.host_port)
        except OSError as exc:
            if not self._backlog_warned:
                log.warning("host port %s:%d keeps QEMU's listen backlog of one (%s): a burst of "
                            "connections may see resets", f.host_ip, f.host_port, exc)
                self._backlog_warned = True

    def remove(self, fwd: HostForward) -> None:
        out = self.hmp(f"hostfwd_remove {self.netdev} {fwd.host_key}").strip()
        if "removed" not in out:
            log.debug("hostfwd_remove %s: %s", fwd.host_key, out)


class PortPublisher(GuestLink):
    """Serves the guest engine's port requests for as long as the VM runs.

    TCP ports become QEMU host forwards (``table``); UDP ports become relays of ours
    (vmkit/udp_relay.py). ``open_stream(path)`` opens a stream to a unix socket in the guest:
    the engine's ports socket (kept open by GuestLink) and the UDP relay socket.
    """

    def __init__(self, table: ForwardTable, open_stream: Callable[[str], Any]) -> None:
        super().__init__(GUEST_SOCKET, open_stream, "port-publisher")
        self.table = table
        self.udp: dict[int, UdpRelay] = {}  # guest port -> relay
        self.lock = threading.Lock()

    def close(self) -> None:
        super().close()
        with self.lock:
            relays, self.udp = list(self.udp.values()), {}
        for r in relays:
            r.close()

    def on_message(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = self.handle(str(msg.get("op")), msg.get("rules") or [])
        reply["id"] = msg.get("id")
        return reply

    # --- requests ---------------------------------------------------------------------
    def handle(self, op: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
        with self.lock:
            try:
                if op == "add":
                    return {"rules": [f.wire() for f in self._add_all(rules)]}
                if op == "remove":
                    self._remove([HostForward.from_wire(r) for r in rules])
                    return {}
                if op == "sync":
                    done, errors = self._sync(rules)
                    return {"rules": [f.wire() for f in done], "errors": errors}
                return {"error": f"unknown port operation {op!r}"}
            except PublishError as exc:
                return {"error": str(exc)}
            except Exception as exc:  # QMP trouble: the guest must still get an answer
                log.exception("port request %s failed", op)
                return {"error": f"the host could not change its port forwards: {exc}"}

    # --- the forwards, TCP in QEMU and UDP in relays ----------------------------------------
    def _live(self) -> list[HostForward]:
        tcp = [f for f in self.table.current() if f.proto == "tcp"]
        return tcp + [HostForward("udp", r.host_ip, r.host_port, g) for g, r in self.udp.items()]

    def _add_fwd(self, fwd: HostForward) -> HostForward:
        if fwd.proto == "tcp":
            return self.table.add(fwd)
        try:
            relay = UdpRelay(fwd.host_ip, fwd.host_port, fwd.guest_port, self.open_stream)
        except OSError as exc:
            raise PublishError(str(exc.strerror or exc)) from exc
        self.udp[fwd.guest_port] = relay
        return HostForward("udp", relay.host_ip, relay.host_port, fwd.guest_port)

    def _remove_fwd(self, fwd: HostForward) -> None:
        if fwd.proto == "tcp":
            self.table.remove(fwd)
        else:
            relay = self.udp.pop(fwd.guest_port, None)
            if relay is not None:
                relay.close()

    def _add_one(self, r: dict[str, Any]) -> HostForward:
        fwd = HostForward.from_wire(r)
        for stale in self._live():  # a forward left behind for this guest port
            if stale.guest_port == fwd.guest_port and stale.proto == fwd.proto:
                self._remove_fwd(stale)
        candidates: list[int] = [int(p) for p in r.get("candidates") or []]
        if not candidates:
            return self._add_fwd(fwd)
        last: PublishError | None = None
        for port in candidates:
            try:
                return self._add_fwd(HostForward(fwd.proto, fwd.host_ip, port, fwd.guest_port))
            except PublishError as exc:
                last = exc
        raise PublishError(f"no free port in {candidates[0]}-{candidates[-1]} on {fwd.host_ip}") from last

    def _add_all(self, rules: Iterable[dict[str, Any]]) -> list[HostForward]:
        added: list[HostForward] = []
        try:
            for r in rules:
                added.append(self._add_one(r))
        except PublishError:
            self._remove(added)  # all of a container's ports, or none
            raise
        return added

    def _remove(self, fwds: Iterable[HostForward]) -> None:
        live = self._live()
        for f in fwds:
            for cur in live:  # the rule as it is in place (a random port is known only there)
                if cur.guest_port == f.guest_port and cur.proto == f.proto:
                    self._remove_fwd(cur)

    def _sync(self, rules: list[dict[str, Any]]) -> tuple[list[HostForward], list[str]]:
        want = [HostForward.from_wire(r) for r in rules]
        by_gport = {(w.proto, w.guest_port): w for w in want}
        done: list[HostForward] = []
        for cur in self._live():
            w = by_gport.get((cur.proto, cur.guest_port))
            if w is not None and w.host_ip == cur.host_ip and w.host_port in (0, cur.host_port):
                done.append(cur)
                del by_gport[(cur.proto, cur.guest_port)]
            else:
                self._remove_fwd(cur)
        errors = []
        for w in by_gport.values():
            try:
                done.append(self._add_fwd(w))
            except PublishError as exc:
                errors.append(str(exc))
        return done, errors
