"""rtnetlink messages for container namespaces (agent/netlink.py), byte for byte, and a
namespace worker's switches (as root: a real network namespace on this host). The rest of the
kernel's side is exercised by every container start in tests/vm."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from agent import netlink


def attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        out.append((kind, data[off + 4:off + length]))
        off += (length + 3) & ~3
    return out


def test_attributes_are_padded_to_four_bytes() -> None:
    a = netlink.attr(netlink.IFLA_IFNAME, b"eth0\0")
    assert struct.unpack_from("=HH", a) == (9, netlink.IFLA_IFNAME) and len(a) == 12 and a.endswith(b"\0\0\0")


def test_veth_request_names_both_ends_and_the_peer_namespace() -> None:
    kind, flags, body = netlink.veth_request("vethab12", "eth0", 7)
    assert kind == netlink.RTM_NEWLINK and flags == netlink.NLM_F_CREATE | netlink.NLM_F_EXCL
    top = attrs(body[16:])
    assert top[0] == (netlink.IFLA_IFNAME, b"vethab12\0")
    kind_, linkinfo = top[1]
    assert kind_ == netlink.IFLA_LINKINFO | netlink.NLA_F_NESTED
    info = attrs(linkinfo)
    assert info[0] == (netlink.IFLA_INFO_KIND, b"veth")
    data = attrs(info[1][1])
    assert data[0][0] == netlink.VETH_INFO_PEER
    peer = attrs(data[0][1][16:])  # an ifinfomsg, then the peer's attributes
    assert peer == [(netlink.IFLA_IFNAME, b"eth0\0"), (netlink.IFLA_NET_NS_FD, struct.pack("=I", 7))]


def test_link_address_and_route_requests() -> None:
    _, _, body = netlink.link_request("eth0", mac="02:42:ac:11:00:02", master=3)
    family, _type, index, flags, change = struct.unpack_from("=BxHiII", body)
    assert (family, index, flags, change) == (socket.AF_UNSPEC, 0, netlink.IFF_UP, netlink.IFF_UP)
    assert attrs(body[16:]) == [(netlink.IFLA_IFNAME, b"eth0\0"), (netlink.IFLA_ADDRESS, bytes.fromhex("0242ac110002")),
                                (netlink.IFLA_MASTER, struct.pack("=I", 3))]
    kind, _, body = netlink.address_request(5, "172.17.0.2", 16)
    assert kind == netlink.RTM_NEWADDR and struct.unpack_from("=BBBBI", body) == (socket.AF_INET, 16, 0, 0, 5)
    assert attrs(body[8:]) == [(netlink.IFA_LOCAL, bytes([172, 17, 0, 2])), (netlink.IFA_ADDRESS, bytes([172, 17, 0, 2]))]
    kind, _, body = netlink.default_route_request("172.17.0.1", 5)
    assert kind == netlink.RTM_NEWROUTE and body[4] == netlink.RT_TABLE_MAIN and body[0] == socket.AF_INET
    assert attrs(body[12:]) == [(netlink.RTA_GATEWAY, bytes([172, 17, 0, 1])), (netlink.RTA_OIF, struct.pack("=I", 5))]


def test_acks_and_errors() -> None:
    def answer(seq: int, err: int) -> bytes:
        return struct.pack("=IHHII", 36, netlink.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + b"\0" * 16

    assert netlink.parse_ack(answer(4, 0), 4) == 0
    assert netlink.parse_ack(answer(3, 0) + answer(4, 17), 4) == 17  # EEXIST for the request asked about
    with pytest.raises(netlink.NetlinkError):
        netlink.parse_ack(answer(3, 0), 4)


needs_netns = pytest.mark.skipif(os.geteuid() != 0, reason="making network namespaces needs root (CAP_SYS_ADMIN)")


def _in_new_thread(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` in a thread of its own (whatever namespace it ends in dies with it)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]


@needs_netns
def test_a_namespace_worker_switches_in_place_and_comes_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ns"
    started: list[str | None] = []

    class Spy(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    def work() -> tuple[str, str, str, set[str], int]:
        home = os.readlink("/proc/thread-self/ns/net")
        monkeypatch.setattr(netlink.threading, "Thread", Spy)
        with netlink.namespace_worker():
            netlink.create_netns(path)
            inside = netlink.in_netns(path, lambda rt: os.readlink("/proc/thread-self/ns/net"))
            netlink.loopback_up(path)
            links = netlink.in_netns(path, lambda rt: {name for _i, name in socket.if_nameindex()})
            after = os.readlink("/proc/thread-self/ns/net")
        monkeypatch.undo()
        netlink.loopback_up(path)  # not a worker: a fresh thread for the switch
        return home, inside, after, links, len(started)

    try:
        home, inside, after, links, extra_threads = _in_new_thread(work)
    finally:
        if os.path.ismount(path):
            subprocess.run(["umount", str(path)], check=True)
    assert inside != home and after == home  # it was inside, and came back
    assert links == {"lo"}
    assert extra_threads == 0 and started == []  # no thread started for the three switches


@needs_netns
def test_a_namespace_worker_that_cannot_come_back_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ns"
    real = netlink._libc
    calls: list[int] = []

    class OneWay:
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(real, name)

        def setns(self, fd: int, kind: int) -> int:
            calls.append(fd)
            if len(calls) == 2:  # the way back
                ctypes.set_errno(1)
                return -1
            return real.setns(fd, kind)

    def work() -> bool:
        with netlink.namespace_worker():
            netlink.create_netns(path)
            monkeypatch.setattr(netlink, "_libc", OneWay())
            try:
                with pytest.raises(netlink.NamespaceLost, match="returning to the thread's network namespace"):
                    netlink.in_netns(path, lambda rt: None)
            finally:
                monkeypatch.setattr(netlink, "_libc", real)
            return bool(getattr(netlink._local, "worker", False))

    try:
        still_worker = _in_new_thread(work)
    finally:
        if os.path.ismount(path):
            subprocess.run(["umount", str(path)], check=True)
    assert len(calls) == 2 and not still_worker
