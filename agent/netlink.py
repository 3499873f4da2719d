"""Container network namespaces and their first veth, set up in-process over rtnetlink.

A container start used to run two `ip -batch` processes (namespace + veth, then the addresses
inside); under TCG each process start costs about 80 ms, which made the network the biggest
step of `docker run`. The handful of rtnetlink requests those processes sent are built here
with ``struct`` (the guest has only the standard library, so no pyroute2): a new namespace
is an ``unshare(CLONE_NEWNET)`` in a short-lived thread, bind-mounted where `ip netns` keeps
them, and requests inside a namespace are sent from a thread that ``setns()`` into it (a
netlink socket belongs to the namespace it was opened in). Rarer changes (connecting a running
container to another network, bridges) still use `ip`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 2

NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR = 2
RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 10, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_GATEWAY, RTA_OIF = 5, 4
IFF_UP = 0x1
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 3, 0, 1
NLA_F_NESTED = 0x8000

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class NetlinkError(OSError):
    """The kernel refused a request (errno and what was asked)."""


class NamespaceLost(NetlinkError):
    """A namespace worker could not go back to its own network namespace: it must stop."""


# --- message building (pure) -------------------------------------------------------------
def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr, padded to four bytes."""
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, flags, change)


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def veth_request(host_if: str, peer_if: str, peer_netns_fd: int) -> tuple[int, int, bytes]:
    """``ip link add HOST type veth peer name PEER netns NS``."""
    peer = ifinfo() + attr(IFLA_IFNAME, peer_if.encode() + b"\0") + attr(IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd))
    body = ifinfo() + attr(IFLA_IFNAME, host_if.encode() + b"\0") + nested(
        IFLA_LINKINFO, attr(IFLA_INFO_KIND, b"veth"), nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer)))
    return RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body


def link_request(name: str, *, master: int | None = None, mac: str | None = None) -> tuple[int, int, bytes]:
    """``ip link set NAME [address MAC] [master IDX] up``."""
    body = ifinfo(flags=IFF_UP, change=IFF_UP) + attr(IFLA_IFNAME, name.encode() + b"\0")
    if mac is not None:
        body += attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
    if master is not None:
        body += attr(IFLA_MASTER, struct.pack("=I", master))
    return RTM_NEWLINK, 0, body


def address_request(index: int, address: str, prefixlen: int) -> tuple[int, int, bytes]:
    """``ip addr add ADDRESS/PREFIX dev IDX``."""
    raw = ipaddress.IPv4Address(address).packed
    body = struct.pack("=BBBBI", socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body


def default_route_request(gateway: str, index: int) -> tuple[int, int, bytes]:
    """``ip route add default via GATEWAY dev IDX``."""
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE,
                       RTN_UNICAST, 0)
    body += attr(RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed) + attr(RTA_OIF, struct.pack("=I", index))
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body


def parse_ack(data: bytes, seq: int) -> int:
    """The errno of the kernel's answer to request ``seq`` (0: done), from one recv."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _flags, got_seq, _pid = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            break
        if kind == NLMSG_ERROR and got_seq == seq:
            return -struct.unpack_from("=i", data, off + 16)[0]
        off += (length + 3) & ~3
    raise NetlinkError(0, f"no answer to netlink request {seq}")


# --- talking to the kernel ----------------------------------------------------------------
class Route:
    """An rtnetlink socket in the calling thread's network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Route:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, req: tuple[int, int, bytes], what: str) -> None:
        kind, flags, body = req
        self.seq += 1
        self.sock.send(message(kind, flags, self.seq, body))
        while True:
            try:
                err = parse_ack(self.sock.recv(65536), self.seq)
            except NetlinkError:
                continue  # not our answer (nothing else is asked on this socket, but be sure)
            if err:
                raise NetlinkError(err, f"{what}: {os.strerror(err)}")
            return


_local = threading.local()


class namespace_worker:  # noqa: N801 (a context manager, named for what it marks)
    """Marks the calling long-lived thread as one whose namespace switches this module may
    make in place: it then runs them itself, instead of in a fresh thread each (a thread start
    costs milliseconds under TCG), and goes back to its own network namespace after each. If
    it cannot, NamespaceLost is raised and the thread must not be used for anything else."""

    def __enter__(self) -> None:
        _local.worker = True

    def __exit__(self, *exc: object) -> None:
        _local.worker = False


def _in_place(fn: Callable[[], T]) -> T:
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fn()
    finally:
        back = _libc.setns(home, CLONE_NEWNET)
        err = ctypes.get_errno()
        os.close(home)
        if back != 0:
            _local.worker = False
            raise NamespaceLost(err, f"returning to the thread's network namespace: {os.strerror(err)}")


def _in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread (namespace switches stay in that thread) and return its
    result or raise its exception; in a namespace worker, in place."""
    if getattr(_local, "worker", False):
        return _in_place(fn)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=run, name="netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def create_netns(path: Path) -> None:
    """A new, empty network namespace kept alive by a bind mount at ``path`` (as `ip netns add`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)

    def make() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetlinkError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        if _libc.mount(source, str(path).encode(), None, MS_BIND, None) != 0:
            err = ctypes.get_errno()
            raise NetlinkError(err, f"bind-mounting the namespace at {path}: {os.strerror(err)}")

    try:
        _in_thread(make)
    except OSError:
        path.unlink(missing_ok=True)
        raise


def move_netns(source: Path, target: Path) -> None:
    """Give the namespace kept alive at ``source`` the path ``target`` (a new bind mount, then
    the old one removed; /run/netns is not a shared mount, so this is what MS_MOVE would do)."""
    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    if _libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        target.unlink(missing_ok=True)
        raise NetlinkError(err, f"bind-mounting {source} at {target}: {os.strerror(err)}")
    if _libc.umount2(str(source).encode(), MNT_DETACH) == 0:
        source.unlink(missing_ok=True)


def in_netns(path: Path, fn: Callable[[Route], T]) -> T:
    """Call ``fn`` with an rtnetlink socket inside the namespace at ``path``."""

    def enter() -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetlinkError(err, f"setns({path}): {os.strerror(err)}")
        finally:
            os.close(fd)
        with Route() as rt:
            return fn(rt)

    return _in_thread(enter)


def add_veth(netns: Path, bridge: str, host_if: str, peer_if: str, mac: str, address: str, prefixlen: int,
             gateway: str | None) -> None:
    """A veth pair from ``bridge`` into ``netns``: the host end enslaved and up, the inside end
    named ``peer_if`` with ``mac``, ``address/prefixlen``, up, and (for eth0) the default route.
    The inside loopback comes up too."""
    master = socket.if_nametoindex(bridge)
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with Route() as rt:
            rt.request(veth_request(host_if, peer_if, fd), f"creating veth {host_if}")
            rt.request(link_request(host_if, master=master), f"attaching {host_if} to {bridge}")
    finally:
        os.close(fd)

    def inside(rt: Route) -> None:
        rt.request(link_request("lo"), "bringing lo up")
        rt.request(link_request(peer_if, mac=mac), f"bringing {peer_if} up")
        index = socket.if_nametoindex(peer_if)  # this thread is in the namespace
        rt.request(address_request(index, address, prefixlen), f"adding {address}/{prefixlen}")
        if gateway is not None:
            rt.request(default_route_request(gateway, index), f"adding the default route via {gateway}")

    in_netns(netns, inside)


def loopback_up(netns: Path) -> None:
    in_netns(netns, lambda rt: rt.request(link_request("lo"), "bringing lo up"))
