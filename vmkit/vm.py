"""One pydesk VM: settings + image + accelerator -> a running QEMU with a reachable agent.

The daemon owns exactly one ``VM``; nothing else starts or stops QEMU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmkit.accel import AccelChoice
from vmkit.agent import EXEC_TIMEOUT, AgentChannel
from vmkit.agent import exec_command as agent_exec
from vmkit.agent import exit_status as agent_exit_status
from vmkit.errors import AgentError, ChannelStuck, ConfigError, LaunchError
from vmkit.filewatch import ChangeForwarder, GuestWrites
from vmkit.host import Host, host_os
from vmkit.keys import ensure_keys
from vmkit.paths import VMPaths
from vmkit.ports import ForwardTable, PortPublisher
from vmkit.qemu import QemuProcess, create_data_disk
from vmkit import bootwatch, stuck
from vmkit.argv import DATA_DRIVE
from vmkit import shares as sharing
from vmkit import virtiofs
from vmkit.settings import Settings, parse_host_service
from vmkit.sftp_share import ShareServer, wait_mounted
from vmkit.spec import Accel, GuestImage, HostOS, RuntimeFiles, Share, VMSpec
from vmkit.transport import pump, qemu_endpoint

log = logging.getLogger(__name__)

#: How long a boot may take to reach "agent ready". Under TCG on a loaded 2-core machine a
#: boot takes seconds; the deadline only guards against a guest that will never answer.
READY_TIMEOUT = 180.0
MOUNT_TIMEOUT = 60.0  # for a share's mount command in the guest
POWEROFF_ANSWER = 10.0  # for the guest's `poweroff -n` to answer (it signals init and returns)
POWEROFF_WAIT = 15.0  # then for QEMU to exit, and again while the data disk is still being written
POWEROFF_MAX = 60.0  # ... up to this in all (`vm stop` waits 120 s for the daemon's answer)
ACPI_WAIT = 10.0  # for QEMU to exit after the ACPI power button, if the agent's poweroff did not do it
#: The guest's tasks in uninterruptible sleep, their kernel stacks, the disks' requests in flight
#: (logged when a stop step misses), and how long the agent gets to answer with them.
BLOCKED_TASKS = "/etc/pydesk/blocked-tasks"
BLOCKED_TASKS_ANSWER = 3.0

Progress = Callable[[str], None]


def vm_shares(settings: Settings, os_: HostOS, home: str | None = None) -> tuple[Share, ...]:
    """The folders shared into the VM: the configured ones plus the home folder (a folder
    that does not exist on this host is left out, with a warning in the daemon's log)."""
    shares = sharing.effective(settings.shares, settings.share_home, str(Path.home()) if home is None else home, os_)
    if os_ is host_os():
        missing = [s for s in shares if not os.path.isdir(s.host_path)]
        for s in missing:
            log.warning("not sharing %s: no such folder", s.host_path)
        shares = tuple(s for s in shares if s not in missing)
    return shares


def virtiofs_shares(settings: Settings, shares: tuple[Share, ...], os_: HostOS) -> tuple[Share, ...]:
    """The shares virtiofsd serves (see vmkit/virtiofs.py); the others are SFTP on ports of their own."""
    if settings.share_transport == "sftp" or not shares:
        return ()
    ok, why = virtiofs.available(os_)
    if not ok:
        if settings.share_transport == "virtiofs":
            raise ConfigError(f"share_transport is virtiofs, but {why}", hint="set share_transport to auto or sftp")
        return ()
    return tuple(s for s in shares if not s.read_only)


def build_spec(name: str, settings: Settings, image: GuestImage, choice: AccelChoice, paths: VMPaths,
               os_: HostOS | None = None) -> VMSpec:
    shares = vm_shares(settings, os_ or host_os())
    files = RuntimeFiles(
        qmp=qemu_endpoint(paths.qmp),
        agent=qemu_endpoint(paths.agent),
        console_log=paths.console_log,
        data_disk=paths.data_disk,
        host_key=paths.host_key,
        authorized_keys=paths.authorized_keys,
        guest_config=paths.guest_config,
        pidfile=paths.pidfile,
        virtiofs_dir=paths.run,
        share_ports=tuple(qemu_endpoint(paths.share_port(i)) for i in range(len(shares))),
        engine_port=qemu_endpoint(paths.engine_port),
    )
    return VMSpec(
        name=name, arch=image.arch, cpus=settings.cpus, memory_mib=settings.memory_mib,
        disk_gib=settings.disk_gib, accel=choice.accel, image=image, files=files,
        shares=shares, virtiofs=virtiofs_shares(settings, shares, os_ or host_os()), ports=settings.ports,
        restrict_network=settings.restrict_network,
        dns=settings.dns, host_services=tuple(parse_host_service(s) for s in settings.host_services),
    )


def guest_config(settings: Settings, shares: tuple[Share, ...] = (), accel: Accel | None = None) -> str:
    """The settings the guest reads (fw_cfg opt/org.pydesk/config), one key=value a line;
    ``accel`` tells the engine how its code runs (under TCG it starts crun at fixed
    addresses, agent/runtime.py)."""
    lines = [f"accel={accel}"] if accel is not None else []
    lines += [f"dns={d}" for d in settings.dns[:3]]  # resolv.conf reads at most three
    lines += [f"host-service={parse_host_service(s)[0]}" for s in settings.host_services]
    lines += sharing.guest_config_lines(shares)
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
        self.guest_writes = GuestWrites()
        self.share_servers = [ShareServer(s, i, spec.files.share_ports[i], self.guest_writes)
                              for i, s in enumerate(spec.shares) if s not in spec.virtiofs]
        self.changes: ChangeForwarder | None = None
        self.virtiofsd = virtiofs.Virtiofsd(spec, paths.state)
        self.shares_missing: list[str] = []

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
        self._launch()
        self.started_at = time.time()
        progress("waiting for the agent")
        self._connect_agent(t0 + READY_TIMEOUT, progress)
        self.ready_seconds = round(time.monotonic() - t0, 2)
        self._publish_ports()
        self._forward_changes()
        self._wait_shares(progress)

    def _launch(self) -> None:
        if self.spec.virtiofs:
            self.virtiofsd.start()
        try:
            self.qemu.launch()
        except BaseException:
            self.virtiofsd.close(force=True)
            raise

    def adopt(self, pid: int, progress: Progress) -> None:
        progress(f"reattaching to the running VM (QEMU pid {pid})")
        self.qemu.adopt(pid)
        with contextlib.suppress(OSError):
            self.started_at = self.paths.pidfile.stat().st_mtime
        self._connect_agent(time.monotonic() + 60)
        self._publish_ports()
        self._forward_changes()
        self._wait_shares(progress)

    def _wait_shares(self, progress: Progress) -> None:
        if not self.spec.shares or self.agent is None:
            return
        progress(f"sharing {', '.join(s.host_path for s in self.spec.shares)}")
        self.shares_missing = wait_mounted(self.agent.exec, self.spec.shares)
        if self.shares_missing:
            log.warning("shares not mounted in the guest: %s", self.shares_missing)
            progress(f"warning: could not share {', '.join(self.shares_missing)} (see `pydesk vm logs --daemon`)")

    def _attach_shares(self, transport: Any) -> None:
        for i, share in enumerate(self.spec.virtiofs):
            try:
                chan = transport.open_session(timeout=15)
            except Exception as exc:  # a share must not cost us the agent connection
                log.warning("cannot mount virtiofs share %s: %s", share.host_path, exc)
                continue
            try:
                # Unanswered, the connection is stuck: ChannelStuck goes up, and
                # AgentChannel.connect starts over on a fresh connection.
                agent_exec(chan, virtiofs.mount_command(share, i), EXEC_TIMEOUT)
                if agent_exit_status(chan, MOUNT_TIMEOUT) != 0:
                    chan.settimeout(5)
                    log.warning("mounting virtiofs share %s failed: %s", share.host_path,
                                chan.recv_stderr(4096).decode(errors="replace").strip())
            except ChannelStuck:
                raise
            except Exception as exc:  # a share must not cost us the agent connection
                log.warning("cannot mount virtiofs share %s: %s", share.host_path, exc)
            finally:
                chan.close()
        for srv in self.share_servers:
            try:
                srv.attach(transport)
            except Exception as exc:  # a share must not cost us the agent connection
                log.warning("cannot share %s: %s", srv.share.host_path, exc)

    def _publish_ports(self) -> None:
        """Serve the engine's published ports (`-p`) for as long as this VM runs."""
        assert self.qemu.monitor is not None and self.agent is not None
        agent, monitor = self.agent, self.qemu.monitor
        table = ForwardTable(monitor.hmp, qemu_pid=self.qemu.pid)
        table.widen_all()
        self.publisher = PortPublisher(table, lambda path: agent.open_unix(path, timeout=5))
        self.publisher.start()

    def _forward_changes(self) -> None:
        """Host edits in shared folders become inotify events in the VM (vmkit/filewatch.py)."""
        assert self.agent is not None
        if not self.spec.shares:
            return
        agent = self.agent
        self.changes = ChangeForwarder(self.spec.shares, host_os(), lambda path: agent.open_unix(path, timeout=5),
                                       self.guest_writes)
        self.changes.start()

    def _wait_port_open(self, deadline: float, progress: Progress | None = None) -> bool:
        """Wait until the guest has opened the agent port (QMP tells us), so the first SSH
        attempt meets a listening sshd instead of timing out on a booting guest; True once it
        has. A fresh boot (``progress`` given) that stays silent for BOOT_SILENCE seconds is
        started again, once (vmkit/bootwatch.py)."""
        assert self.qemu.monitor is not None
        silent_until = time.monotonic() + bootwatch.BOOT_SILENCE if progress is not None else None
        while time.monotonic() < deadline and self.qemu.alive():
            try:
                devs = self.qemu.monitor.execute("query-chardev", timeout=5)
            except Exception as exc:  # QMP gone: the liveness check below decides
                log.debug("query-chardev failed: %s", exc)
                break
            if any(d.get("label") == "agent" and d.get("frontend-open") for d in devs):
                return True
            if silent_until is not None and progress is not None and time.monotonic() > silent_until:
                silent_until = None
                if bootwatch.console_silent(self.paths.console_log):
                    self._relaunch_silent_guest(progress)
            time.sleep(0.05)
        return False

    def _vcpu_state(self) -> str:
        """The guest's vCPUs in one line (full dump in the daemon's log); never raises."""
        if self.qemu.monitor is None:
            return "vCPU state unavailable: no QMP connection"
        try:
            dump = self.qemu.monitor.hmp("info registers -a", timeout=5)
        except Exception as exc:
            return f"vCPU state unavailable: {exc}"
        log.debug("guest vCPU registers:\n%s", dump)
        return stuck.vcpu_summary(dump)

    def _virtqueue_state(self) -> str:
        """Every virtqueue not at rest, in one line; never raises."""
        monitor = self.qemu.monitor
        if monitor is None:
            return "virtqueue state unavailable: no QMP connection"
        try:
            return stuck.virtqueue_summary(lambda command: monitor.hmp(command, timeout=5))
        except Exception as exc:
            return f"virtqueue state unavailable: {exc}"

    def _blocked_tasks(self) -> str:
        """The guest's tasks in uninterruptible sleep and where, through the agent if it still
        answers (a guest whose disk writes hang still runs commands); never raises."""
        if self.agent is None:
            return "no agent connection"
        try:
            status, out, _ = self.agent.exec(BLOCKED_TASKS, timeout=BLOCKED_TASKS_ANSWER)
        except Exception as exc:
            return f"the agent did not answer either ({exc})"
        return "; ".join(" ".join(line.split()) for line in out.decode(errors="replace").splitlines()
                         if line.strip()) or f"nothing (status {status})"

    def _relaunch_silent_guest(self, progress: Progress) -> None:
        """A new QEMU for a guest stuck before userspace. (A QMP system_reset was tried
        first: one reset guest in two stayed in its firmware under TCG.) Nothing of the data
        disk is mounted before the guest's first console line, so nothing is lost."""
        log.warning("the guest printed nothing and opened no agent port in %.0f s (%s; %s); starting it again",
                    bootwatch.BOOT_SILENCE, self._vcpu_state(), self._virtqueue_state())
        progress(f"the guest printed nothing in {bootwatch.BOOT_SILENCE:.0f} s; starting it again")
        self.qemu.kill()
        if not self.qemu.wait(10):
            raise LaunchError(f"QEMU (pid {self.qemu.pid}) did not die after SIGKILL")
        self.qemu.close()
        self.virtiofsd.close(force=True)
        self._launch()

    def _connect_agent(self, deadline: float, progress: Progress | None = None) -> None:
        self.agent = AgentChannel(self.spec.files.agent, self.paths.client_key, self.paths.known_host, self.spec.name)
        self.agent.on_connect.append(self._forward_host_services)
        self.agent.on_connect.append(self._attach_shares)
        try:
            opened = self._wait_port_open(deadline, progress)
            if not opened and self.qemu.alive() and time.monotonic() >= deadline:
                console = "nothing on its console" if bootwatch.console_silent(self.paths.console_log) \
                    else "see its console"
                raise LaunchError(f"the guest did not finish booting: its agent port never opened "
                                  f"({console}; {self._vcpu_state()})", hint="see `pydesk vm logs`")
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
            "shares": [{"host_path": s.host_path, "guest_path": s.guest_path, "read_only": s.read_only,
                        "mounted": s.guest_path not in self.shares_missing,
                        "transport": "virtiofs" if s in self.spec.virtiofs else "sftp"} for s in self.spec.shares],
        }

    def _poweroff_via_agent(self) -> None:
        if self.agent is None:
            raise AgentError("no agent connection")
        # -n: no sync in the command; the guest's rc.shutdown flushes after stopping everything,
        # while stop() watches the data disk move (a sync here could outlast POWEROFF_ANSWER).
        self.agent.exec("poweroff -n", timeout=POWEROFF_ANSWER)

    def _shutdown_progress(self) -> str:
        """What moves while the guest shuts down: its data disk's completed writes and
        flushes, and its console. Never raises."""
        try:
            console = self.paths.console_log.stat().st_size
        except OSError:
            console = -1
        disk = "data disk unknown"
        if self.qemu.monitor is not None:
            try:
                for dev in self.qemu.monitor.execute("query-blockstats", timeout=5):
                    if dev.get("device") == DATA_DRIVE:
                        st = dev["stats"]
                        disk = (f"data disk {st['wr_bytes']} bytes in {st['wr_operations']} writes, "
                                f"{st['flush_operations']} flushes")
            except Exception as exc:
                disk = f"data disk unknown: {exc}"
        return f"{disk}; console {console} bytes"

    def _log_missed_shutdown(self, step: str) -> None:
        log.warning("the guest did not power off through %s (%s; %s)", step, self._vcpu_state(),
                    self._virtqueue_state())
        if step == "agent":
            log.warning("tasks waiting in the guest: %s", self._blocked_tasks())

    def stop(self) -> str:
        how = self.qemu.shutdown(self._poweroff_via_agent, gentle_timeout=POWEROFF_WAIT,
                                 gentle_progress=self._shutdown_progress, gentle_max=POWEROFF_MAX,
                                 acpi_timeout=ACPI_WAIT, on_missed=self._log_missed_shutdown)
        self.close()
        return how

    def close(self) -> None:
        if self.agent is not None:  # first: wakes any channel open still waiting for it
            self.agent.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.changes is not None:
            self.changes.close()
        for srv in self.share_servers:
            srv.close()
        if not self.qemu.alive():
            self.virtiofsd.close()
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
