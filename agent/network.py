"""Container networks in the guest: Linux bridges, veth pairs, IPAM and NAT (nftables).

The default network is ``bridge`` (Docker's semantics: no name resolution between
containers); user-defined networks get their own bridge and subnet. Each container with a
network gets a named network namespace (``/run/netns/pydesk-<id12>``) that crun joins.

A namespace costs ~50 ms of guest CPU to make under TCG (half of it the kernel's, half our
netlink requests), so each network in use keeps a few spares (``SPARES``), each made in the
background with one of the network's next addresses on its eth0: the next container on that
network without a fixed address takes one over (renamed to its own path). When they are made
is the engine's choice (``refill``): a start that took the last one has one more made at once,
the rest wait for a quiet moment, so a burst of starts does not pay for its successors.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import secrets
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from agent import netlink
from agent.runtime import umount

log = logging.getLogger(__name__)

DEFAULT_SUBNET = "172.17.0.0/16"
USER_POOL = ipaddress.ip_network("172.18.0.0/15")  # 172.18.0.0/16 … 172.19.0.0/16, then /24s
NETNS_DIR = Path("/run/netns")
SPARE_PREFIX = "pydesk-spare-"
NET_ADDR_SET = "3"  # /sys/class/net/*/addr_assign_type of an address set by hand (linux/netdevice.h)
SPARES = 4  # spare namespaces kept per network in use


class _Spare(NamedTuple):
    path: Path
    address: str
    info: dict[str, Any]
    owner: str  # who holds the address in the leases (see _spare_owner)


class NetworkError(Exception):
    pass


def ip(*args: str, input: str | None = None, netns: str | None = None) -> None:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    proc = subprocess.run(argv, input=input.encode() if input else None, capture_output=True,
                          stdin=None if input else subprocess.DEVNULL)
    if proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:6])}: {proc.stderr.decode(errors='replace').strip()}")


def nft(script: str) -> None:
    proc = subprocess.run(["nft", "-f", "-"], input=script.encode(), capture_output=True)
    if proc.returncode != 0:
        raise NetworkError(f"nft: {proc.stderr.decode(errors='replace').strip()}")


class Network:
    def __init__(self, record: dict[str, Any]) -> None:
        self.r = record

    @property
    def id(self) -> str:
        return self.r["Id"]

    @property
    def name(self) -> str:
        return self.r["Name"]

    @property
    def bridge(self) -> str:
        return self.r["Options"]["com.docker.network.bridge.name"]

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.r["IPAM"]["Config"][0]["Subnet"])

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return ipaddress.ip_address(self.r["IPAM"]["Config"][0]["Gateway"])

    @property
    def user_defined(self) -> bool:
        return self.name != "bridge"


class Networks:
    """All networks and the addresses handed out on them (state in ``root``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.nets: dict[str, Network] = {}
        self.leases: dict[str, dict[str, str]] = {}  # network id -> {ip: container id}
        self.on_up: list[Callable[[Network], None]] = []    # a user-defined network's bridge is up
        self.on_down: list[Callable[[Network], None]] = []  # ... and is being removed
        self.spares: dict[str, list[_Spare]] = {}  # network id -> namespaces ready for the next containers
        self._filling: set[str] = set()
        self._refills: queue.SimpleQueue[tuple[Network, int, Callable[[], bool] | None]] = queue.SimpleQueue()
        self._refiller: threading.Thread | None = None
        for p in sorted(root.glob("*.json")):
            net = Network(json.loads(p.read_text()))
            self.nets[net.id] = net
        if not any(n.name == "bridge" for n in self.nets.values()):
            self._add("bridge", DEFAULT_SUBNET, "pydesk0", internal=False, labels={}, builtin=True)

    # --- records ----------------------------------------------------------------------
    def _save(self, net: Network) -> None:
        tmp = self.root / f"{net.id}.tmp"
        tmp.write_text(json.dumps(net.r))
        os.replace(tmp, self.root / f"{net.id}.json")

    def _add(self, name: str, subnet: str, bridge: str, *, internal: bool, labels: dict, builtin: bool = False) -> Network:
        sn = ipaddress.ip_network(subnet)
        gw = str(next(sn.hosts()))
        nid = secrets.token_hex(32)
        from agent.containers import utc_now

        net = Network({
            "Name": name, "Id": nid, "Created": utc_now(), "Scope": "local", "Driver": "bridge",
            "EnableIPv6": False, "IPAM": {"Driver": "default", "Options": None,
                                          "Config": [{"Subnet": str(sn), "Gateway": gw}]},
            "Internal": internal, "Attachable": False, "Ingress": False, "ConfigFrom": {"Network": ""},
            "ConfigOnly": False, "Containers": {}, "Labels": labels,
            "Options": {"com.docker.network.bridge.name": bridge,
                        **({"com.docker.network.bridge.default_bridge": "true"} if builtin else {})},
        })
        self.nets[nid] = net
        self._save(net)
        return net

    def get(self, name_or_id: str) -> Network:
        with self.lock:
            for n in self.nets.values():
                if n.name == name_or_id or n.id == name_or_id:
                    return n
            matches = [n for n in self.nets.values() if n.id.startswith(name_or_id)]
            if len(matches) == 1:
                return matches[0]
        raise KeyError(f"network {name_or_id} not found")

    def create(self, name: str, subnet: str | None = None, internal: bool = False, labels: dict | None = None) -> Network:
        with self.lock:
            if any(n.name == name for n in self.nets.values()) or name in ("host", "none"):
                raise ValueError(f"network with name {name} already exists")
            used = [n.subnet for n in self.nets.values()]
            if subnet:
                sn = ipaddress.ip_network(subnet, strict=False)
                if any(sn.overlaps(u) for u in used):
                    raise ValueError(f"Pool overlaps with other one on this address space")
            else:
                sn = next((c for c in USER_POOL.subnets(new_prefix=16) if not any(c.overlaps(u) for u in used)), None) \
                    or next((c for c in ipaddress.ip_network("192.168.0.0/16").subnets(new_prefix=24)
                             if not any(c.overlaps(u) for u in used)), None)
                if sn is None:
                    raise ValueError("could not find an available, non-overlapping IPv4 address pool")
            bridge = "br-" + secrets.token_hex(6)
            net = self._add(name, str(sn), bridge, internal=internal, labels=labels or {})
            self.ensure_bridge(net)
            return net

    def remove(self, net: Network) -> None:
        with self.lock:
            if not net.user_defined:
                raise PermissionError(f"{net.name} is a pre-defined network and cannot be removed")
            self.drop_spare(net)
            # a spare still being made holds an address too: it gives way (fill_spare drops it
            # once it finds the network gone)
            if any(not _is_spare_owner(owner, net) for owner in self.leases.get(net.id, {}).values()):
                raise RuntimeError(f"error while removing network: network {net.name} id {net.id} has active endpoints")
            self.leases.pop(net.id, None)
            for cb in self.on_down:
                cb(net)
            try:
                ip("link", "del", net.bridge)
            except NetworkError:
                pass
            self._nat_rules()
            del self.nets[net.id]
            (self.root / f"{net.id}.json").unlink(missing_ok=True)

    # --- host side ------------------------------------------------------------------
    def setup(self) -> None:
        """At engine start: bridges, forwarding, NAT."""
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        for stale in NETNS_DIR.glob(SPARE_PREFIX + "*"):  # an earlier engine's spares
            _remove_netns_file(stale)
        for net in self.nets.values():
            self.ensure_bridge(net)

    def ensure_bridge(self, net: Network) -> None:
        """The network's bridge, with the gateway address and a MAC address of its own. A
        bridge without one takes the lowest of its ports' (veths with random addresses), so
        each new container or spare namespace could change it under the running containers,
        whose cached gateway entry then points nowhere until the kernel probes it again (~30
        s without DNS, NAT or host.docker.internal). Docker fixes the bridge's address too."""
        sys_dir = Path(f"/sys/class/net/{net.bridge}")
        mac = mac_address(str(net.gateway))
        if not sys_dir.exists():
            ip("-batch", "-", input=f"link add {net.bridge} address {mac} type bridge\n"
                                    f"addr add {net.gateway}/{net.subnet.prefixlen} dev {net.bridge}\n"
                                    f"link set {net.bridge} up\n")
        elif (sys_dir / "addr_assign_type").read_text().strip() != NET_ADDR_SET:  # made by an older engine
            ip("link", "set", net.bridge, "address", mac)
        self._nat_rules()
        if net.user_defined:
            for cb in self.on_up:
                cb(net)

    def _nat_rules(self) -> None:
        """One nftables table holds all our NAT and isolation rules; rewritten as a whole."""
        lines = ["table ip pydesk", "delete table ip pydesk", "table ip pydesk {",
                 "  chain postrouting { type nat hook postrouting priority srcnat; policy accept;"]
        for net in self.nets.values():
            if not net.r.get("Internal"):
                lines.append(f"    ip saddr {net.subnet} oifname != \"{net.bridge}\" masquerade")
        lines.append("  }")
        lines.append("  chain forward { type filter hook forward priority filter; policy accept;")
        bridges = [n.bridge for n in self.nets.values()]
        for a in bridges:  # networks are isolated from each other, as in Docker
            for b in bridges:
                if a != b:
                    lines.append(f"    iifname \"{a}\" oifname \"{b}\" drop")
        for net in self.nets.values():
            if net.r.get("Internal"):
                lines.append(f"    iifname \"{net.bridge}\" oifname != \"{net.bridge}\" drop")
        lines += ["  }", "}"]
        nft("\n".join(lines) + "\n")

    # --- containers -----------------------------------------------------------------
    def allocate(self, net: Network, container_id: str, want: str | None = None) -> str:
        with self.lock:
            leases = self.leases.setdefault(net.id, {})
            spares = self.spares.get(net.id, [])
            if want:
                for spare in [s for s in spares if s.address == want]:
                    self._drop(net, spare)
                holder = leases.get(want)
                if holder is not None and holder != container_id and not _is_spare_owner(holder, net):
                    raise ValueError(f"Address already in use: {want}")  # (a spare being made gives way)
                leases[want] = container_id
                return want
            for host in net.subnet.hosts():
                a = str(host)
                if host == net.gateway or a in leases:
                    continue
                leases[a] = container_id
                return a
            if spares and not _is_spare_owner(container_id, net):  # the last addresses are the spares'
                spare = spares[0]
                self._drop(net, spare)
                leases[spare.address] = container_id
                return spare.address
        raise ValueError(f"no available IPv4 addresses on network {net.name}")

    def release(self, container_id: str, net: Network | None = None) -> None:
        with self.lock:
            for nid, leases in self.leases.items():
                if net is not None and nid != net.id:
                    continue
                for a in [a for a, c in leases.items() if c == container_id]:
                    del leases[a]

    def interface_with(self, container_id: str, address: str) -> str | None:
        """The container's interface that holds ``address``."""
        proc = subprocess.run(["ip", "-n", self.netns_name(container_id), "-o", "-4", "addr", "show"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        for line in proc.stdout.splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[3].split("/")[0] == address:
                return parts[1]
        return None

    def free_ifname(self, container_id: str) -> str:
        proc = subprocess.run(["ip", "-n", self.netns_name(container_id), "-o", "link", "show"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        used = {line.split(":")[1].strip().split("@")[0] for line in proc.stdout.splitlines() if ":" in line}
        return next(f"eth{i}" for i in range(64) if f"eth{i}" not in used)

    @staticmethod
    def netns_name(container_id: str) -> str:
        return f"pydesk-{container_id[:12]}"

    def create_netns(self, container_id: str, first: tuple[Network, str] | None = None) -> tuple[str, dict[str, Any] | None]:
        """The container's network namespace with its loopback up, and with ``first``
        (network, address) attached as eth0. In-process over rtnetlink (agent/netlink.py):
        under TCG an `ip` process start costs tens of milliseconds."""
        path = NETNS_DIR / self.netns_name(container_id)
        if path.exists():
            self.delete_netns(container_id)
        info = None
        try:
            netlink.create_netns(path)
            if first is None:
                netlink.loopback_up(path)
            else:
                net, address = first
                mac, info = self._endpoint(net, address)
                netlink.add_veth(path, net.bridge, "veth" + secrets.token_hex(4), "eth0", mac, address,
                                 net.subnet.prefixlen, str(net.gateway))
        except OSError as exc:
            self.delete_netns(container_id)
            raise NetworkError(f"setting up the network of {container_id[:12]}: {exc}") from exc
        return str(path), info

    @staticmethod
    def _endpoint(net: Network, address: str) -> tuple[str, dict[str, Any]]:
        mac = mac_address(address)
        info = {"IPAddress": address, "IPPrefixLen": net.subnet.prefixlen, "Gateway": str(net.gateway),
                "MacAddress": mac, "NetworkID": net.id}
        return mac, info

    def _veth_commands(self, net: Network, container_id: str, address: str,
                       ifname: str) -> tuple[list[str], list[str], dict[str, Any]]:
        ns = self.netns_name(container_id)
        host_if = "veth" + secrets.token_hex(4)
        mac, info = self._endpoint(net, address)
        host = [f"link add {host_if} type veth peer name {ifname} netns {ns}",
                f"link set {host_if} master {net.bridge} up"]
        inside = [f"link set {ifname} address {mac}", f"addr add {address}/{net.subnet.prefixlen} dev {ifname}",
                  f"link set {ifname} up"]
        if ifname == "eth0":
            inside.append(f"route add default via {net.gateway}")
        return host, inside, info

    def attach(self, net: Network, container_id: str, address: str, ifname: str) -> dict[str, Any]:
        host, inside, info = self._veth_commands(net, container_id, address, ifname)
        ip("-batch", "-", input="".join(c + "\n" for c in host))
        ip("-batch", "-", netns=self.netns_name(container_id), input="".join(c + "\n" for c in inside))
        return info

    def detach(self, container_id: str, ifname: str) -> None:
        try:
            ip("link", "del", ifname, netns=self.netns_name(container_id))
        except NetworkError:
            pass

    # --- spare namespaces -------------------------------------------------------------
    def refill(self, net: Network, count: int = SPARES, while_: Callable[[], bool] | None = None) -> None:
        """Have ``net``'s spares made up to ``count``, in the background, by one long-lived
        thread (a thread start costs milliseconds under TCG, and a `run` would pay it); after
        the first, only as long as ``while_()`` holds."""
        with self.lock:
            if self._refiller is None:
                self._refiller = threading.Thread(target=self._refill_loop, name="netns-spare", daemon=True)
                self._refiller.start()
        self._refills.put((net, count, while_))

    def spare_count(self, net: Network) -> int:
        with self.lock:
            return len(self.spares.get(net.id, []))

    def _refill_loop(self) -> None:
        with netlink.namespace_worker():  # its namespace switches made in place, not in new threads
            while True:
                net, count, while_ = self._refills.get()
                try:
                    while self.fill_spare(net, count) and (while_ is None or while_()):
                        pass
                except netlink.NamespaceLost:
                    log.exception("the spare-namespace thread is stuck in another namespace; a new one takes over")
                    with self.lock:
                        self._refiller = None
                    return
                except Exception:  # the next container makes its own namespace
                    log.exception("making a spare network namespace for %s failed", net.name)

    def fill_spare(self, net: Network, count: int = 1) -> bool:
        """Make one more spare namespace for ``net`` if it has fewer than ``count``; whether
        it made one (slow: call it off the request path)."""
        token = secrets.token_hex(4)
        owner = _spare_owner(net, token)
        with self.lock:
            if len(self.spares.get(net.id, [])) >= count or net.id in self._filling or net.id not in self.nets:
                return False
            try:
                address = self.allocate(net, owner)
            except ValueError:
                return False  # the network is full: containers make their own namespaces
            self._filling.add(net.id)
        path = NETNS_DIR / f"{SPARE_PREFIX}{net.id[:12]}-{token}"
        spare = None
        lost: netlink.NamespaceLost | None = None
        try:
            netlink.create_netns(path)
            mac, info = self._endpoint(net, address)
            netlink.add_veth(path, net.bridge, "veth" + secrets.token_hex(4), "eth0", mac, address,
                             net.subnet.prefixlen, str(net.gateway))
            spare = _Spare(path, address, info, owner)
        except netlink.NamespaceLost as exc:
            lost = exc
        except OSError as exc:
            log.warning("no spare network namespace for %s: %s", net.name, exc)
        with self.lock:
            self._filling.discard(net.id)
            if spare is not None and net.id in self.nets and self.leases.get(net.id, {}).get(address) == owner:
                self.spares.setdefault(net.id, []).append(spare)
                return True
            self.release(owner, net)  # (unless a container with that fixed address took it meanwhile)
        _remove_netns_file(path)
        if lost is not None:
            raise lost
        return False

    def take_spare(self, net: Network, container_id: str) -> tuple[str, dict[str, Any]] | None:
        """One of ``net``'s spare namespaces, now the container's (its path and eth0's
        endpoint), or None when there is none ready."""
        with self.lock:
            spares = self.spares.get(net.id)
            if not spares:
                return None
            spare = spares.pop(0)
            self.leases[net.id][spare.address] = container_id
        target = NETNS_DIR / self.netns_name(container_id)
        try:
            if target.exists():
                self.delete_netns(container_id)
            netlink.move_netns(spare.path, target)
        except OSError as exc:
            log.warning("could not take over the spare namespace of %s: %s", net.name, exc)
            self.release(container_id, net)
            _remove_netns_file(spare.path)
            return None
        return str(target), dict(spare.info)

    def drop_spare(self, net: Network) -> None:
        """Remove all of ``net``'s spare namespaces."""
        with self.lock:
            for spare in list(self.spares.get(net.id, [])):
                self._drop(net, spare)

    def _drop(self, net: Network, spare: _Spare) -> None:
        with self.lock:
            spares = self.spares.get(net.id, [])
            if spare not in spares:
                return
            spares.remove(spare)
            self.release(spare.owner, net)
        _remove_netns_file(spare.path)

    def delete_netns(self, container_id: str) -> None:
        """What `ip netns del` does, without its process (tens of milliseconds under TCG):
        unmount the namespace's bind mount and remove the file. The kernel frees the namespace
        and its end of each veth pair once nothing holds it."""
        _remove_netns_file(NETNS_DIR / self.netns_name(container_id))


def mac_address(address: str) -> str:
    """The MAC address of an interface with IPv4 ``address``, as Docker makes them: locally
    administered, 02:42 then the address's four bytes (unique on a network, as its addresses are)."""
    return "02:42:" + ":".join(f"{int(x):02x}" for x in address.split("."))


def _spare_owner(net: Network, token: str) -> str:
    """Who holds a spare namespace's address in the leases (never a container id)."""
    return f"spare:{net.id[:12]}:{token}"


def _is_spare_owner(owner: str, net: Network) -> bool:
    return owner.startswith(f"spare:{net.id[:12]}:")


def _remove_netns_file(path: Path) -> None:
    if not path.exists():
        return
    try:
        umount(str(path))
        path.unlink()
    except OSError as exc:
        log.warning("removing network namespace %s: %s", path.name, exc)
