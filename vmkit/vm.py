"""One pydesk VM: settings + image + accelerator -> a running QEMU with a reachable agent.

The daemon owns exactly one ``VM``; nothing else starts or stops QEMU.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vmkit.accel import AccelChoice
from vmkit.agent import AgentChannel
from vmkit.errors import AgentError, LaunchError
from vmkit.host import Host
from vmkit.keys import ensure_keys
from vmkit.paths import VMPaths
from vmkit.ports import ForwardTable, PortPublisher
from vmkit.qemu import QemuProcess, create_data_disk
from vmkit.settings import Settings, parse_host_service
from vmkit.spec import GuestImage, RuntimeFiles, VMSpec
from vmkit.transport import pump, qemu_endpoint

log = logging.getLogger(__name__)

#: How long a boot may take to reach "agent ready". Under TCG on a loaded 2-core machine a
#: boot takes seconds; the deadline only guards against a guest that will never answer.
READY_TIMEOUT = 180.0

Progress = Callable[[str], None]


def build_spec(name: str, settings: Settings, image: GuestImage, choice: AccelChoice, paths: VMPaths) -> VMSpec:
    files = RuntimeFiles(
        qmp=qemu_endpoint(paths.qmp),
        agent=qemu_endpoint(paths.agent),
        console_log=paths.console_log,
        data_disk=paths.data_disk,
        host_key=paths.host_key,
        authorized_keys=paths.authorized_keys,
        guest_config=paths.guest_config,
        pidfile=paths.pidfile,
    )
    return VMSpec(
        name=name, arch=image.arch, cpus=settings.cpus, memory_mib=settings.memory_mib,
        disk_gib=settings.disk_gib, accel=choice.accel, image=image, files=files,
        shares=settings.shares, ports=settings.ports, restrict_network=settings.restrict_network,
        dns=settings.dns, host_services=tuple(parse_host_service(s) for s in settings.host_services),
    )


def guest_config(settings: Settings) -> str:
    """The settings the guest reads (fw_cfg opt/org.pydesk/config), one key=value a line."""
    lines = [f"dns={d}" for d in settings.dns[:3]]  # resolv.conf reads at most three
    lines += [f"host-service={parse_host_service(s)[0]}" for s in settings.host_services]
    lines += [f"mirror={m}" for m in settings.registry_mirrors]
    lines += [f"insecure={r}" for r in settings.insecure_registries]
    if settings.mirror_only:
        lines.append("mirror-only=1")
    return "".join(line + "\n" for line in lines) or "# no overrides\n"


class VM:
    def __init__(self, spec: VMSpec, host: Host, paths: VMPaths, choice: AccelChoice, config: str = "") -> None:
        self.spec = spec
        self.config = config
        self.host = host
        self.paths = paths
        self.choice = choice
        self.qemu = QemuProcess(spec, host, paths.qemu_log)
        self.agent: AgentChannel | None = None
        self.publisher: PortPublisher | None = None
        self.release: dict[str, Any] = {}
        self.started_at: float | None = None
        self.ready_seconds: float | None = None

    def _prepare(self, progress: Progress) -> None:
        self.paths.ensure()
        ensure_keys(self.paths)
        if create_data_disk(self.host, self.paths.data_disk, self.spec.disk_gib):
            progress(f"created a {self.spec.disk_gib} GiB data disk")
        self.paths.guest_config.write_text(self.config or "# no overrides\n")

    def start(self, progress: Progress) -> None:
        self._prepare(progress)
        progress(f"booting the guest ({self.spec.accel}, {self.spec.cpus} CPUs, {self.spec.memory_mib} MiB)")
        t0 = time.monotonic()
        self.qemu.launch()
        self.started_at = time.time()
        progress("waiting for the agent")
        self._connect_agent(t0 + READY_TIMEOUT)
        self.ready_seconds = round(time.monotonic() - t0, 2)
        self._publish_ports()

    def adopt(self, pid: int, progress: Progress) -> None:
        progress(f"reattaching to the running VM (QEMU pid {pid})")
        self.qemu.adopt(pid)
        with contextlib.suppress(OSError):
            self.started_at = self.paths.pidfile.stat().st_mtime
        self._connect_agent(time.monotonic() + 60)
        self._publish_ports()

    def _publish_ports(self) -> None:
        """Serve the engine's published ports (`-p`) for as long as this VM runs."""
        assert self.qemu.monitor is not None and self.agent is not None
        agent, monitor = self.agent, self.qemu.monitor
        self.publisher = PortPublisher(ForwardTable(monitor.hmp), lambda path: agent.open_unix(path, timeout=5))
        self.publisher.start()

    def _wait_port_open(self, deadline: float) -> None:
        """Wait until the guest has opened the agent port (QMP tells us), so the first SSH
        attempt meets a listening sshd instead of timing out on a booting guest."""
        assert self.qemu.monitor is not None
        while time.monotonic() < deadline and self.qemu.alive():
            try:
                devs = self.qemu.monitor.execute("query-chardev", timeout=5)
            except Exception as exc:  # QMP gone: the liveness check below decides
                log.debug("query-chardev failed: %s", exc)
                break
            if any(d.get("label") == "agent" and d.get("frontend-open") for d in devs):
                return
            time.sleep(0.05)

    def _connect_agent(self, deadline: float) -> None:
        self.agent = AgentChannel(self.spec.files.agent, self.paths.client_key, self.paths.known_host, self.spec.name)
        self.agent.on_connect.append(self._forward_host_services)
        try:
            self._wait_port_open(deadline)
            self.agent.connect(deadline, alive=self.qemu.alive)
            self.release = self.agent.release()
        except AgentError:
            if not self.qemu.alive():
                raise LaunchError(f"the guest stopped during boot: {self.qemu.describe_exit()}",
                                  hint="see `pydesk vm logs`") from None
            raise

    def _forward_host_services(self, transport: Any) -> None:
        """GUEST in the VM -> 127.0.0.1:HOST here, asked again after every reconnect. The guest
        listens on all its addresses: containers reach it as host.docker.internal:GUEST
        (the engine DNATs that to the VM's own address)."""
        for guest_port, host_port in self.spec.host_services:
            def handler(chan: Any, origin: Any, server: Any, host_port: int = host_port) -> None:
                threading.Thread(target=_connect_host_service, args=(chan, host_port), daemon=True).start()

            try:
                transport.request_port_forward("0.0.0.0", guest_port, handler)
            except Exception as exc:  # a host service must not cost us the agent connection
                log.warning("cannot forward host service %d -> %d: %s", guest_port, host_port, exc)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": "running" if self.qemu.alive() else "stopped",
            "pid": self.qemu.pid,
            "accel": str(self.choice.accel),
            "accel_reason": self.choice.reason,
            "cpus": self.spec.cpus,
            "memory_mib": self.spec.memory_mib,
            "disk_gib": self.spec.disk_gib,
            "guest_release": self.release.get("release"),
            "guest_kernel": self.release.get("kernel"),
            "boot_layout": str(self.spec.image.layout),
            "agent_connected": bool(self.agent and self.agent.connected),
            "agent_connects": self.agent.connects if self.agent else 0,
            "started_at": self.started_at,
            "ready_seconds": self.ready_seconds,
            "ports": [str(p) for p in self.spec.ports],
            "host_services": [f"{g}:{h}" for g, h in self.spec.host_services],
        }

    def _poweroff_via_agent(self) -> None:
        if self.agent is None:
            raise AgentError("no agent connection")
        self.agent.exec("poweroff", timeout=10)

    def stop(self) -> str:
        how = self.qemu.shutdown(self._poweroff_via_agent)
        self.close()
        return how

    def close(self) -> None:
        if self.agent is not None:  # first: wakes any channel open still waiting for it
            self.agent.close()
        if self.publisher is not None:
            self.publisher.close()
        self.qemu.close()


def _connect_host_service(chan: Any, host_port: int) -> None:
    try:
        sock = socket.create_connection(("127.0.0.1", host_port), timeout=10)
    except OSError as exc:
        log.info("host service 127.0.0.1:%d unreachable: %s", host_port, exc)
        chan.close()
        return
    sock.settimeout(None)
    threading.Thread(target=pump, args=(chan, sock), daemon=True).start()
    pump(sock, chan)
