"""rtnetlink messages for container namespaces (agent/netlink.py), byte for byte. The kernel's
side is exercised by every container start in tests/vm."""

from __future__ import annotations

import socket
import struct

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
