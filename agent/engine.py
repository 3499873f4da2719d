"""The engine: images, containers, networks and execs — what the Engine API serves.

Errors raised here carry the HTTP status Docker would answer with (``EngineError``), so
the API layer only translates them to Docker's JSON error shape.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import filters, reference, runtime, seccomp, stats, top, workers
from agent.containers import RECORDS, ZERO_TIME, Container, Process, new_id, parse_signal, utc_now
from agent.events import Events
from agent.housekeeping import Housekeeper
from agent.launcher import Launcher, exit_status
from agent.logs import LogFile
from agent.network import SPARES, Network, NetworkError, Networks
from agent.dns import NameServer, resolv_conf_servers
from agent.ports import HOST_GATEWAY, PortBroker, PortError, docker_port_map, host_service_ports
from agent.ports import requested as requested_ports
from agent.rootpath import lookup_groups, lookup_user, resolve_in_root
from agent.store import ImageInUse, ImageNotFound, Store, StoreError
from agent.volumes import VolumeError, Volumes, tmpfs_options
from agent.volumes import plan as plan_mounts

log = logging.getLogger(__name__)

ENGINE_ROOT = Path("/var/lib/pydesk/engine")
BUILTIN_IMAGES = Path("/usr/lib/pydesk/images")
INIT_BINARY = "/usr/bin/tini-static"
#: How long start/rm/cp wait for an exited container's clean-up (seconds).
CLEANUP_WAIT = 60.0
REMOVAL_WAIT = 30.0  # a removed container's unmount and delete, after its exit clean-up
NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
ADJECTIVES = ("brave", "calm", "eager", "fond", "happy", "jolly", "keen", "lucid", "nifty", "quirky", "sharp", "witty")
NOUNS = ("turing", "hopper", "lovelace", "ritchie", "thompson", "torvalds", "knuth", "liskov", "hamilton", "curie")


class EngineError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(what: str) -> EngineError:
    return EngineError(404, what)


MIN_MEMORY = 6 * 1024 * 1024  # dockerd's smallest --memory


@dataclasses.dataclass(frozen=True)
class SecurityOptions:
    """``--security-opt``: seccomp unconfined or not, no_new_privs on or off."""
    seccomp: bool = True
    no_new_privileges: bool = True  # (Docker's default is off; pydesk's is on, as the brief asks)


def security_options(items: list[str] | None) -> SecurityOptions:
    """HostConfig.SecurityOpt as dockerd reads it (``key=value`` or the old ``key:value``);
    AppArmor and SELinux labels are accepted and have nothing to do in this VM."""
    seccomp, nnp = True, True
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            key, sep, value = item.partition(":")
        if key == "no-new-privileges":
            if value not in ("", "true", "false"):
                raise EngineError(400, f'invalid --security-opt 2: "{item}"')
            nnp = value != "false"
        elif key == "seccomp" and value == "unconfined":
            seccomp = False
        elif key == "seccomp":
            raise EngineError(400, "custom seccomp profiles are not supported here: use the default profile or "
                                   "seccomp=unconfined")
        elif key not in ("apparmor", "label"):
            raise EngineError(400, f'invalid --security-opt 2: "{item}"')
    return SecurityOptions(seccomp=seccomp, no_new_privileges=nnp)


#: What dockerd sets in a container's own network namespace unless told otherwise: any user may
#: bind ports below 1024 and send ICMP echo (ping without privileges).
NET_SYSCTLS = {"net.ipv4.ip_unprivileged_port_start": "0", "net.ipv4.ping_group_range": "0 2147483647"}


def normalize(ref: str) -> str:
    try:
        return str(reference.parse(ref))
    except ValueError as exc:
        raise EngineError(400, str(exc)) from exc


def familiar(ref: str) -> str:
    try:
        return reference.parse(ref).familiar
    except ValueError:
        return ref


class ExecInstance:
    def __init__(self, container: Container, config: dict[str, Any]) -> None:
        self.id = new_id()
        self.container = container
        self.config = config
        self.process: Process | None = None
        self.running = False
        self.exit_code: int | None = None
        self.pid = 0
        self.done = threading.Event()

    def inspect(self) -> dict[str, Any]:
        c = self.config
        return {
            "ID": self.id, "Running": self.running, "ExitCode": self.exit_code, "ProcessConfig": {
                "tty": bool(c.get("Tty")), "entrypoint": (c.get("Cmd") or [""])[0],
                "arguments": (c.get("Cmd") or [])[1:], "privileged": bool(c.get("Privileged")),
                "user": c.get("User") or ""},
            "OpenStdin": bool(c.get("AttachStdin")), "OpenStderr": bool(c.get("AttachStderr")),
            "OpenStdout": bool(c.get("AttachStdout")), "CanRemove": False, "ContainerID": self.container.id,
            "DetachKeys": c.get("DetachKeys") or "", "Pid": self.pid,
        }


class Engine:
    def __init__(self, root: Path = ENGINE_ROOT) -> None:
        self.root = root
        (root / "containers").mkdir(parents=True, exist_ok=True)
        self.store = Store(root / "images", in_use=self._image_in_use)
        self.networks = Networks(root / "networks")
        self.volumes = Volumes(root / "volumes")
        self.ports = PortBroker(host_service_ports())
        self.dns = NameServer(self._dns_lookup, self._dns_upstreams)
        self.networks.on_up.append(self._network_up)
        self.networks.on_down.append(lambda net: self.dns.close(net.id))
        self.events = Events()
        self.lock = threading.RLock()
        self.containers: dict[str, Container] = {}
        self.removing: dict[str, Container] = {}  # removed, their clean-up not finished (_finish_removal)
        self.housekeeper = Housekeeper()  # exit clean-ups and removals, at a quiet moment
        self.launcher = Launcher()  # cruns started ahead of the containers they will run
        self.execs: dict[str, ExecInstance] = {}
        self.procs: dict[str, Process] = {}
        self.started = time.time()
        if (root / "trash").is_dir():  # what an earlier engine had not finished deleting
            threading.Thread(target=self._empty_trash, name="trash", daemon=True).start()
        for d in sorted((root / "containers").iterdir()):
            try:
                c = Container.load(d)
            except (OSError, ValueError) as exc:
                log.warning("skipping damaged container record %s: %s", d.name, exc)
                continue
            self.containers[c.id] = c

    # --- start-up ---------------------------------------------------------------------
    def startup(self) -> None:
        runtime.setup_cgroups()
        Path(runtime.CRUN_ROOT).mkdir(parents=True, exist_ok=True)
        # An engine restart (a VM boot starts with none): an earlier engine's waiting cruns go,
        # and so does every container that ran under it, with crun's state of it. No orphans.
        self.launcher.sweep()
        for runtime_id in os.listdir(runtime.CRUN_ROOT):
            runtime.kill(runtime_id, "KILL", all_processes=True)
            runtime.delete(runtime_id)
        try:
            self.networks.setup()
            self.ports.setup()
            self._top_up_spares(self.networks.get("bridge"))
        except (NetworkError, PortError, OSError) as exc:
            log.error("network setup failed: %s", exc)
        self._load_builtin_images()
        for c in self.containers.values():
            # The VM stopped under these containers: record that, as Docker does after a crash.
            if c.state.get("Running") or c.state.get("Restarting"):
                self._teardown_network(c)
                self._umount_rootfs(c)
                c.state.update(Running=False, Paused=False, Restarting=False, Pid=0, Status="exited",
                               ExitCode=c.state.get("ExitCode") or 255, FinishedAt=utc_now())
                c.save()
            elif os.path.ismount(c.rootfs):  # an engine restart before an exit's clean-up was done
                c.cleaned.clear()
                self._exit_cleanup(c)
        for c in list(self.containers.values()):
            policy = (c.r["HostConfig"].get("RestartPolicy") or {}).get("Name") or "no"
            if policy == "always" or (policy == "unless-stopped" and not c.r.get("ManuallyStopped")):
                try:
                    self.start(c)
                except EngineError as exc:
                    log.error("restart of %s at boot failed: %s", c.name, exc.message)
        # No cruns started ahead yet: the first start tops them up. At boot the guest's CPU
        # goes to the host's agent connection and the shares being mounted.

    # --- names on user-defined networks -------------------------------------------------
    def _network_up(self, net: Network) -> None:
        try:
            self.dns.listen(net.id, str(net.gateway))
        except OSError as exc:
            log.error("no DNS on network %s: %s", net.name, exc)

    def _container_at(self, address: str) -> Container | None:
        for c in list(self.containers.values()):
            if c.running and any(ep.get("IPAddress") == address for ep in c.r["NetworkSettings"]["Networks"].values()):
                return c
        return None

    def _dns_lookup(self, network_id: str, source: str, name: str) -> list[str] | None:
        """Addresses for ``name`` as the container at ``source`` sees it: the running containers
        (names, aliases, short IDs) on every user-defined network it shares with them."""
        if name in ("host.docker.internal", "gateway.docker.internal"):
            return [HOST_GATEWAY]
        asker = self._container_at(source)
        nets = {n for n in (asker.r["NetworkSettings"]["Networks"] if asker else {})}
        listener = self.networks.nets.get(network_id)
        if listener is not None:
            nets.add(listener.name)
        found: list[str] = []
        for c in list(self.containers.values()):
            if not c.running:
                continue
            for net_name, ep in c.r["NetworkSettings"]["Networks"].items():
                if net_name not in nets or not ep.get("IPAddress") or net_name in ("bridge", "host", "none"):
                    continue
                names = {c.name.lower(), *(str(a).lower() for a in ep.get("Aliases") or [])}
                if name in names and ep["IPAddress"] not in found:
                    found.append(ep["IPAddress"])
        return found or None

    def _dns_upstreams(self, source: str) -> list[str]:
        asker = self._container_at(source)
        own = list((asker.r["HostConfig"].get("Dns") or []) if asker else [])
        return own or resolv_conf_servers()

    def _load_builtin_images(self) -> None:
        if not BUILTIN_IMAGES.is_dir():
            return
        for tar in sorted(BUILTIN_IMAGES.glob("*.tar")):
            ref = normalize(tar.stem)
            try:
                self.store.image(ref)
                continue
            except (ImageNotFound, StoreError):
                pass
            with open(tar, "rb") as f:
                self.store.load(f, normalize=normalize)
            log.info("loaded built-in image %s", ref)

    # --- lookups ----------------------------------------------------------------------
    def container(self, ref: str) -> Container:
        with self.lock:
            if ref in self.containers:
                return self.containers[ref]
            name = ref.lstrip("/")
            for c in self.containers.values():
                if c.name == name:
                    return c
            matches = [c for c in self.containers.values() if c.id.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
        raise not_found(f"No such container: {ref}")

    def image(self, ref: str):  # type: ignore[no-untyped-def]
        """An image by name (normalised as Docker does), full id or unique id prefix."""
        candidates = [ref]
        if not ref.startswith("sha256:"):
            with contextlib.suppress(EngineError):
                candidates.insert(0, normalize(ref))
        for cand in candidates:
            with contextlib.suppress(ImageNotFound, StoreError):
                return self.store.image(cand)
        raise not_found(f"No such image: {ref if ref.startswith('sha256:') else familiar(ref)}")

    def image_users(self, image_id: str) -> list[Container]:
        """The containers using an image. A removed container whose tree is still being
        deleted in the background is waited for: to the client, `rm` has already answered,
        so `rmi` right after it must not see it (nor delete layers under its mounted rootfs).
        One whose clean-up is stuck still counts."""
        with self.lock:
            users = [c for c in self.containers.values() if c.r["Image"] == image_id]
            pending = [c for c in self.removing.values() if c.r["Image"] == image_id]
        for c in pending:
            self.housekeeper.expedite(c.id)
        return users + [c for c in pending if not c.gone.wait(CLEANUP_WAIT + REMOVAL_WAIT)]

    def _image_in_use(self, image_id: str) -> bool:
        return bool(self.image_users(image_id))

    # --- create -----------------------------------------------------------------------
    def _unique_name(self, name: str | None) -> str:
        with self.lock:
            taken = {c.name for c in self.containers.values()}
            if name:
                if not NAME_RE.match(name):
                    raise EngineError(400, f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
                name = name.lstrip("/")
                if name in taken:
                    other = next(c for c in self.containers.values() if c.name == name)
                    raise EngineError(409, f'Conflict. The container name "/{name}" is already in use by container '
                                           f'"{other.id}". You have to remove (or rename) that container to be able to reuse that name.')
                return name
            while True:
                cand = f"{random.choice(ADJECTIVES)}_{random.choice(NOUNS)}"
                if cand not in taken:
                    return cand

    def create(self, body: dict[str, Any], name: str | None = None) -> Container:
        image_ref = body.get("Image") or ""
        if not image_ref:
            raise EngineError(400, "Config.Image must be set")
        img = self.image(image_ref)
        icfg = img.config.get("config") or {}
        host = dict(body.get("HostConfig") or {})
        host.setdefault("LogConfig", {"Type": "json-file", "Config": {}})
        if not (host.get("LogConfig") or {}).get("Type"):
            host["LogConfig"] = {"Type": "json-file", "Config": {}}
        host["RestartPolicy"] = host.get("RestartPolicy") or {"Name": "no", "MaximumRetryCount": 0}
        host["RestartPolicy"].setdefault("Name", "no")
        if host["RestartPolicy"]["Name"] in ("", None):
            host["RestartPolicy"]["Name"] = "no"
        if host["RestartPolicy"]["Name"] not in ("no", "always", "unless-stopped", "on-failure"):
            raise EngineError(400, f"invalid restart policy '{host['RestartPolicy']['Name']}'")
        if host.get("AutoRemove") and host["RestartPolicy"]["Name"] != "no":
            raise EngineError(400, "can't create 'AutoRemove' container with restart policy")
        console_size(host.get("ConsoleSize"))
        if 0 < (host.get("Memory") or 0) < MIN_MEMORY:
            raise EngineError(400, "Minimum memory limit allowed is 6MB")
        security_options(host.get("SecurityOpt"))  # a bad one is refused now, not at every start
        env: dict[str, str] = {}
        for e in list(icfg.get("Env") or []) + list(body.get("Env") or []):
            k, _, v = e.partition("=")
            env[k] = v
        entrypoint = body.get("Entrypoint")
        cmd = body.get("Cmd")
        if isinstance(entrypoint, str):
            entrypoint = [entrypoint]
        if isinstance(cmd, str):
            cmd = [cmd]
        if entrypoint == [""]:  # `--entrypoint ""`: none at all, and not the image's Cmd either
            entrypoint = []
            cmd = cmd or []
        elif entrypoint is None or entrypoint == []:
            entrypoint = [] if entrypoint == [] and body.get("Entrypoint") is not None else (icfg.get("Entrypoint") or [])
            if not cmd:
                cmd = icfg.get("Cmd") or []
        elif not cmd:
            cmd = []
        args = list(entrypoint or []) + list(cmd or [])
        if not args:
            raise EngineError(400, "No command specified")
        try:  # a malformed -p is the caller's error, found now rather than at start
            requested_ports(host.get("PortBindings"), body.get("ExposedPorts") or {}, False)
        except PortError as exc:
            raise EngineError(400, str(exc)) from None
        cid = new_id()
        cname = self._unique_name(name)
        network_mode = host.get("NetworkMode") or "default"
        if network_mode == "default":
            network_mode = "bridge"
        host["NetworkMode"] = network_mode
        if network_mode not in ("none", "host") and not network_mode.startswith("container:"):
            try:
                self.networks.get(network_mode)
            except KeyError:
                raise not_found(f"network {network_mode} not found") from None
        labels = dict(icfg.get("Labels") or {})
        labels.update(body.get("Labels") or {})
        config = {
            "Hostname": body.get("Hostname") or (cid[:12] if network_mode != "host" else os.uname().nodename),
            "Domainname": body.get("Domainname") or "", "User": body.get("User") or icfg.get("User") or "",
            "AttachStdin": bool(body.get("AttachStdin")), "AttachStdout": bool(body.get("AttachStdout", True)),
            "AttachStderr": bool(body.get("AttachStderr", True)),
            "ExposedPorts": {**(icfg.get("ExposedPorts") or {}), **(body.get("ExposedPorts") or {})} or None,
            "Tty": bool(body.get("Tty")), "OpenStdin": bool(body.get("OpenStdin")),
            "StdinOnce": bool(body.get("StdinOnce")), "Env": [f"{k}={v}" for k, v in env.items()],
            "Cmd": cmd or None, "Image": image_ref,
            "Volumes": {**(icfg.get("Volumes") or {}), **(body.get("Volumes") or {})} or None,
            "WorkingDir": body.get("WorkingDir") or icfg.get("WorkingDir") or "",
            "Entrypoint": entrypoint or None, "OnBuild": None, "Labels": labels,
            "StopSignal": body.get("StopSignal") or icfg.get("StopSignal") or "SIGTERM",
            "StopTimeout": body.get("StopTimeout"),
        }
        try:
            runtime.rlimits(host.get("Ulimits"))  # refused now rather than at every start
        except ValueError as exc:
            raise EngineError(400, str(exc)) from None
        try:
            mounts = plan_mounts(host, config["Volumes"] or {}, self.volumes)
        except VolumeError as exc:
            raise EngineError(exc.status, exc.message) from exc
        root = self.root / "containers" / cid
        os.mkdir(root)  # (a new id: nothing is there)
        for d in ("upper", "work", "rootfs"):
            os.mkdir(root / d)
        if not any(os.path.lexists(low / ".dockerenv") for low in img.lower_dirs):
            # as dockerd: programs look for it to know they run in a container
            os.close(os.open(root / "upper/.dockerenv", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o755))
        record = {
            "Id": cid, "Created": utc_now(), "Path": args[0], "Args": args[1:],
            "State": {"Status": "created", "Running": False, "Paused": False, "Restarting": False,
                      "OOMKilled": False, "Dead": False, "Pid": 0, "ExitCode": 0, "Error": "",
                      "StartedAt": ZERO_TIME, "FinishedAt": ZERO_TIME},
            "Image": img.id, "ImageName": familiar(image_ref), "ResolvConfPath": str(root / "resolv.conf"),
            "HostnamePath": str(root / "hostname"), "HostsPath": str(root / "hosts"),
            "LogPath": str(root / f"{cid}-json.log"), "Name": "/" + cname, "RestartCount": 0,
            "Driver": "overlay2", "Platform": "linux", "MountLabel": "", "ProcessLabel": "", "AppArmorProfile": "",
            "ExecIDs": None, "HostConfig": host, "GraphDriver": {"Name": "overlay2", "Data": {
                "UpperDir": str(root / "upper"), "WorkDir": str(root / "work"), "MergedDir": str(root / "rootfs")}},
            "Mounts": mounts, "Config": config,
            "NetworkSettings": {"Bridge": "", "SandboxID": "", "HairpinMode": False, "Ports": {},
                                "SandboxKey": "", "IPAddress": "", "IPPrefixLen": 0, "Gateway": "", "MacAddress": "",
                                "Networks": self._initial_networks(body, network_mode)},
            "ManuallyStopped": False,
        }
        c = Container(root, record)
        c.save()
        with self.lock:
            self.containers[cid] = c
        self.events.emit("container", "create", cid, self.actor(c))
        return c

    def _initial_networks(self, body: dict[str, Any], mode: str) -> dict[str, Any]:
        if mode in ("none", "host"):
            return {mode: {"NetworkID": "", "EndpointID": "", "IPAddress": "", "Aliases": None}}
        endpoints = dict((body.get("NetworkingConfig") or {}).get("EndpointsConfig") or {})
        if "default" in endpoints:
            endpoints.setdefault("bridge", endpoints.pop("default"))
        nets = {mode: dict(endpoints.get(mode) or {})}
        for name, ep in endpoints.items():
            try:
                self.networks.get(name)
            except KeyError:
                raise not_found(f"network {name} not found") from None
            nets.setdefault(name, dict(ep or {}))
        return nets

    # --- start ------------------------------------------------------------------------
    def _mount_rootfs(self, c: Container) -> None:
        if os.path.ismount(c.rootfs):
            return
        lowers = self.store.lower_dirs(c.r["Image"])
        opts = f"lowerdir={':'.join(str(p) for p in lowers)},upperdir={c.root / 'upper'},workdir={c.root / 'work'}"
        try:
            runtime.mount("overlay", str(c.rootfs), "overlay", opts)
        except OSError as exc:
            raise EngineError(500, f"mounting the container file system failed: {exc.strerror}") from exc

    def _umount_rootfs(self, c: Container) -> None:
        path = c.rootfs
        if os.path.ismount(path):
            try:
                runtime.umount(str(path))
            except OSError as exc:
                if c.removed and not os.path.exists(path):
                    return  # moved to the trash meanwhile; _finish_removal unmounts it there
                log.warning("%s", exc)

    def _write_etc(self, c: Container, addresses: list[str]) -> None:
        cfg, host = c.r["Config"], c.r["HostConfig"]
        hostname = cfg["Hostname"]
        runtime.write_file(c.root / "hostname", f"{hostname}\n".encode())
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        for a in addresses:
            lines.append(f"{a}\t{hostname}")
        if host["NetworkMode"] != "none":  # as Docker Desktop: the host's loopback services
            lines.append(f"{HOST_GATEWAY}\thost.docker.internal")
        for entry in host.get("ExtraHosts") or []:
            name, _, addr = entry.partition(":")  # "name:address"; names have no colons
            if addr == "host-gateway":
                addr = HOST_GATEWAY
            lines.append(f"{addr}\t{name}")
        runtime.write_file(c.root / "hosts", ("\n".join(lines) + "\n").encode())
        dns = host.get("Dns") or []
        first = next(iter(c.r["NetworkSettings"]["Networks"]), "")
        user_net = None
        if host["NetworkMode"] not in ("host", "none") and first not in ("bridge", ""):
            with contextlib.suppress(KeyError):
                user_net = self.networks.get(first)
        options: list[str] = list(host.get("DnsOptions") or [])
        if user_net is not None:  # names resolve through our server, which forwards the rest
            resolv = f"nameserver {user_net.gateway}\n"
            options = options or ["ndots:0"]
        elif dns:
            resolv = "".join(f"nameserver {d}\n" for d in dns)
        else:
            resolv = "".join(f"nameserver {d}\n" for d in resolv_conf_servers()) or "nameserver 10.0.2.3\n"
        if host.get("DnsSearch"):
            resolv += "search " + " ".join(host["DnsSearch"]) + "\n"
        if options:
            resolv += "options " + " ".join(options) + "\n"
        runtime.write_file(c.root / "resolv.conf", resolv.encode())

    def _setup_network(self, c: Container) -> tuple[str | None, Network | None]:
        """The container's namespace path and, when it took over a spare namespace, the
        network that needs a new spare."""
        mode = c.r["HostConfig"]["NetworkMode"]
        if mode == "host":
            return "host", None
        settings = c.r["NetworkSettings"]
        wanted = [] if mode == "none" else list(settings["Networks"].items())
        leases = []
        taken = refill = None
        for i, (name, ep) in enumerate(wanted):
            net = self.networks.get(name)
            fixed = _fixed_address(ep)
            if i == 0 and not fixed:  # the spare namespace with this network's next address
                taken = self.networks.take_spare(net, c.id)
                refill = net
            leases.append((net, taken[1]["IPAddress"] if i == 0 and taken else self.networks.allocate(net, c.id, fixed)))
        path, first = taken or self.networks.create_netns(c.id, leases[0] if leases else None)
        for i, ((name, ep), (net, addr)) in enumerate(zip(wanted, leases)):
            info = first if i == 0 and first is not None else self.networks.attach(net, c.id, addr, f"eth{i}")
            ep.update(info, EndpointID=new_id(), Gateway=info["Gateway"], IPPrefixLen=info["IPPrefixLen"])
            if net.user_defined:
                aliases = list(ep.get("Aliases") or [])
                for a in (c.name, c.id[:12]):
                    if a not in aliases:
                        aliases.append(a)
                ep["Aliases"] = aliases
            if i == 0:
                settings.update(IPAddress=addr, IPPrefixLen=info["IPPrefixLen"], Gateway=info["Gateway"],
                                MacAddress=info["MacAddress"], SandboxKey=path)
                if not net.user_defined:
                    settings["Bridge"] = net.bridge
        return path, refill

    def _publish_ports(self, c: Container) -> None:
        """Host ports for ``-p``/``-P`` (before the process starts: a taken port fails the start)."""
        host = c.r["HostConfig"]
        if host["NetworkMode"] in ("host", "none") or host["NetworkMode"].startswith("container:"):
            return
        wanted = requested_ports(host.get("PortBindings"), c.r["Config"].get("ExposedPorts") or {},
                                 bool(host.get("PublishAllPorts")))
        try:
            self.ports.publish(c.id, c.r["NetworkSettings"].get("IPAddress") or "", wanted)
        except PortError as exc:
            raise EngineError(500, f"driver failed programming external connectivity on endpoint "
                                   f"{c.name} ({c.id}): {exc}") from exc

    def _teardown_network(self, c: Container) -> None:
        self.ports.unpublish(c.id)
        self.networks.delete_netns(c.id)
        self.networks.release(c.id)
        _clear_endpoints(c)

    def _spec(self, c: Container, netns: str | None) -> runtime.ContainerSpec:
        cfg, host = c.r["Config"], c.r["HostConfig"]
        user = cfg.get("User") or ""
        uid = gid = 0
        extra: tuple[int, ...] = ()
        try:
            if user:
                uid, gid, extra = lookup_user(c.rootfs, user)
            extra += lookup_groups(c.rootfs, list(host.get("GroupAdd") or []))
        except KeyError as exc:
            raise EngineError(400, str(exc).strip("'\"")) from exc
        secopt = security_options(host.get("SecurityOpt"))
        sysctls = dict(host.get("Sysctls") or {})
        mode = host.get("NetworkMode") or ""
        if mode != "host" and not mode.startswith("container:"):  # a network namespace of its own
            sysctls = {**NET_SYSCTLS, **sysctls}
        args = [c.r["Path"], *c.r["Args"]]
        mounts = [runtime.Mount(p, str(c.root / f), options=("rbind", "rprivate"))
                  for p, f in (("/etc/hosts", "hosts"), ("/etc/hostname", "hostname"), ("/etc/resolv.conf", "resolv.conf"))]
        if host.get("Init"):
            mounts.append(runtime.Mount("/sbin/docker-init", INIT_BINARY, options=("bind", "ro")))
            args = ["/sbin/docker-init", "--", *args]
        mounts += self._bind_mounts(c)
        memory = host.get("Memory") or None
        swap = host.get("MemorySwap")
        return runtime.ContainerSpec(
            id=c.id, rootfs=str(c.rootfs),
            process=runtime.ProcessSpec(args=tuple(args), env=tuple(cfg.get("Env") or ()), cwd=cfg.get("WorkingDir") or "/",
                                        uid=uid, gid=gid, additional_gids=_with_primary(gid, extra), terminal=c.tty,
                                        console_size=console_size(host.get("ConsoleSize")) if c.tty else None,
                                        rlimits=runtime.rlimits(host.get("Ulimits"))),
            hostname=cfg["Hostname"], mounts=tuple(mounts),
            resources=runtime.Resources(memory=memory, memory_swap=(swap if swap and swap > 0 else (memory if memory and swap in (None, 0) else None)),
                                        nano_cpus=host.get("NanoCpus") or None, cpu_shares=host.get("CpuShares") or None,
                                        pids_limit=host.get("PidsLimit") or None),
            readonly_rootfs=bool(host.get("ReadonlyRootfs")), netns=netns, privileged=bool(host.get("Privileged")),
            cap_add=tuple(host.get("CapAdd") or ()), cap_drop=tuple(host.get("CapDrop") or ()),
            sysctls=tuple(sysctls.items()),
            shm_size=host.get("ShmSize") or 64 * 1024 * 1024,
            seccomp=secopt.seccomp and not host.get("Privileged"), no_new_privileges=secopt.no_new_privileges,
            seccomp_bpf=None if host.get("Privileged") else seccomp.program(tuple(host.get("CapAdd") or ())),
        )

    def running_binds(self) -> list[str]:
        """The bind-mount sources of running containers (agent/hostchanges.py watches them)."""
        return [rec["Source"] for c in list(self.containers.values()) if c.running
                for rec in c.r.get("Mounts") or [] if rec.get("Type") == "bind" and rec.get("Source")]

    def _bind_mounts(self, c: Container) -> list[runtime.Mount]:
        """Binds, volumes and tmpfs mounts, from the plan made at create (agent/volumes.py)."""
        mounts: list[runtime.Mount] = []
        for rec in sorted(c.r.get("Mounts") or [], key=lambda r: r["Destination"].count("/")):
            ro = ("ro",) if not rec.get("RW", True) else ()
            dst = rec["Destination"]
            if rec["Type"] == "tmpfs":
                mounts.append(runtime.Mount(dst, "tmpfs", type="tmpfs", options=tuple(rec["Mode"].split(",")) + ro))
                continue
            if rec["Type"] == "volume":
                if not self.volumes.exists(rec["Name"]):
                    raise EngineError(404, f"volume {rec['Name']} not found (removed while {c.name} was stopped?)")
                if "nocopy" not in rec.get("Mode", ""):
                    try:
                        self.volumes.fill_from(rec["Name"], resolve_in_root(c.rootfs, dst))
                    except VolumeError as exc:
                        raise EngineError(exc.status, exc.message) from exc
                src = str(self.volumes.data(rec["Name"]))
            else:
                src = rec["Source"]
                if not os.path.exists(src):
                    raise EngineError(400, f"bind source path does not exist: {src} (is its folder still shared "
                                           "with the VM? see `pydesk vm start --share`)")
            mounts.append(runtime.Mount(dst, src, options=("rbind", "rprivate") + ro))
        for dst, spec in (c.r["HostConfig"].get("Tmpfs") or {}).items():  # --tmpfs: not among the Mounts records
            opts, read_only = tmpfs_options(spec or "")
            mounts.append(runtime.Mount(os.path.normpath(dst), "tmpfs", type="tmpfs",
                                        options=opts + (("ro",) if read_only else ())))
        mounts.sort(key=lambda m: m.destination.count("/"))  # parents first (a stable sort)
        return mounts

    def _top_up_spares(self, net: Network) -> None:
        """After a start that took one of ``net``'s spare namespaces (or found none): one more
        made at once if it took the last, so the next start need not make its own; the rest
        once the engine is quiet, so the starts of a burst do not pay for each other's (a
        namespace costs ~50 ms of CPU). The quiet moment's filling stops when a request comes."""
        if not self.networks.spare_count(net):
            self.networks.refill(net, 1)
        self.housekeeper.defer(f"spares-{net.id}", lambda: self.networks.refill(net, SPARES, self.housekeeper.is_quiet),
                               "spare namespaces")

    def _top_up_launches(self) -> None:
        """After a start: cruns started ahead for the next starts
        (agent/launcher.py), once the engine is quiet. Not at once when a start took the last:
        a crun started then would run its ~45 ms of start-up beside the rest of this run (the
        exit, and the next requests), while a start that finds none overlaps its own crun's
        start-up with its preparation. (The benchmark's sustained loop read the same either
        way: 0.181 and 0.183 s.)"""
        self.housekeeper.defer("launches", lambda: self.launcher.fill(while_=self.housekeeper.is_quiet),
                               "cruns started ahead")

    def start(self, c: Container) -> None:
        self.housekeeper.expedite(c.id)  # the previous run's namespace and mount are gone first
        if any(_fixed_address(ep) for ep in c.r["NetworkSettings"]["Networks"].values()):
            self.housekeeper.expedite()  # an exited container may still hold that address
        c.cleaned.wait(CLEANUP_WAIT)
        go = _Go()
        try:
            self._start(c, go)
        finally:
            go.release()
        if go.ok:
            self._network_events(c, "connect")  # as dockerd: the endpoints, then the start
            self.events.emit("container", "start", c.id, self.actor(c))

    def _start(self, c: Container, go: _Go) -> None:
        with c.lock:
            if c.running:
                return
            if c.removed:
                raise not_found(f"No such container: {c.id}")
            if c.restart_timer:
                c.restart_timer.cancel()
                c.restart_timer = None
            c.stopping = False
            c.r["ManuallyStopped"] = False
            try:
                steps = _Steps()
                if c.logfile is None:
                    c.logfile = LogFile(c.log_path)
                # `crun run` in the foreground is the container's parent (our conmon): it reaps
                # everything in the container and exits with its status. It was started ahead
                # (agent/launcher.py) or is started now, and waits for its config
                # (runtime.ConfigPipe) while the rest is made ready.
                launch = self.launcher.take(tty=c.tty, stdin=bool(c.r["Config"].get("OpenStdin")))
                c.runtime_id = launch.id
                with launch:
                    proc = launch.proc
                    held = _HeldOutput(c.logfile.write)  # crun's own start error is not container output
                    proc.read_output(held.write)
                    # the reaper now: it acts on crun's exit once this start has gone through (`go`)
                    workers.spawn(self._reap, c, proc, go, name=f"reap-{c.id[:12]}")
                    steps("crun")
                    try:
                        self._mount_rootfs(c)
                        steps("mount")
                        netns, refill = self._setup_network(c)
                        steps("network")
                        self._publish_ports(c)
                        steps("ports")
                        addrs = [ep.get("IPAddress") for ep in c.r["NetworkSettings"]["Networks"].values()
                                 if ep.get("IPAddress")]
                        self._write_etc(c, addrs)
                        data = runtime.bundle_config(self._spec(c, netns))
                        steps("bundle")
                        runtime.prepare_cgroup(c.id)
                        steps("cgroup")
                        launch.config.serve(data, keep=c.root / "config.json")  # crun goes on
                        try:
                            proc.connect()
                        except runtime.RuntimeError_ as exc:  # (a terminal): crun may have said why
                            error = _crun_error(launch.crun_log) if proc.proc.poll() is not None else ""
                            if not error:
                                raise
                            raise _crun_refused(error) from exc
                    except BaseException:
                        proc.kill()
                        raise
                    pid = launch.pid_fifo.wait(proc.proc, timeout=60)
                # no pid: crun failed before the container ran (its reaper may be reaping it)
                rc = proc.proc.poll() if pid else exit_status(proc.proc)
                steps("running")
                if refill is not None:  # not earlier, where it would compete with crun
                    self._top_up_spares(refill)
                self._top_up_launches()
                log.info("started %s: %s", c.name, steps)
                error = _crun_error(launch.crun_log) if rc not in (None, 0) else ""
                if error:  # crun could not create or start it; a quick normal exit is not an error
                    proc.drain(1)
                    held.release(drop=error)
                    raise _crun_refused(error)
                held.release()
                pid = pid or int((runtime.state(c.runtime_id) or {}).get("pid") or 0)
            except EngineError as exc:
                self._start_failed(c, exc.message)
                raise
            except (OSError, NetworkError, runtime.RuntimeError_, StoreError, ValueError, KeyError) as exc:
                self._start_failed(c, str(exc))
                raise EngineError(500, str(exc)) from exc
            self.procs[c.id] = proc
            c.state.update(Status="running", Running=True, Paused=False, Restarting=False, OOMKilled=False,
                           Dead=False, Pid=pid, ExitCode=0, Error="", StartedAt=utc_now())
            c.save()
            go.ok = True

    def _start_failed(self, c: Container, message: str) -> None:
        runtime.delete(c.runtime_id)
        self.launcher.release(c.runtime_id)
        runtime.release_cgroup(c.id)
        self._teardown_network(c)
        self._umount_rootfs(c)
        code = _start_status(message)
        c.state.update(Status="created" if c.state.get("StartedAt") == ZERO_TIME else "exited", Running=False,
                       Pid=0, Error=message, ExitCode=127 if code == 400 and "not found" in message else 128)
        c.save()
        if c.r["HostConfig"].get("AutoRemove"):  # as Docker: a --rm container that cannot start is removed
            threading.Thread(target=self.remove, args=(c,), kwargs={"force": True}, daemon=True).start()

    def _reap(self, c: Container, proc: Process, go: _Go) -> None:
        rc = proc.proc.wait()
        if not go.wait():
            return  # crun failed, or the start did: the start has cleaned up
        steps = _Steps()
        code = 128 - rc if rc < 0 else rc  # crun reports a signal death as 128+N already
        proc.drain(5)
        oom = runtime.oom_killed(c.id)
        self.ports.unpublish(c.id)  # the host ports are closed before anyone hears of the exit
        steps("drain")
        with c.lock:
            self.procs.pop(c.id, None)
            c.cleaned.clear()
            c.state.update(Status="exited", Running=False, Paused=False, Pid=0, ExitCode=code, OOMKilled=oom,
                           FinishedAt=utc_now())
            if c.logfile is not None:  # after the state: its close wakes `logs -f`, which must see the exit
                c.logfile.close()
                c.logfile = None
            _clear_endpoints(c)  # as Docker: an exited container has no addresses
            c.exit_seq += 1
            c.exited.notify_all()  # `wait` answers as soon as the lock is free: before the record is written
        with c.lock:
            c.save()  # (a crash before this is a crash while running, which start-up records as such)
        steps("state")
        if oom:
            self.events.emit("container", "oom", c.id, self.actor(c))
        self.events.emit("container", "die", c.id, self.actor(c, exitCode=str(code)))
        self._network_events(c, "disconnect")
        if c.r["HostConfig"].get("AutoRemove"):  # (never with a restart policy): gone before the clean-up
            with contextlib.suppress(EngineError):
                self.remove(c, force=True)
        # `wait` has its answer. What is left (the network namespace, crun's state, the cgroup,
        # the rootfs mount) waits for a quiet moment, unless a restart follows it; start, cp,
        # rmi and network rm have it done first (Housekeeper.expedite).
        policy = (c.r["HostConfig"].get("RestartPolicy") or {}).get("Name") or "no"
        log.info("exited %s (%d): %s", c.name, code, steps)
        if policy == "no" or c.removed or c.stopping:
            self.housekeeper.defer(c.id, lambda: self._settle(c), "clean-up")
            return
        self._exit_cleanup(c)
        self._maybe_restart(c, code)

    def _exit_cleanup(self, c: Container) -> None:
        """What a container's exit leaves behind: its network namespace and addresses, crun's
        state, its cgroup, its rootfs mount. Done once per exit, by whoever comes first."""
        with c.cleanup_lock:
            if c.cleaned.is_set():
                return
            steps = _Steps()
            try:
                with c.lock:
                    self._teardown_network(c)
                steps("network")
                runtime.delete(c.runtime_id)
                self.launcher.release(c.runtime_id)
                runtime.release_cgroup(c.id)
                steps("cgroup")
                self._umount_rootfs(c)  # not under the lock: start and cp wait for `cleaned` instead
                steps("umount")
                with c.lock:
                    c.save()
            finally:
                c.cleaned.set()
            log.debug("cleaned up after %s: %s", c.name, steps)

    def _settle(self, c: Container) -> None:
        """The housekeeper's task for a container: its exit clean-up, and once it is removed,
        the removal of its tree."""
        self._exit_cleanup(c)
        if c.removed:
            self._finish_removal(c)

    def _maybe_restart(self, c: Container, code: int) -> bool:
        if c.stopping or c.removed:
            return False
        policy = c.r["HostConfig"].get("RestartPolicy") or {}
        name = policy.get("Name") or "no"
        maximum = int(policy.get("MaximumRetryCount") or 0)
        if name == "no" or (name == "on-failure" and (code == 0 or (maximum and c.r["RestartCount"] >= maximum))):
            return False
        if name not in ("always", "unless-stopped", "on-failure"):
            return False
        c.r["RestartCount"] += 1
        delay = min(0.1 * (2 ** min(c.r["RestartCount"] - 1, 10)), 60.0)
        c.state.update(Restarting=True, Status="restarting")
        c.save()

        def again() -> None:
            c.restart_timer = None
            if c.stopping or c.removed:
                return
            try:
                self.start(c)
            except EngineError as exc:
                log.error("restarting %s failed: %s", c.name, exc.message)
                c.state.update(Restarting=False, Status="exited")
                c.save()

        c.restart_timer = threading.Timer(delay, again)
        c.restart_timer.daemon = True
        c.restart_timer.start()
        return True

    # --- stop, kill, wait -----------------------------------------------------------
    def _wait_exit(self, c: Container, seq: int, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with c.lock:
            while c.exit_seq == seq and c.running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                c.exited.wait(remaining)
        return True

    def stop(self, c: Container, timeout: int | None = None, signal_name: str | None = None) -> bool:
        """False if the container was not running (Docker answers 304)."""
        with c.lock:
            c.stopping = True
            c.r["ManuallyStopped"] = True
            if c.restart_timer:
                c.restart_timer.cancel()
                c.restart_timer = None
                c.state.update(Restarting=False, Status="exited")
                c.save()
            if not c.running:
                c.save()
                return False
            seq = c.exit_seq
            if c.state.get("Paused"):
                runtime.crun("resume", c.runtime_id, check=False)
        if timeout is None:
            timeout = c.r["Config"].get("StopTimeout")
        if timeout is None:
            timeout = 10
        sig = parse_signal(signal_name or c.r["Config"].get("StopSignal"), signal.SIGTERM)
        runtime.kill(c.runtime_id, str(sig))
        if timeout < 0 or not self._wait_exit(c, seq, float(timeout) if timeout >= 0 else None):
            runtime.kill(c.runtime_id, "KILL", all_processes=True)
            self._wait_exit(c, seq, 30)
        self.events.emit("container", "stop", c.id, self.actor(c))
        return True

    def kill(self, c: Container, signal_name: str | None = None) -> None:
        with c.lock:
            if not c.running:
                raise EngineError(409, f"Cannot kill container: {c.id}: Container {c.id} is not running")
        try:
            sig = parse_signal(signal_name, signal.SIGKILL)
        except ValueError as exc:
            raise EngineError(400, str(exc)) from exc
        if sig == signal.SIGKILL:
            c.stopping = True  # docker kill is a manual stop for restart policies
        runtime.kill(c.runtime_id, str(sig), all_processes=sig == signal.SIGKILL)
        self.events.emit("container", "kill", c.id, self.actor(c, signal=str(sig)))

    def restart(self, c: Container, timeout: int | None = None) -> None:
        self.stop(c, timeout)
        self.start(c)
        self.events.emit("container", "restart", c.id, self.actor(c))

    def wait(self, c: Container, condition: str = "not-running", seq: int | None = None) -> int:
        """Block until ``condition``; ``seq`` is the exit count seen when the wait was asked
        for (so an exit between the request and this call is not missed)."""
        with c.lock:
            if condition == "next-exit":
                seq = c.exit_seq if seq is None else seq
                while c.exit_seq == seq and not c.removed:
                    c.exited.wait(1)
            elif condition == "removed":
                while not c.removed:
                    c.exited.wait(1)
            else:
                while (c.running or c.state.get("Restarting")) and not c.removed:
                    c.exited.wait(1)
            return int(c.state.get("ExitCode") or 0)

    def pause(self, c: Container, resume: bool = False) -> None:
        if not c.running:
            raise EngineError(409, f"Container {c.id} is not running")
        runtime.crun("resume" if resume else "pause", c.runtime_id)
        c.state.update(Paused=not resume, Status="running" if resume else "paused")
        c.save()
        self.events.emit("container", "unpause" if resume else "pause", c.id, self.actor(c))

    def remove(self, c: Container, force: bool = False, volumes: bool = False) -> None:
        with c.lock:
            if c.running:
                if not force:
                    raise EngineError(409, f"You cannot remove a running container {c.id}. Stop the container before "
                                           "attempting removal or force remove")
                c.stopping = True
        if c.running:
            seq = c.exit_seq
            runtime.kill(c.runtime_id, "KILL", all_processes=True)
            self._wait_exit(c, seq, 30)
        with c.lock:
            if c.removed:
                return
            if c.restart_timer:
                c.restart_timer.cancel()
            c.removed = True
            # Gone from every list now. Its exit clean-up, if not done yet, and the deletion of
            # its tree follow at a quiet moment (a `network rm` has them done first), with the
            # container's directory already out of containers/.
            if c.cleaned.is_set():
                self._teardown_network(c)  # (a container that never ran: nothing to wait for)
            with self.lock:
                self.containers.pop(c.id, None)
                self.removing[c.id] = c
            RECORDS.drop(c.root)  # a record still waiting to be written is moot now
            c.root = self._to_trash(c.root)
            c.exited.notify_all()
        self.housekeeper.defer(c.id, lambda: self._settle(c), "removal")
        self.events.emit("container", "destroy", c.id, self.actor(c))
        if volumes or c.r["HostConfig"].get("AutoRemove"):
            self._remove_anonymous_volumes(c)

    def _to_trash(self, path: Path) -> Path:
        """Move a container's directory into trash/ (one rename: it is no longer loaded at
        the next start, and what deletes it may take its time), or leave it where it is."""
        trash = self.root / "trash"
        try:
            trash.mkdir(exist_ok=True)
            gone = trash / f"{path.name}-{secrets.token_hex(4)}"
            os.rename(path, gone)
        except OSError as exc:
            log.warning("could not move %s to the trash: %s", path, exc)
            return path
        return gone

    def _empty_trash(self) -> None:
        for entry in (self.root / "trash").iterdir():
            if os.path.ismount(entry / "rootfs"):  # an engine restart while the VM ran
                with contextlib.suppress(OSError):
                    runtime.umount(str(entry / "rootfs"))
            shutil.rmtree(entry, ignore_errors=True)

    def _finish_removal(self, c: Container) -> None:
        """After the exit clean-up: unmount the removed container's rootfs, delete its tree."""
        try:
            self._umount_rootfs(c)
            shutil.rmtree(c.root, ignore_errors=True)
        finally:
            with self.lock:
                self.removing.pop(c.id, None)
            c.gone.set()

    @contextlib.contextmanager
    def container_root(self, c: Container, own_view: bool = True):  # type: ignore[no-untyped-def]
        """A directory fd of the container's root: for `cp`, the running container's own
        view (/proc/PID/root, with its mounts); without ``own_view`` (`export`) and for a
        stopped container, its overlay as the engine mounts it (no volumes, no /proc),
        mounted for the while if it is not."""
        pid = int(c.state.get("Pid") or 0) if c.running and own_view else 0
        if pid:
            try:
                fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise EngineError(409, f"container {c.name} is not running any more") from exc
            try:
                yield fd
            finally:
                os.close(fd)
            return
        self.housekeeper.expedite(c.id)  # not while the exit clean-up unmounts it
        c.cleaned.wait(CLEANUP_WAIT)
        with c.lock:
            if c.removed:
                raise not_found(f"No such container: {c.id}")
            mounted_here = not os.path.ismount(c.rootfs)
            self._mount_rootfs(c)
            fd = os.open(c.rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                yield fd
            finally:
                os.close(fd)
                if mounted_here and not c.running:
                    self._umount_rootfs(c)

    def volume_users(self, name: str) -> list[str]:
        with self.lock:
            return [c.id for c in self.containers.values()
                    if any(m.get("Name") == name for m in c.r.get("Mounts") or [])]

    def _remove_anonymous_volumes(self, c: Container) -> None:
        for rec in c.r.get("Mounts") or []:
            name = rec.get("Name")
            if rec.get("Type") == "volume" and name and self.volumes.is_anonymous(name) and not self.volume_users(name):
                try:
                    self.volumes.remove(name, [])
                except (VolumeError, OSError) as exc:
                    log.warning("cannot remove anonymous volume %s: %s", name, exc)
                    continue
                self.events.emit("volume", "destroy", name, {"driver": "local"})

    def _network_events(self, c: Container, action: str) -> None:
        """``network connect``/``disconnect`` for each of a container's networks, as dockerd
        reports its endpoints coming and going with the container's start and exit."""
        for name in list(c.r["NetworkSettings"]["Networks"]):
            try:
                net = self.networks.get(name)
            except KeyError:
                continue  # host, none, container:…
            self.network_event(action, net, c)

    def network_event(self, action: str, net: Network, c: Container | None = None) -> None:
        """A network's event, with the attributes dockerd gives it (the container, if any)."""
        self.events.emit("network", action, net.id,
                         {**({"container": c.id} if c is not None else {}), "name": net.name, "type": "bridge"})

    def connect(self, c: Container, net: Network, endpoint: dict[str, Any]) -> None:
        """Attach a container to a network; a running one gets its interface right away."""
        if _fixed_address(endpoint or {}):
            self.housekeeper.expedite()  # an exited container may still hold that address
        with c.lock:
            nets = c.r["NetworkSettings"]["Networks"]
            mode = c.r["HostConfig"]["NetworkMode"]
            if mode in ("host", "none") or mode.startswith("container:"):
                raise EngineError(400, f"container cannot be connected to network {net.name}: "
                                       f"it uses network mode {mode}")
            if net.name in nets:
                raise EngineError(403, f"endpoint with name {c.name} already exists in network {net.name}")
            ep = dict(endpoint or {})
            if c.running:
                addr = self.networks.allocate(net, c.id, _fixed_address(ep))
                try:
                    info = self.networks.attach(net, c.id, addr, self.networks.free_ifname(c.id))
                except NetworkError as exc:
                    self.networks.release(c.id, net)
                    raise EngineError(500, str(exc)) from exc
                ep.update(info, EndpointID=new_id())
                if net.user_defined:
                    ep["Aliases"] = list(dict.fromkeys([*(ep.get("Aliases") or []), c.name, c.id[:12]]))
            nets[net.name] = ep
            c.save()
        self.network_event("connect", net, c)

    def disconnect(self, c: Container, net: Network) -> None:
        with c.lock:
            nets = c.r["NetworkSettings"]["Networks"]
            ep = nets.get(net.name)
            if ep is None:
                raise EngineError(403, f"container {c.id} is not connected to network {net.name}")
            if c.running and ep.get("IPAddress"):
                ifname = self.networks.interface_with(c.id, ep["IPAddress"])
                if ifname:
                    self.networks.detach(c.id, ifname)
                self.networks.release(c.id, net)
            del nets[net.name]
            c.save()
        self.network_event("disconnect", net, c)

    def rename(self, c: Container, new: str) -> None:
        name = self._unique_name(new)
        c.r["Name"] = "/" + name
        c.save()
        self.events.emit("container", "rename", c.id, self.actor(c, name=name))

    def update(self, c: Container, body: dict[str, Any]) -> list[str]:
        """`docker update`: new limits in the record, and in the live cgroup when running."""
        host = c.r["HostConfig"]
        for key in ("Memory", "MemorySwap", "MemoryReservation", "NanoCpus", "CpuShares", "CpuQuota", "CpuPeriod",
                    "PidsLimit", "CpusetCpus", "CpusetMems", "BlkioWeight"):
            if key in body and body[key] not in (None, ""):
                host[key] = body[key]
        if body.get("RestartPolicy") and body["RestartPolicy"].get("Name") is not None:
            host["RestartPolicy"] = body["RestartPolicy"]
        if host.get("NanoCpus") and host.get("CpuQuota"):
            raise EngineError(400, "Conflicting options: Nano CPUs and CPU Period cannot both be set")
        warnings: list[str] = []
        if c.running:
            try:
                runtime.apply_limits(c.id, runtime.Resources(
                    memory=host.get("Memory") or None, memory_swap=host.get("MemorySwap") or None,
                    nano_cpus=host.get("NanoCpus") or None, cpu_shares=host.get("CpuShares") or None,
                    pids_limit=host.get("PidsLimit") or None), host.get("CpuQuota") or None, host.get("CpuPeriod") or None)
            except OSError as exc:
                raise EngineError(500, f"Cannot update container {c.id}: {exc}") from None
        c.save()
        self.events.emit("container", "update", c.id, self.actor(c))
        return warnings

    def changes(self, c: Container) -> list[dict[str, Any]]:
        """`docker diff`: the container's overlay upper dir against the image's layers
        (Kind 0 = changed, 1 = added, 2 = deleted)."""
        upper = c.root / "upper"
        lowers = self.store.lower_dirs(c.r["Image"])
        out: list[dict[str, Any]] = []
        for dirpath, dirs, files in os.walk(upper):
            for name in sorted(dirs) + sorted(files):
                full = Path(dirpath) / name
                rel = "/" + str(full.relative_to(upper))
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # an overlayfs whiteout
                    out.append({"Path": rel, "Kind": 2})
                    continue
                in_lower = any(os.path.lexists(str(low) + rel) for low in lowers)
                out.append({"Path": rel, "Kind": 0 if in_lower else 1})
        # mount points the engine adds (Docker keeps these in its hidden init layer)
        mounts = {"/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/dev", "/proc", "/sys", "/dev/shm", "/.dockerenv"}
        mounts.update(m.get("Destination", "") for m in c.r.get("Mounts") or [])
        out = [ch for ch in out if not (ch["Kind"] == 1 and ch["Path"] in mounts)]
        out.sort(key=lambda ch: ch["Path"])
        return out

    # --- exec -------------------------------------------------------------------------
    def exec_create(self, c: Container, config: dict[str, Any]) -> ExecInstance:
        if not c.running:
            raise EngineError(409, f"Container {c.id} is not running")
        if c.state.get("Paused"):
            raise EngineError(409, f"Container {c.name} is paused, unpause the container before exec")
        if not config.get("Cmd"):
            raise EngineError(400, "No exec command specified")
        console_size(config.get("ConsoleSize"))
        e = ExecInstance(c, config)
        with self.lock:
            self.execs[e.id] = e
        return e

    def exec_start(self, e: ExecInstance, on_output: Callable[[str, bytes], None],
                   size: tuple[int, int] | None = None) -> Process:
        """Start an exec; ``size`` is its terminal's (rows, columns) from the start request, else
        the one given when it was created."""
        c, cfg = e.container, e.config
        size = (size or console_size(cfg.get("ConsoleSize"))) if cfg.get("Tty") else None
        argv = [runtime.CRUN, "--root", runtime.CRUN_ROOT, "exec"]
        if cfg.get("Tty"):
            argv.append("--tty")
        # crun exec --env replaces the environment: pass the container's, then the exec's.
        env: dict[str, str] = {}
        for item in list(c.r["Config"].get("Env") or []) + list(cfg.get("Env") or []):
            k, _, v = item.partition("=")
            env[k] = v
        for k, v in env.items():
            argv += ["--env", f"{k}={v}"]
        if cfg.get("WorkingDir"):
            argv += ["--cwd", cfg["WorkingDir"]]
        user = cfg.get("User") or c.r["Config"].get("User")
        uid = gid = 0
        extra: tuple[int, ...] = ()
        try:
            if user:
                uid, gid, extra = lookup_user(c.rootfs, user)
                argv += ["--user", f"{uid}:{gid}"]
            extra += lookup_groups(c.rootfs, list(c.r["HostConfig"].get("GroupAdd") or []))  # as the container's
        except KeyError as exc:
            raise EngineError(400, str(exc).strip("'\"")) from exc
        process = self._exec_process(c, e, uid, gid, extra, size)
        if process is not None:  # the container's own process spec: its groups, caps, rlimits
            argv = [runtime.CRUN, "--root", runtime.CRUN_ROOT, "exec", "--process", str(process), c.runtime_id]
        else:
            argv += [c.runtime_id, *cfg["Cmd"]]
        tail = bytearray()

        def output(stream: str, data: bytes) -> None:
            if stream == "stderr" or cfg.get("Tty"):
                tail[:] = (bytes(tail) + data)[-512:]
            on_output(stream, data)

        proc = Process(argv, tty=bool(cfg.get("Tty")), stdin=bool(cfg.get("AttachStdin")), console_dir=c.root,
                       on_output=output)
        if size and process is None:  # no process spec to carry it: as soon as the terminal is ours
            with contextlib.suppress(OSError):
                proc.resize(*size)
        e.process = proc
        e.running = True
        e.pid = proc.proc.pid
        self.events.emit("container", "exec_start", c.id, self.actor(c, execID=e.id))

        def waiter() -> None:
            rc = proc.proc.wait()
            proc.drain(5)
            (c.root / f"exec-{e.id}.json").unlink(missing_ok=True)
            if rc == 255:  # crun could not start the process: dockerd's exec then says 126, whatever the cause
                text = bytes(tail).decode(errors="replace").lower()
                if ("executable file" in text and "not found" in text or "no such file" in text
                        or "permission denied" in text or "operation not permitted" in text):
                    rc = 126
            e.exit_code = rc
            e.running = False
            e.done.set()
            self.events.emit("container", "exec_die", c.id, self.actor(c, execID=e.id, exitCode=str(rc)))

        workers.spawn(waiter, name=f"exec-{e.id[:12]}")
        return proc

    def _exec_process(self, c: Container, e: ExecInstance, uid: int, gid: int, extra: tuple[int, ...],
                      size: tuple[int, int] | None) -> Path | None:
        """An OCI process for `crun exec --process`, from the container's config.json: the
        same capabilities, rlimits and no_new_privs as the container, and the supplementary
        groups Docker gives (crun's --user takes none)."""
        cfg = e.config
        try:
            spec = json.loads((c.root / "config.json").read_text())["process"]
        except (OSError, ValueError, KeyError):
            return None
        env: dict[str, str] = {}
        for item in list(c.r["Config"].get("Env") or []) + list(cfg.get("Env") or []):
            k, _, v = item.partition("=")
            env[k] = v
        env.setdefault("PATH", runtime.DEFAULT_PATH)
        spec.update(args=list(cfg["Cmd"]), env=[f"{k}={v}" for k, v in env.items()], terminal=bool(cfg.get("Tty")),
                    cwd=cfg.get("WorkingDir") or c.r["Config"].get("WorkingDir") or "/",
                    user={"uid": uid, "gid": gid, "additionalGids": list(_with_primary(gid, extra))})
        spec.pop("consoleSize", None)
        if size:
            spec["consoleSize"] = {"height": size[0], "width": size[1]}
        path = c.root / f"exec-{e.id}.json"
        path.write_text(json.dumps(spec))
        return path

    @staticmethod
    def actor(c: Container, **extra: str) -> dict[str, str]:
        """A container event's attributes, as Docker's: its labels, its image as given, its
        name (what `events --filter label=|image=|container=` look at)."""
        cfg = c.r["Config"]
        return {**(cfg.get("Labels") or {}), "image": cfg.get("Image") or "", "name": c.name, **extra}

    # --- inspection ---------------------------------------------------------------------
    def inspect(self, c: Container) -> dict[str, Any]:
        """The record as `inspect` shows it: a shallow copy that shares the record's inner parts,
        for the caller to serialise at once (json's C encoder runs without letting another
        thread in). A deep copy through json was two more passes over it, ~1.4 ms a request
        in this emulated guest, twice per docker-py `run`."""
        r = dict(c.r)  # (one C call: no other thread changes it half-way)
        r.pop("ManuallyStopped", None)
        r["RestartCount"] = c.r.get("RestartCount", 0)
        r["ExecIDs"] = [e.id for e in self.execs.values() if e.container is c and e.running] or None
        r["NetworkSettings"] = {**c.r["NetworkSettings"], "Ports": self.port_map(c)}
        return r

    def port_map(self, c: Container) -> dict[str, Any]:
        """NetworkSettings.Ports: what is published now (empty when not running, as Docker)."""
        if not c.running:
            return {}
        ports: dict[str, Any] = {p: None for p in (c.r["Config"].get("ExposedPorts") or {})}
        ports.update(docker_port_map(self.ports.of(c.id)))
        return ports

    def summary(self, c: Container) -> dict[str, Any]:
        r = c.r
        nets = {k: {**v} for k, v in r["NetworkSettings"]["Networks"].items()}
        ports: list[dict[str, Any]] = []
        for key, binds in self.port_map(c).items():
            num, _, proto = key.partition("/")
            if not binds:
                ports.append({"PrivatePort": int(num), "Type": proto or "tcp"})
            for b in binds or []:
                ports.append({"IP": b["HostIp"], "PrivatePort": int(num), "PublicPort": int(b["HostPort"] or 0),
                              "Type": proto or "tcp"})
        return {
            "Id": c.id, "Names": [r["Name"]], "Image": r["Config"]["Image"], "ImageID": r["Image"],
            "Command": _command_text(r["Path"], r["Args"]), "Created": int(_epoch(r["Created"])),
            "Ports": ports, "Labels": r["Config"].get("Labels") or {}, "State": r["State"]["Status"],
            "Status": c.status_text(), "HostConfig": {"NetworkMode": r["HostConfig"].get("NetworkMode")},
            "NetworkSettings": {"Networks": nets}, "Mounts": r.get("Mounts") or [],
        }

    def list(self, all_: bool = False, flt: dict[str, list[str]] | None = None, limit: int = -1) -> list[dict[str, Any]]:
        out = []
        cs = sorted(self.containers.values(), key=lambda c: c.r["Created"], reverse=True)
        bounds = {}
        for key in ("before", "since"):  # a container name or id; Docker compares creation times
            if flt and flt.get(key):
                bounds[key] = self.container(flt[key][0]).r["Created"]
        for c in cs:
            if not all_ and not c.running and not (flt and "status" in flt):
                continue
            if "before" in bounds and not c.r["Created"] < bounds["before"]:
                continue
            if "since" in bounds and not c.r["Created"] > bounds["since"]:
                continue
            if flt and not _match(c, flt):
                continue
            out.append(self.summary(c))
        return out[:limit] if limit and limit > 0 else out

    def top(self, c: Container, ps_args: str = "") -> dict[str, Any]:
        if not c.running:
            raise EngineError(409, f"Container {c.id} is not running")
        procs_path = runtime.cgroup_dir(c.id) / "cgroup.procs"
        try:
            pids = {int(p) for p in procs_path.read_text().split()}
        except OSError:
            pids = set()
        try:
            return top.processes(pids, ps_args)
        except top.TopError as exc:
            raise EngineError(500, str(exc)) from None

    def stats(self, c: Container, pre: dict[str, Any] | None = None) -> dict[str, Any]:
        """One stats sample; ``pre`` is the one before it (its CPU figures become
        ``precpu_stats``, from which clients work out the CPU percentage)."""
        cg = runtime.cgroup_dir(c.id)
        cpus = os.cpu_count() or 1
        machine = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
        running = c.running
        return {
            "read": utc_now(), "preread": pre["read"] if pre else ZERO_TIME, "id": c.id, "name": c.r["Name"],
            "num_procs": 0,
            "pids_stats": stats.pids_stats(cg) if running else {},
            "cpu_stats": stats.cpu_stats(cg, cpus) if running else {"cpu_usage": {"total_usage": 0}},
            "precpu_stats": pre["cpu_stats"] if pre else {"cpu_usage": {"total_usage": 0}, "throttling_data": {}},
            "memory_stats": stats.memory_stats(cg, machine) if running else {},
            "networks": stats.networks(int(c.state.get("Pid") or 0)) if running else {},
            "blkio_stats": {"io_service_bytes_recursive": stats.blkio(cg) if running else None},
            "storage_stats": {},
        }


class _Go:
    """Whether a container start went through, for its reaper, which waits to hear it."""

    def __init__(self) -> None:
        self.ok = False
        self._done = threading.Event()

    def release(self) -> None:
        self._done.set()

    def wait(self) -> bool:
        self._done.wait()
        return self.ok


def _fixed_address(endpoint: dict[str, Any]) -> str | None:
    return (endpoint.get("IPAMConfig") or {}).get("IPv4Address")


def _clear_endpoints(c: Container) -> None:
    s = c.r["NetworkSettings"]
    s.update(IPAddress="", Gateway="", MacAddress="", SandboxKey="", IPPrefixLen=0)
    for ep in s["Networks"].values():
        ep.update(IPAddress="", Gateway="", MacAddress="", EndpointID="", IPPrefixLen=0)


class _Steps:
    """Durations of the steps of a container start, for the engine log."""

    def __init__(self) -> None:
        self.t = time.monotonic()
        self.parts: list[str] = []

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.parts.append(f"{name} {int((now - self.t) * 1000)}ms")
        self.t = now

    def __str__(self) -> str:
        return ", ".join(self.parts)


def _epoch(value: str) -> float:
    from agent.logs import parse_time

    try:
        return parse_time(value)
    except ValueError:
        return 0.0


def _match(c: Container, flt: dict[str, list[str]]) -> bool:
    for key, values in flt.items():
        if key == "name" and not any(v.lstrip("/") in c.name for v in values):
            return False
        if key == "id" and not any(c.id.startswith(v) for v in values):
            return False
        if key == "status" and c.state.get("Status") not in values:
            return False
        if key == "label" and not filters.labels_match(c.r["Config"].get("Labels"), values):
            return False
        if key == "isolation" and (c.r["HostConfig"].get("Isolation") or "") not in values:
            return False
        if key == "ancestor" and not any(c.r["Config"]["Image"] == v or c.r["Image"].endswith(v) for v in values):
            return False
        if key == "exited" and not (not c.running and str(c.state.get("ExitCode")) in values):
            return False
        if key == "network":
            nets = c.r["NetworkSettings"]["Networks"]
            ids = {ep.get("NetworkID") or "" for ep in nets.values()}
            if not any(v in nets or any(i and i.startswith(v) for i in ids) for v in values):
                return False
        if key == "volume":
            mounts = c.r.get("Mounts") or []
            if not any(m.get("Name") == v or m.get("Destination") == v or m.get("Source") == v
                       for m in mounts for v in values):
                return False
        if key == "health" and "none" not in values:  # no health checks run yet: every container is "none"
            return False
        if key == "is-task" and "true" in values:
            return False
        if key in ("publish", "expose"):
            ports = set(c.r["Config"].get("ExposedPorts") or {}) | set(c.r["HostConfig"].get("PortBindings") or {})
            if key == "publish":
                ports = set(c.r["HostConfig"].get("PortBindings") or {})
            if not any(v in ports or f"{v}/tcp" in ports for v in values):
                return False
    return True


def _with_primary(gid: int, extra: tuple[int, ...]) -> tuple[int, ...]:
    """Supplementary groups as Docker (runc) sets them: the primary group, then the user's
    other groups from /etc/group (so `id` prints `groups=0(root)` as under Docker)."""
    return (gid, *(g for g in extra if g != gid))


def _command_text(path: str, args: list[str]) -> str:
    """`docker ps`'s COMMAND: arguments with spaces single-quoted, as dockerd builds it."""
    return " ".join([path, *(f"'{a}'" if " " in a else a for a in args)])


class _HeldOutput:
    """Container output held back until crun has either started the container or failed:
    on failure crun prints its error on the container's stderr too, and Docker clients get
    that error only once, from the API."""

    def __init__(self, sink: Callable[[str, bytes], None]) -> None:
        self.sink = sink
        self.lock = threading.Lock()
        self.held: list[tuple[str, bytes]] | None = []

    def write(self, stream: str, data: bytes) -> None:
        with self.lock:
            if self.held is not None:
                self.held.append((stream, data))
                return
            self.sink(stream, data)

    def release(self, drop: str = "") -> None:
        with self.lock:
            for stream, data in self.held or []:
                if not (drop and stream == "stderr" and drop.encode() in data):
                    self.sink(stream, data)
            self.held = None


def _crun_error(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    msg = lines[-1]
    with contextlib.suppress(ValueError, TypeError):
        msg = json.loads(msg).get("msg", msg)
    return msg


def docker_message(message: str) -> str:
    """crun's wording -> Docker's, which clients match on (exit codes 126/127)."""
    m = re.search(r"executable file `([^`]*)` not found in \$PATH", message)
    if m:
        return f'failed to create task for container: exec: "{m.group(1)}": executable file not found in $PATH: unknown'
    m = re.search(r"open executable: (?:Permission denied|Operation not permitted)", message, re.I)
    if m or "permission denied" in message.lower():
        return f"failed to create task for container: {re.sub('(?i)permission denied|operation not permitted', 'permission denied', message)}: unknown"
    if "No such file or directory" in message:
        return f"failed to create task for container: {message.replace('No such file or directory', 'no such file or directory')}: unknown"
    return message


def _crun_refused(error: str) -> EngineError:
    """crun's reason for not starting a container, as Docker answers it."""
    message = docker_message(error)
    return EngineError(_start_status(message), message)


def console_size(value: Any) -> tuple[int, int] | None:
    """Docker's ConsoleSize, ``[rows, columns]`` (API 1.42): the size a container's or an
    exec's terminal has when its process starts, so that a program that looks at once (an
    editor, ``stty size``) sees it; a resize after the start comes too late for that. Absent
    or a zero in it: none."""
    if value is None or value == []:
        return None
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and 0 <= v <= 0xFFFF for v in value)):
        raise EngineError(400, f"invalid ConsoleSize {json.dumps(value)}: want [height, width]")
    rows, cols = value
    return (rows, cols) if rows and cols else None


def _start_status(message: str) -> int:
    """Docker answers 400 for errors the user caused (a missing executable...)."""
    m = message.lower()
    if "not found" in m or "no such file" in m or "permission denied" in m or "executable" in m:
        return 400
    return 500


def image_in_use_error(exc: ImageInUse) -> EngineError:
    return EngineError(409, str(exc))
