"""VM lifecycle through the real CLI, daemon, QEMU (TCG here) and guest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time

import psutil
import pytest

from tests.conftest import VM_FLAGS, Pydesk

pytestmark = pytest.mark.vm


def one_line_error(proc) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, proc
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert lines[0].startswith("pydesk: error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def assert_nothing_left(p: Pydesk, pid: int | None) -> None:
    if pid is not None:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # only the engine socket's standby (it answers "not running"; vmkit/standby.py) may stay
    leftovers = {x.name for x in p.run_dir.glob("*")} if p.run_dir.exists() else set()
    assert leftovers <= {"engine.sock", "standby.pid"}, f"sockets left behind: {leftovers}"
    assert not (p.state / "vm.lock").exists()
    assert not (p.state / "qemu.pid").exists()


def test_start_status_shell_stop(pydesk: Pydesk) -> None:
    out = pydesk("vm", "start", *VM_FLAGS)
    assert out.returncode == 0, out.stderr
    assert "is running" in out.stderr

    status = pydesk("vm", "status")
    assert status.returncode == 0
    assert "state:        running" in status.stdout
    assert "accelerator:  " in status.stdout and "(" in status.stdout  # the accelerator and why
    st = json.loads(pydesk("vm", "status", "--format", "json").stdout)
    assert st["state"] == "running" and st["agent_connected"] is True
    assert st["guest_release"].startswith("0.") and st["guest_kernel"]
    assert st["accel_reason"]
    assert (st["cpus"], st["memory_mib"], st["disk_gib"]) == (2, 1024, 4)
    pid = st["pid"]
    assert psutil.Process(pid).is_running()

    again = pydesk("vm", "start")
    assert "already running" in one_line_error(again)

    sh = pydesk("vm", "shell", "--", "sh", "-c", "cat; echo to-stderr >&2; exit 7", input=b"through stdin\n")
    assert sh.returncode == 7
    assert sh.stdout == "through stdin\n"
    assert sh.stderr == "to-stderr\n"
    # settings were saved by `vm start --memory ...`
    saved = json.loads((pydesk.home / "config" / "settings.json").read_text())
    assert saved["memory_mib"] == 1024

    stop = pydesk("vm", "stop")
    assert stop.returncode == 0, stop.stderr
    assert_nothing_left(pydesk, pid)
    assert pydesk("vm", "status").returncode == 3
    assert "not running" in one_line_error(pydesk("vm", "stop"))
    assert "not running" in one_line_error(pydesk("vm", "shell", "--", "true"))

    # `pydesk run` starts a stopped VM first, says so, and uses the saved settings
    run = pydesk("run", "--rm", "hello")
    assert run.returncode == 0, run.stderr
    assert "starting the pydesk VM" in run.stderr and "Hello from pydesk!" in run.stdout
    st = json.loads(pydesk("vm", "status", "--format", "json").stdout)
    assert st["state"] == "running" and (st["cpus"], st["memory_mib"], st["disk_gib"]) == (2, 1024, 4)
    assert pydesk("vm", "stop", "--quit").returncode == 0
    assert_nothing_left(pydesk, st["pid"])


def test_data_disk_survives_stop_and_sigkill_and_daemon_death(pydesk: Pydesk) -> None:
    pydesk("vm", "start", *VM_FLAGS, check=True)
    pydesk.sh("echo one > /var/lib/pydesk/one && sync", check=True)
    pydesk("vm", "stop", check=True)
    pydesk("vm", "start", check=True)
    assert pydesk.sh("cat /var/lib/pydesk/one").stdout == "one\n"

    # QEMU is killed: the crash is detected and reported; nothing written and synced is lost.
    pydesk.sh("echo two > /var/lib/pydesk/two && sync", check=True)
    qemu_pid = pydesk.qemu_pid()
    os.kill(qemu_pid, signal.SIGKILL)
    wait_daemon_gone(pydesk)
    status = pydesk("vm", "status")
    assert status.returncode == 3
    assert "crashed" in status.stdout and "SIGKILL" in status.stdout
    assert_nothing_left(pydesk, qemu_pid)
    pydesk("vm", "start", check=True)
    assert pydesk.sh("cat /var/lib/pydesk/one /var/lib/pydesk/two").stdout == "one\ntwo\n"

    # The daemon dies: QEMU keeps running and a fresh daemon reattaches on the next command.
    # Its sshd in the guest is frozen meanwhile, as on a guest too busy to run it, so that it
    # never sees the old connection end: it sees the new one and swallows its first greeting.
    pydesk.sh(FREEZE_AGENT_SSHD, check=True)
    time.sleep(2)  # the freeze starts a second after the shell has returned
    daemon_pid = json.loads((pydesk.state / "status.json").read_text())["daemon_pid"]
    qemu_pid = pydesk.qemu_pid()
    os.kill(daemon_pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(daemon_pid).wait(10)
    assert psutil.Process(qemu_pid).is_running()
    log_size = (pydesk.state / "daemon.log").stat().st_size
    st = pydesk("vm", "status", "--format", "json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["pid"] == qemu_pid
    with (pydesk.state / "daemon.log").open() as f:
        f.seek(log_size)
        adopt_log = f.read()
    assert "reattaching" in adopt_log
    assert "agent connect attempt failed" not in adopt_log, adopt_log  # a greeting sent again did it
    frozen = pydesk.sh("cat /run/frozen-sshd; for p in $(head -1 /run/frozen-sshd); do "
                       "[ -d /proc/$p ] && echo still running: $p; done").stdout
    assert frozen.splitlines()[1:] == ["thawed"], frozen
    assert pydesk.sh("cat /var/lib/pydesk/two").stdout == "two\n"
    # ...and a crash of the adopted QEMU is still noticed.
    os.kill(qemu_pid, signal.SIGKILL)
    wait_daemon_gone(pydesk)
    assert "crashed" in pydesk("vm", "status").stdout
    assert_nothing_left(pydesk, qemu_pid)


#: Stop the agent's sshd (the children of the guest's agent-port loop) a second from now,
#: and let it go on a second after a new host connection has arrived on the port (virtio
#: serial ports show their host side's state in debugfs).
FREEZE_AGENT_SSHD = r"""
grep -q debugfs /proc/mounts || mount -t debugfs none /sys/kernel/debug
dbg=$(grep -l 'name: org.pydesk.agent' /sys/kernel/debug/virtio-ports/*)
pids=$(pgrep -P "$(pgrep -o -f /etc/pydesk/agent-port)" | tr '\n' ' ')
[ -n "$dbg" ] && [ -n "$pids" ] || exit 1
echo "$pids" > /run/frozen-sshd
setsid sh -c '
  f() { sed -n "s/^$1: //p" "$0"; }
  sleep 1; kill -STOP $1
  while [ "$(f host_connected)" = 1 ]; do sleep 0.1; done
  while [ "$(f host_connected)" = 0 ]; do sleep 0.1; done
  sleep 1; kill -CONT $1; echo thawed >> /run/frozen-sshd
' "$dbg" "$pids" </dev/null >/dev/null 2>&1 &
"""


def wait_daemon_gone(p: Pydesk) -> None:
    deadline = time.monotonic() + 30
    while (p.run_dir / "daemon.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_agent_reconnects_after_the_guest_side_restarts(shared_vm: Pydesk) -> None:
    before = json.loads(shared_vm("vm", "status", "--format", "json").stdout)["agent_connects"]
    ro = shared_vm.share_ro  # type: ignore[attr-defined]  # an sftp share: its sshfs rides its own port
    (ro / "reconnect.txt").write_text("still here\n")
    sshfs = "cat /run/pydesk/share-1.pid"
    sshfs_before = shared_vm.sh(sshfs).stdout
    # Kill every sshd in the guest, the daemon's own connection included.
    shared_vm.sh("kill -9 $(pidof sshd)")
    for _ in range(3):
        out = shared_vm.sh("echo back")
        assert out.returncode == 0, out.stderr
        assert out.stdout == "back\n"
    after = json.loads(shared_vm("vm", "status", "--format", "json").stdout)["agent_connects"]
    assert after > before
    # the share's session outlived the agent connection: same sshfs, same mount, still serving
    assert sshfs_before.strip() and shared_vm.sh(sshfs).stdout == sshfs_before
    assert shared_vm.sh(f"cat {ro}/reconnect.txt").stdout == "still here\n"


def test_twenty_start_stop_cycles(pydesk: Pydesk) -> None:
    """Lima's virtio-serial agent was sometimes unreachable after restarts (lima#2064)."""
    pydesk("vm", "start", *VM_FLAGS, check=True)
    pydesk("vm", "stop", check=True)
    for cycle in range(20):
        start = pydesk("vm", "start")
        assert start.returncode == 0, f"cycle {cycle}: {start.stderr}"
        out = pydesk.sh(f"echo cycle-{cycle}")
        assert out.stdout == f"cycle-{cycle}\n", f"cycle {cycle}: {out.stderr}"
        stop = pydesk("vm", "stop")
        assert stop.returncode == 0, f"cycle {cycle}: {stop.stderr}"
        assert "(agent)" in stop.stderr  # a clean shutdown through the agent each time
    assert_nothing_left(pydesk, None)


def test_corrupt_config_file(pydesk: Pydesk) -> None:
    cfg = pydesk.home / "config" / "settings.json"
    cfg.parent.mkdir(parents=True)
    cfg.write_text('{"cpus": 2,,}')
    err = one_line_error(pydesk("vm", "start"))
    assert "is not valid JSON" in err and str(cfg) in err
    assert cfg.read_text() == '{"cpus": 2,,}'


def test_port_already_in_use(pydesk: Pydesk) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line_error(pydesk("vm", "start", *VM_FLAGS, "--port", f"{port}:80"))
        assert f"127.0.0.1:{port}/tcp is already in use" in err
    assert pydesk.qemu_pid() is None


def test_missing_qemu(pydesk: Pydesk, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pydesk.env["PATH"] = str(tmp_path / "empty-bin")
    err = one_line_error(pydesk("vm", "start", *VM_FLAGS))
    assert "QEMU (qemu-system-x86_64) not found" in err and "hint:" in err


def test_broken_guest_images(pydesk: Pydesk, guest_image, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import shutil
    from pathlib import Path

    src = Path(guest_image.kernel).parent
    cache = tmp_path / "cache"
    dst = cache / "guest" / src.name
    shutil.copytree(src, dst)
    pydesk.env["PYDESK_CACHE"] = str(cache)
    # an empty kernel file
    (dst / "vmlinuz").write_bytes(b"")
    err = one_line_error(pydesk("vm", "start", *VM_FLAGS))
    assert "vmlinuz is missing or empty" in err
    # a root disk that is not a file system: the guest cannot boot and QEMU stops
    shutil.copy2(src / "vmlinuz", dst / "vmlinuz")
    (dst / "root.erofs").write_bytes(b"\0" * (dst / "root.erofs").stat().st_size)
    err = one_line_error(pydesk("vm", "start", "--accel", "tcg"))
    assert "the guest stopped during boot" in err
    assert pydesk.qemu_pid() is None or not psutil.pid_exists(pydesk.qemu_pid())


def _answers(port: int, deadline: float = 60) -> bool:
    import urllib.request

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                if b"Welcome to nginx" in r.read():
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def test_images_and_containers_survive_vm_restart(pydesk: Pydesk, registry) -> None:  # type: ignore[no-untyped-def]
    """...and so do published ports: after a VM restart (the container comes back by its
    restart policy) and across a host-daemon crash (QEMU keeps the forward; the new daemon
    takes the port table over from the guest)."""
    import docker

    from tests.conftest import registry_flags

    pydesk("vm", "start", *VM_FLAGS, *registry_flags(registry), check=True)

    def client() -> docker.DockerClient:
        return docker.DockerClient(base_url="unix://" + str(pydesk.run_dir / "engine.sock"), version="auto", timeout=120)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = client()
    c.images.pull("busybox", tag="latest")
    c.images.pull("nginx", tag="latest")
    c.containers.create("busybox", ["true"], name="kept")
    c.containers.run("busybox", ["sleep", "600"], detach=True, name="always", restart_policy={"Name": "always"})
    c.containers.run("busybox", ["sleep", "600"], detach=True, name="plain")
    c.containers.run("nginx", detach=True, name="web", restart_policy={"Name": "always"},
                     ports={"80/tcp": ("127.0.0.1", port)})
    assert _answers(port)
    restart = pydesk("vm", "restart")
    assert restart.returncode == 0, restart.stderr
    c = client()
    assert c.images.get("busybox").tags == ["busybox:latest"]
    assert c.containers.get("kept").status == "created"
    deadline = time.monotonic() + 60
    always = c.containers.get("always")
    while always.status != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        always.reload()
    assert always.status == "running"
    assert c.containers.get("plain").status == "exited"  # no restart policy: it stays down
    assert _answers(port), "the published port did not come back after the VM restart"

    daemon_pid = json.loads((pydesk.state / "status.json").read_text())["daemon_pid"]
    os.kill(daemon_pid, signal.SIGKILL)
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(daemon_pid).wait(10)
    assert _answers(port, deadline=5), "QEMU's forward should outlive the daemon"
    assert pydesk("vm", "status").returncode == 0  # a fresh daemon adopts the VM
    c = client()
    c.containers.get("web").stop(timeout=2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the adopted daemon did not close the port of a stopped container")

    # The engine killed in the guest: the one init starts in its place lets the old one's
    # cruns that were waiting for containers go (agent/launcher.py), kills what ran under it
    # (no orphans) and brings `always` back by its policy (and `web`: as with dockerd, a
    # restart of the engine starts an `always` container even if it was stopped by hand).
    from tests.vm.test_engine import guest_cruns

    c.containers.run("busybox", ["true"], remove=True)  # a start has them topped up
    deadline = time.monotonic() + 60
    while not (before := guest_cruns(pydesk))["waiting"] and time.monotonic() < deadline:
        time.sleep(1)  # once the engine is quiet
    old_pid = c.containers.get("always").attrs["State"]["Pid"]
    pydesk.sh("kill -9 $(pgrep -f '^/usr/bin/python3 -m agent$')", check=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            always = client().containers.get("always")
            if always.status == "running" and always.attrs["State"]["Pid"] != old_pid:
                break
        time.sleep(1)
    else:
        raise AssertionError("the restarted engine did not bring `always` back")
    launch_dirs = {f"/run/pydesk/launch/{i}" for i in before["waiting"]}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = guest_cruns(pydesk)
        orphans = [b for b in after["bundles"] if b in launch_dirs]
        running = sorted(r.attrs["State"]["Pid"] for r in client().containers.list())
        if not orphans and sorted(after["states"].values()) == running:
            break
        time.sleep(1)
    assert launch_dirs and not orphans, (before, after)
    assert sorted(r.name for r in client().containers.list()) == ["always", "web"]
    # crun's states are the running containers' and no others
    assert sorted(after["states"].values()) == running, (after, running)


def _machine(home, guest_image, monkeypatch, pause_first: bool = True):  # type: ignore[no-untyped-def]
    """A VM object as the daemon builds one, in this process. With ``pause_first``, its first
    QEMU is paused as soon as it answers on QMP: that guest stays silent, as the ones that hung
    before userspace did. QEMUs launched after it run."""
    from vmkit import accel
    from vmkit.host import detect
    from vmkit.paths import VMPaths, cache_dir
    from vmkit.qemu import QemuProcess
    from vmkit.settings import Settings
    from vmkit.vm import VM, build_spec, guest_config

    monkeypatch.setenv("PYDESK_HOME", str(home))
    launched = QemuProcess._post_launch

    launches: list[int] = []

    def paused(self: QemuProcess) -> None:
        launched(self)
        assert self.monitor is not None and self.pid is not None
        if not launches:
            self.monitor.execute("stop")
        launches.append(self.pid)

    if pause_first:
        monkeypatch.setattr(QemuProcess, "_post_launch", paused)
    host = detect()
    choice = accel.choose(host, guest_image.arch, str(guest_image.kernel), cache_file=cache_dir() / "accel-probe.json")
    settings = Settings(memory_mib=1024, disk_gib=4, share_home=False, restrict_network=True, dns=("127.0.0.1",))
    paths = VMPaths("default")
    spec = build_spec("default", settings, guest_image, choice, paths, host.os)
    return VM(spec, host, paths, choice, guest_config(settings, spec.shares, choice.accel)), launches


def test_a_silent_guest_is_started_again_and_a_stuck_one_stopped(tmp_path, guest_image, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from vmkit import bootwatch, vm

    monkeypatch.setattr(bootwatch, "BOOT_SILENCE", 5.0)
    machine, launches = _machine(tmp_path / "home", guest_image, monkeypatch)
    said: list[str] = []
    try:
        machine.start(said.append)
        first = machine.paths.console_log.with_suffix(".log.1")  # the silent boot's console
        assert first.exists() and bootwatch.console_silent(first)
        assert machine.agent is not None
        assert machine.agent.exec("echo booted") == (0, b"booted\n", b"")
        assert "the guest printed nothing in 5 s; starting it again" in said, said
        assert len(launches) == 2 and not psutil.pid_exists(launches[0])  # the stuck QEMU is gone
        assert not bootwatch.console_silent(machine.paths.console_log)
        # A guest that stops answering before its stop: each gentle step that misses says
        # where the vCPUs and virtqueues were, and the stop still ends it.
        monkeypatch.setattr(vm, "POWEROFF_ANSWER", 2.0)
        monkeypatch.setattr(vm, "ACPI_WAIT", 2.0)
        assert machine.qemu.monitor is not None
        machine.qemu.monitor.execute("stop")
        pid = machine.qemu.pid
        with caplog.at_level(logging.WARNING, logger="vmkit.vm"):
            assert machine.stop() == "quit"
        missed = [r.getMessage() for r in caplog.records if "did not power off" in r.getMessage()]
        assert [m.split(" (")[0] for m in missed] == ["the guest did not power off through agent",
                                                      "the guest did not power off through acpi"], missed
        # an idle guest, paused: every queue at rest (the serial ports' posted input buffers are not news)
        assert all("(vCPU0 " in m and "vCPU1 " in m and "; virtqueues: all at rest)" in m for m in missed), missed
        tasks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tasks waiting in the guest: ")]
        assert len(tasks) == 1 and "the agent did not answer either" in tasks[0], tasks
        assert pid is not None and not psutil.pid_exists(pid)
    finally:
        machine.qemu.kill()
        machine.close()


def test_a_guest_that_never_boots_says_where_its_vcpus_are(tmp_path, guest_image, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from vmkit import bootwatch, vm
    from vmkit.errors import LaunchError

    monkeypatch.setattr(bootwatch, "BOOT_SILENCE", 3600.0)  # no reset: the guest stays paused
    monkeypatch.setattr(vm, "READY_TIMEOUT", 8.0)
    machine, _ = _machine(tmp_path / "home", guest_image, monkeypatch)
    try:
        with pytest.raises(LaunchError) as err:
            machine.start(lambda _: None)
        message = str(err.value)
        assert message.startswith("the guest did not finish booting: its agent port never opened "
                                  "(nothing on its console; vCPU0 "), message
        assert "vCPU1 " in message  # two vCPUs, each with where it stopped
        assert err.value.hint == "see `pydesk vm logs`"
    finally:
        machine.qemu.kill()
        machine.close()


def test_a_slow_flush_at_stop_is_waited_for(tmp_path, guest_image, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """The data disk writes slowly while the guest shuts down (QEMU throttles it to 2 MiB/s, so
    40 MiB of unwritten data take ~20 s against a 5 s wait): the stop keeps waiting while the
    disk moves, ends through the agent, and the data is there at the next boot."""
    from vmkit import vm
    from vmkit.argv import DATA_DRIVE

    # (a 3 s window was once too short: QEMU's throttle, whose timers share the main loop
    # with a busy TCG guest, completed none of the last 9 queued writes for 3 s)
    monkeypatch.setattr(vm, "POWEROFF_WAIT", 5.0)
    home = tmp_path / "home"
    machine, _ = _machine(home, guest_image, monkeypatch, pause_first=False)
    try:
        machine.start(lambda _: None)
        assert machine.agent is not None and machine.qemu.monitor is not None
        status, out, err = machine.agent.exec(
            "dd if=/dev/urandom of=/var/lib/pydesk/unsynced bs=1M count=40 2>/dev/null && "
            "md5sum /var/lib/pydesk/unsynced && grep -E '^Dirty:' /proc/meminfo")
        assert status == 0, err
        digest, _, dirty = out.decode().partition(" /var/lib/pydesk/unsynced\n")
        digest = digest.strip()
        assert int(dirty.split()[1]) > 16 * 1024, dirty  # most of it still only in the guest's memory
        machine.qemu.monitor.execute("block_set_io_throttle", {
            "device": DATA_DRIVE, "bps": 0, "bps_rd": 0, "bps_wr": 2 << 20, "iops": 0, "iops_rd": 0, "iops_wr": 0})
        # What the daemon logs when a stop step misses: a `sync` waiting on the slow disk
        # shows up with its kernel stack, and the data disk with writes in flight.
        def sync() -> None:  # ended by the stop below (its session is killed; the sync is not)
            with contextlib.suppress(Exception):
                machine.agent.exec("sync")

        syncing = threading.Thread(target=sync, daemon=True)
        syncing.start()
        time.sleep(1.5)
        blocked = machine._blocked_tasks()
        assert re.search(r"\bsync\[\d+\]: \w", blocked), blocked
        assert (m := re.search(r"in flight: vda \d+ \d+ vdb (\d+) (\d+)", blocked)) and int(m[2]) > 0, blocked
        with caplog.at_level(logging.INFO, logger="vmkit"):
            assert machine.stop() == "agent"
        assert any(r.getMessage().startswith("the guest is still shutting down (data disk ") for r in caplog.records)
        console = machine.paths.console_log.read_text()
        assert "pydesk-guest: flushing the data disk" in console and "data disk flushed; powering off" in console
        # after 10 s of flushing, the guest itself lists what it waits on
        assert re.search(r"still flushing the data disk; waiting tasks:\n(  .*\n)*  in flight: vda \d+ \d+ vdb", console), console
    finally:
        machine.qemu.kill()
        machine.close()
    again, _ = _machine(home, guest_image, monkeypatch, pause_first=False)
    try:
        again.start(lambda _: None)
        assert again.agent is not None
        assert again.agent.exec("md5sum /var/lib/pydesk/unsynced")[1].decode().split()[0] == digest
    finally:
        again.qemu.kill()
        again.close()
