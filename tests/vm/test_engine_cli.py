"""The docker-compatible `pydesk` commands end to end: real CLI, daemon, VM, engine, crun.

Runs against the session's shared VM (built-in `hello`; `busybox` and `nginx` pulled by name
from the test registry mirror). Container names are unique per test so tests do not collide.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.conftest import ROOT, Pydesk
from tests.support.docker_cli import PtySession

pytestmark = pytest.mark.vm


def one_line_error(proc) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Unable to find image")
             and ": Pulling from " not in ln]
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
    assert lines[0].startswith("pydesk: error: ")
    return lines[0]


def name() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def vm(shared_vm: Pydesk) -> Pydesk:
    for image in ("busybox", "nginx"):
        shared_vm("pull", image, check=True)
    return shared_vm


def test_run_rm_hello_prints_greeting(vm: Pydesk) -> None:
    out = vm("run", "--rm", "hello")
    assert out.returncode == 0, out.stderr
    assert "Hello from pydesk!" in out.stdout
    assert vm("ps", "-a", "-q", "--filter", "ancestor=hello", "--filter", "status=running").stdout == ""


def test_run_exit_codes(vm: Pydesk) -> None:
    assert vm("run", "--rm", "busybox", "sh", "-c", "exit 3").returncode == 3
    assert vm("run", "--rm", "busybox", "true").returncode == 0
    missing = vm("run", "--rm", "busybox", "no-such-command")
    assert missing.returncode == 127
    assert "executable file not found" in missing.stderr
    denied = vm("run", "--rm", "busybox", "/etc/passwd")
    assert denied.returncode == 126
    assert "permission denied" in denied.stderr.lower()
    no_image = vm("run", "--rm", "no-such-image-here")
    assert no_image.returncode == 125
    assert "Unable to find image 'no-such-image-here:latest' locally" in no_image.stderr
    assert one_line_error(no_image)
    bad_flag = vm("run", "--rm", "-m", "lots", "busybox", "true")
    assert bad_flag.returncode == 125
    assert 'invalid argument "lots" for "-m, --memory" flag' in one_line_error(bad_flag)


def test_run_streams_stdout_stderr_and_stdin(vm: Pydesk) -> None:
    out = vm("run", "--rm", "busybox", "sh", "-c", "echo to-out; echo to-err >&2")
    assert (out.returncode, out.stdout, out.stderr) == (0, "to-out\n", "to-err\n")
    piped = vm("run", "--rm", "-i", "busybox", "tr", "a-z", "A-Z", input=b"through stdin\n")
    assert (piped.returncode, piped.stdout) == (0, "THROUGH STDIN\n")


def test_run_flags_reach_the_container(vm: Pydesk, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nFROM_FILE=yes\n")
    script = 'echo "$A|$FROM_FILE|$(pwd)|$(id -u)|$(hostname)"'
    out = vm("run", "--rm", "-e", "A=1", "--env-file", str(env_file), "-w", "/tmp", "-u", "1000",
             "--hostname", "pdhost", "busybox", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1|yes|/tmp|1000|pdhost\n"
    assert vm("run", "--rm", "--entrypoint", "/bin/echo", "busybox", "over", "ridden").stdout == "over ridden\n"
    ro = vm("run", "--rm", "--read-only", "busybox", "touch", "/x")
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr
    init = vm("run", "--rm", "--init", "busybox", "cat", "/proc/1/cmdline")
    assert init.returncode == 0 and "init" in init.stdout
    limits = vm("run", "--rm", "-m", "32m", "--cpus", "0.5", "--pids-limit", "20", "busybox", "cat",
                "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/pids.max")
    assert limits.stdout.split() == ["33554432", "50000", "100000", "20"], limits.stderr
    script = ("ulimit -n; ulimit -Hn; id -G; grep CapEff /proc/self/status; cat /proc/sys/net/ipv4/ip_forward; "
              "grep ' /scratch ' /proc/mounts | cut -d' ' -f4 | tr , '\n' | grep -x noexec; df -k /dev/shm | tail -1; "
              "cat /sys/fs/cgroup/cpu.weight; whoami; nc -l -p 80 -w 1 2>&1 | head -1; echo bound")
    out = vm("run", "--rm", "--ulimit", "nofile=100:200", "--group-add", "29", "--group-add", "nogroup", "-u", "nobody",
             "--cap-drop", "ALL", "--sysctl", "net.ipv4.ip_forward=1", "--tmpfs", "/scratch:size=1m",
             "--shm-size", "2m", "-c", "2048", "busybox", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:6] == ["100", "200", "65534 29", "CapEff:\t0000000000000000", "1", "noexec"], lines
    assert lines[6].split()[1] == "2048" and lines[7] != "100" and lines[8] == "nobody", lines  # 2m /dev/shm; weight
    assert lines[-1] == "bound" and "Permission denied" not in out.stdout  # port 80 as nobody, as under dockerd
    bad = one_line_error(vm("run", "--rm", "--ulimit", "files=1", "busybox", "true"))
    assert bad == "pydesk: error: invalid ulimit type: files", bad


def test_detached_lifecycle_logs_exec(vm: Pydesk) -> None:
    n = name()
    out = vm("run", "-d", "--name", n, "-l", "suite=engine-cli", "busybox", "sh", "-c",
             "trap 'echo bye; exit 0' TERM; echo started; while true; do sleep 1; done")
    assert out.returncode == 0, out.stderr
    cid = out.stdout.strip()
    assert len(cid) == 64
    try:
        assert vm("ps", "-q", "--filter", f"name={n}").stdout.strip() == cid[:12]
        rows = [json.loads(line) for line in vm("ps", "--format", "json", "--filter", "label=suite=engine-cli").stdout.splitlines()]
        assert any(r["Names"] == n and r["State"] == "running" for r in rows)
        assert vm("ps", "--format", "{{.Names}}", "--filter", f"name={n}").stdout == f"{n}\n"
        for _ in range(50):
            if "started" in vm("logs", n).stdout:
                break
            time.sleep(0.2)
        logs = vm("logs", "-t", "--tail", "1", n)
        assert logs.stdout.endswith(" started\n") and logs.stdout[:4].isdigit()
        ex = vm("exec", n, "sh", "-c", "echo in-exec; echo e >&2; exit 4")
        assert (ex.returncode, ex.stdout, ex.stderr) == (4, "in-exec\n", "e\n")
        assert vm("exec", "-w", "/etc", n, "pwd").stdout == "/etc\n"
        assert vm("exec", "-i", n, "cat", input=b"via exec stdin\n").stdout == "via exec stdin\n"
        info = json.loads(vm("inspect", n).stdout)
        assert isinstance(info, list) and info[0]["Id"] == cid and info[0]["State"]["Running"] is True
        assert vm("inspect", "-f", "{{.Config.Labels.suite}}", n).stdout == "engine-cli\n"
        stop = vm("stop", "-t", "5", n)
        assert (stop.returncode, stop.stdout) == (0, f"{n}\n")
        assert vm("wait", n).stdout == "0\n"
        assert vm("logs", n).stdout.endswith("bye\n")
        assert vm("start", n).returncode == 0
        assert vm("restart", "-t", "1", n).returncode == 0
        assert vm("kill", n).stdout == f"{n}\n"
        assert vm("wait", n).stdout == "137\n"
    finally:
        rm = vm("rm", "-f", n)
    assert (rm.returncode, rm.stdout) == (0, f"{n}\n")
    assert "No such container" in one_line_error(vm("rm", n))


def test_logs_follow_ends_with_the_container(vm: Pydesk) -> None:
    n = name()
    vm("run", "-d", "--name", n, "busybox", "sh", "-c", "for i in 1 2 3; do echo line$i; sleep 1; done",
       check=True)
    try:
        out = vm("logs", "-f", n, timeout=60)
        assert out.returncode == 0
        assert out.stdout == "line1\nline2\nline3\n"
        assert vm("logs", "--since", "2100-01-01T00:00:00Z", n).stdout == ""
    finally:
        vm("rm", "-f", n)


def test_create_start_attach_wait(vm: Pydesk) -> None:
    n = name()
    created = vm("create", "--name", n, "busybox", "sh", "-c", "echo out; echo err >&2; exit 9")
    assert created.returncode == 0 and len(created.stdout.strip()) == 64
    try:
        assert vm("ps", "-a", "--filter", f"name={n}", "--format", "{{.State}}").stdout == "created\n"
        att = vm("start", "-a", n)
        assert (att.returncode, att.stdout, att.stderr) == (9, "out\n", "err\n")
        assert vm("wait", n).stdout == "9\n"
    finally:
        vm("rm", "-f", n)
    m = name()
    vm("run", "-d", "--name", m, "busybox", "sh", "-c", "sleep 2; echo late; exit 5", check=True)
    try:
        att = vm("attach", "--no-stdin", m, timeout=60)
        assert (att.returncode, att.stdout) == (5, "late\n")
    finally:
        vm("rm", "-f", m)


def wait_removed(vm: Pydesk, n: str) -> None:
    """A --rm container is gone soon after it exits."""
    for _ in range(50):
        if vm("ps", "-a", "-q", "--filter", f"name={n}").stdout == "":
            return
        time.sleep(0.2)
    raise AssertionError(f"the --rm container {n} was not removed after it exited")


def terminal(vm: Pydesk, *args: str, size: tuple[int, int]) -> PtySession:
    """`pydesk <args>` under a real pseudo-terminal of ``size`` (rows, columns)."""
    return PtySession([sys.executable, "-m", "desktop.cli", *args], vm.env, size=size, cwd=ROOT)


def test_exec_it_is_a_terminal_that_follows_the_window(vm: Pydesk) -> None:
    n = name()
    vm("run", "-d", "--name", n, "busybox", "sleep", "600", check=True)
    term = terminal(vm, "exec", "-it", n, "sh", size=(31, 101))
    try:
        term.expect("# ")
        term.send("tty; echo answer-$((6*7))\r")
        assert re.search(r"/dev/pts/\d+\s+answer-42", term.expect("answer-42"))
        term.wait_for_size(31, 101)   # the window's size when the exec began
        term.resize(42, 133)           # the user resizes the window: SIGWINCH to the CLI
        term.wait_for_size(42, 133)
        term.send("exit 5\r")
        assert term.wait() == 5
        # the container's own process never had a terminal
        assert vm("exec", n, "sh", "-c", "tty; true").stdout == "not a tty\n"
    finally:
        term.close()
        vm("rm", "-f", n)


def test_run_it_is_a_terminal_with_the_exit_code(vm: Pydesk) -> None:
    n = name()
    term = terminal(vm, "run", "-it", "--rm", "--name", n, "busybox", "sh", size=(27, 91))
    try:
        term.expect("# ")
        term.wait_for_size(27, 91)
        term.resize(35, 120)
        term.wait_for_size(35, 120)
        term.send("exit 6\r")
        assert term.wait() == 6
    finally:
        term.close()
        vm("rm", "-f", n)
    wait_removed(vm, n)  # --rm: gone after it exits


def test_a_terminal_has_the_window_size_from_the_first_instruction(vm: Pydesk) -> None:
    # ConsoleSize: a program that asks at once (here `stty size` as the container's or the
    # exec's only process) sees the window's size, not the 0x0 of a new pseudo-terminal
    # that a resize after the start would mend too late
    n = name()
    run = terminal(vm, "run", "-it", "--name", n, "busybox", "stty", "size", size=(29, 97))
    try:
        assert run.wait() == 0
        assert run.output.decode().split() == ["29", "97"], run.output
        host = json.loads(vm("inspect", "-f", "{{json .HostConfig}}", n).stdout)
        assert host["ConsoleSize"] == [29, 97]
    finally:
        run.close()
        vm("rm", "-f", n)
    vm("run", "-d", "--name", n, "busybox", "sleep", "600", check=True)
    try:
        for size in ((33, 77), (51, 160)):
            ex = terminal(vm, "exec", "-it", n, "stty", "size", size=size)
            try:
                assert ex.wait() == 0
                assert ex.output.decode().split() == [str(v) for v in size], ex.output
            finally:
                ex.close()
    finally:
        vm("rm", "-f", n)


def test_detach_keys_end_the_session_and_leave_the_container_running(vm: Pydesk) -> None:
    n = name()
    run = terminal(vm, "run", "-it", "--name", n, "busybox", "sh", size=(24, 80))
    try:
        run.expect("# ")
        run.send("echo ran-$((2*3))\r")
        run.expect("ran-6")
        run.send("\x10\x11")  # ctrl-p ctrl-q: `run -it` returns 0 at once, quietly
        assert run.wait(timeout=30) == 0
        assert "read escape sequence" not in run.output.decode()
        assert vm("inspect", "-f", "{{.State.Running}}", n).stdout == "true\n"

        att = terminal(vm, "attach", "--detach-keys", "ctrl-a,x", n, size=(24, 80))
        try:
            att.send("echo back-$((3*3))\r")
            att.expect("back-9")
            att.send("\x10\x11\x15")  # not the keys now: the shell gets them (ctrl-u clears its line)
            att.send("echo still-$((4*4))\r")
            att.expect("still-16")
            att.send("\x01x")  # `attach` says so and returns 1
            assert att.wait(timeout=30) == 1
            assert "read escape sequence" in att.output.decode()
        finally:
            att.close()
        assert vm("inspect", "-f", "{{.State.Running}}", n).stdout == "true\n"

        ex = terminal(vm, "exec", "-it", n, "sh", "-c", "echo exec-$((5*5)) > /tmp/mark; exec sleep 600", size=(24, 80))
        try:
            deadline = time.monotonic() + 30
            while vm("exec", n, "cat", "/tmp/mark").stdout != "exec-25\n":
                assert time.monotonic() < deadline, "the exec did not start"
                time.sleep(0.2)
            ex.send("\x10\x11")
            assert ex.wait(timeout=30) == 1
            assert "read escape sequence" in ex.output.decode()
        finally:
            ex.close()
        ps = vm("exec", n, "ps", "-o", "args").stdout
        assert "sleep 600" in ps, ps  # the exec's process runs on
        bad = vm("attach", "--detach-keys", "ctrl-1", n)
        assert "invalid detach keys 'ctrl-1'" in one_line_error(bad) and bad.returncode == 1
    finally:
        run.close()
        vm("rm", "-f", n)
    bad_run = vm("run", "--rm", "--detach-keys", "ab", "busybox", "true")
    assert bad_run.returncode == 125 and "invalid detach keys 'ab'" in one_line_error(bad_run)


def test_top_stats_pause_rename(vm: Pydesk) -> None:
    n, m = name(), name()
    vm("run", "-d", "--name", n, "-m", "48m", "busybox", "sh", "-c", "sleep 600; true", check=True)
    try:
        top = vm("top", n, check=True).stdout.splitlines()
        assert top[0].split() == ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
        assert [line for line in top[1:] if line.endswith(" sh -c sleep 600; true")], top
        assert [line for line in top[1:] if line.endswith(" sleep 600")], top
        custom = vm("top", n, "-o", "pid,comm", check=True).stdout.split()
        assert custom[:2] == ["PID", "COMMAND"] and "sh" in custom[2:], custom
        bad = vm("top", n, "--no-such-ps-option")
        assert bad.returncode == 1 and "ps: " in one_line_error(bad)

        table = vm("stats", "--no-stream", n, check=True).stdout.splitlines()
        assert table[0].split()[:3] == ["CONTAINER", "ID", "NAME"] and n in table[1]
        row = json.loads(vm("stats", "--no-stream", "--format", "json", n, check=True).stdout)
        assert row["Name"] == n and row["MemUsage"].endswith(" / 48MiB") and row["PIDs"] == "2", row
        assert float(row["CPUPerc"].rstrip("%")) < 50, row  # sh and sleep are idle
        live = subprocess.Popen([sys.executable, "-m", "desktop.cli", "stats", "--format", "{{.Name}} {{.PIDs}}", n],
                                cwd=ROOT, env=vm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        guard = threading.Timer(60, live.kill)  # a client that prints nothing fails, not hangs
        guard.start()
        try:  # refreshed every second until stopped
            assert [live.stdout.readline() for _ in range(3)] == [f"{n} 2\n"] * 3
        finally:
            guard.cancel()
            live.terminate()
            live.communicate(timeout=30)

        assert vm("pause", n).stdout == f"{n}\n"
        assert vm("inspect", "-f", "{{.State.Status}}", n).stdout == "paused\n"
        assert vm("unpause", n).stdout == f"{n}\n"
        assert vm("rename", n, m, check=True).stdout == ""
        assert vm("container", "inspect", "-f", "{{.Name}} {{.State.Status}}", m).stdout == f"/{m} running\n"
        assert "No such container" in one_line_error(vm("pause", n))
    finally:
        vm("rm", "-f", n, m)


def test_image_and_container_groups_and_their_prunes(vm: Pydesk, tmp_path) -> None:  # type: ignore[no-untyped-def]
    keep, gone = name(), name()
    vm("run", "-d", "--name", keep, "-l", f"prune={keep}", "busybox", "sleep", "600", check=True)
    vm("create", "--name", gone, "-l", f"prune={keep}", "busybox", "true", check=True)
    try:
        assert vm("container", "ls", "-q", "--filter", f"name={keep}").stdout.strip() != ""
        assert set(vm("container", "ls", "-a", "--filter", f"label=prune={keep}", "--format", "{{.Names}}").stdout.split()) \
            == {keep, gone}
        declined = vm("container", "prune", input=b"n\n")
        assert declined.returncode == 0 and "WARNING! This will remove all stopped containers." in declined.stderr
        assert gone in vm("container", "ls", "-a", "--format", "{{.Names}}").stdout.split()
        out = vm("container", "prune", "-f", "--filter", f"label=prune={keep}", check=True).stdout
        assert out.startswith("Deleted Containers:\n") and out.rstrip().splitlines()[-1].startswith("Total reclaimed space: ")
        names = vm("container", "ls", "-a", "--format", "{{.Names}}").stdout.split()
        assert gone not in names and keep in names
    finally:
        vm("rm", "-f", keep, gone)

    # a dangling image: one loaded without a name
    image = "127.0.0.1:5000/entrypoint"  # the test registry, by its address as the VM sees it
    vm("pull", image, check=True)
    image_id = vm("image", "inspect", "-f", "{{.Id}}", image, check=True).stdout.strip()
    archive = tmp_path / "untagged.tar"
    vm("image", "save", "-o", str(archive), image_id, check=True)
    vm("image", "rm", image, check=True)
    vm("image", "load", "-i", str(archive), check=True)
    assert vm("image", "inspect", "-f", "{{.RepoTags}}", image_id).stdout == "[]\n"
    assert image_id[7:19] in vm("image", "ls", "-q").stdout.split()
    none = vm("image", "prune", "-a", "-f", "--filter", "until=2000-01-01T00:00:00Z", check=True).stdout
    assert none == "Total reclaimed space: 0B\n"  # every image is newer than that: none goes
    out = vm("image", "prune", "-f", check=True).stdout
    assert f"deleted: {image_id}" in out.splitlines() and out.startswith("Deleted Images:\n"), out
    assert "No such image" in one_line_error(vm("image", "inspect", image_id))
    assert "busybox" in vm("image", "ls", "--format", "{{.Repository}}").stdout.split()  # in use, and tagged


def test_version_and_info(vm: Pydesk) -> None:
    out = vm("version", check=True).stdout
    assert out.startswith("Client: pydesk\n") and "\nServer: pydesk engine (in the VM)\n" in out, out
    assert " API version:       1.44 (minimum version 1.24)\n" in out, out
    assert vm("version", "--format", "{{.Server.ApiVersion}} {{.Client.ApiVersion}}").stdout == "1.44 1.44\n"
    n = name()
    vm("run", "-d", "--name", n, "busybox", "sleep", "600", check=True)
    try:
        info = vm("info", check=True).stdout
        assert " Storage Driver: overlay2\n" in info and " Default Runtime: crun\n" in info, info
        assert re.search(r"\n CPUs: 2\n Total Memory: [\d.]+[MG]iB\n", info), info  # VM_FLAGS: 2 CPUs, 1G
        running = len(vm("ps", "-q").stdout.split())
        assert vm("info", "--format", "{{.ContainersRunning}}").stdout == f"{running}\n" and running >= 1
    finally:
        vm("rm", "-f", n)


def test_history_diff_update(vm: Pydesk) -> None:
    image_id = vm("image", "inspect", "-f", "{{.Id}}", "nginx", check=True).stdout.strip()
    table = vm("history", "nginx", check=True).stdout.splitlines()
    assert table[0].split() == ["IMAGE", "CREATED", "CREATED", "BY", "SIZE", "COMMENT"]
    rows = [line.split("|") for line in vm("history", "--format", "{{.ID}}|{{.CreatedBy}}|{{.Size}}", "nginx",
                                           check=True).stdout.splitlines()]
    assert [r[0] for r in rows] == [image_id[7:19], "<missing>"], rows  # newest step first
    assert all(r[1].startswith("pydesk test builder") for r in rows), rows
    assert all(r[2].endswith("MB") and float(r[2][:-2]) >= 1 for r in rows), rows  # each step's layer
    assert vm("history", "-q", "--no-trunc", "nginx").stdout.split() == [image_id, "<missing>"]

    n = name()
    vm("run", "-d", "--name", n, "busybox", "sh", "-c", "echo new > /new.txt; rm /etc/group; sleep 600", check=True)
    try:
        deadline = time.monotonic() + 30
        while "D /etc/group" not in (diff := vm("diff", n).stdout.splitlines()):
            assert time.monotonic() < deadline, diff
            time.sleep(0.2)
        assert "A /new.txt" in diff and "C /etc" in diff, diff
        assert vm("update", "-m", "64m", "--pids-limit", "40", "--restart", "on-failure:2", n).stdout == f"{n}\n"
        host = json.loads(vm("inspect", "-f", "{{json .HostConfig}}", n, check=True).stdout)
        assert (host["Memory"], host["PidsLimit"], host["RestartPolicy"]) == (
            64 << 20, 40, {"Name": "on-failure", "MaximumRetryCount": 2}), host
        assert vm("exec", n, "cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max").stdout.split() == [
            str(64 << 20), "40"]
        assert "one or more flags" in one_line_error(vm("update", n))
        assert "invalid argument" in one_line_error(vm("update", "-m", "lots", n))
    finally:
        vm("rm", "-f", n)


def test_events_between_times_and_filtered(vm: Pydesk) -> None:
    n = name()
    since = f"{time.time() - 60:.3f}"  # (the guest's clock may lag the host's a little)
    vm("run", "--rm", "--name", n, "-l", f"suite={n}", "busybox", "true", check=True)
    until = f"{time.time() + 1:.3f}"

    def events(*flags: str) -> list[str]:
        return vm("events", "--since", since, "--until", until, *flags, check=True).stdout.splitlines()

    lines = events("--filter", f"container={n}")
    actions = [line.split()[2] for line in lines]
    assert actions == ["create", "start", "die", "destroy"], lines
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z container create [0-9a-f]{64} \(.*\)", lines[0]), lines
    assert f" (image=busybox, name={n}, " in lines[0] and lines[0].endswith(f", suite={n})"), lines  # sorted
    assert "exitCode=0" in lines[2], lines
    assert events("--filter", f"label=suite={n}", "--format", "{{.Action}}") == actions
    assert events("--filter", "image=busybox", "--filter", f"container={n}", "--format", "{{.Action}}") == actions
    assert events("--filter", f"label=suite=other-{n}") == []
    assert events("--filter", "image=nginx", "--filter", f"container={n}") == []
    first = json.loads(events("--filter", f"container={n}", "--format", "json")[0])
    assert (first["Type"], first["Action"], first["Actor"]["Attributes"]["name"]) == ("container", "create", n)
    assert "invalid value for \"since\"" in one_line_error(vm("events", "--since", "yesterday-ish"))


def test_filters_choose_what_a_command_touches_and_typos_are_refused(vm: Pydesk) -> None:
    n = name()
    keep, gone, used = f"{n}-keep", f"{n}-gone", f"{n}-used"
    since = f"{time.time() - 60:.3f}"
    for net, extra in ((keep, ("--label", "keep")), (gone, ()), (used, ())):
        vm("network", "create", "--label", f"suite={n}", *extra, net, check=True)
    vkeep, vgone = f"{n}-vkeep", f"{n}-vgone"  # (an event filter's name matches any type's: see below)
    for vol, extra in ((vkeep, ("--label", "keep")), (vgone, ())):
        vm("volume", "create", "--label", f"suite={n}", *extra, vol, check=True)
    vm("run", "-d", "--name", n, "--network", used, "busybox", "sleep", "600", check=True)
    try:
        def ls(what: str, *flt: str) -> list[str]:
            flags = [x for f in flt for x in ("--filter", f)]
            return sorted(vm(what, "ls", "--format", "{{.Name}}", *flags, check=True).stdout.split())

        assert ls("network", f"label=suite={n}") == [gone, keep, used]
        assert ls("network", f"label=suite={n}", "dangling=true") == [gone, keep]
        assert ls("network", f"label=suite={n}", "label=keep") == [keep]
        assert ls("network", f"name={n}", "type=custom", "driver=bridge", "scope=local") == [gone, keep, used]
        assert ls("network", "type=builtin") == ["bridge", "host", "none"]
        assert ls("network", f"label=suite={n}", "driver=null") == []
        net_id = json.loads(vm("network", "inspect", keep, check=True).stdout)[0]["Id"]
        assert ls("network", f"id={net_id[:12]}") == [keep]
        # a typo in a prune's filter is refused, not ignored (ignored, it would prune every network)
        assert one_line_error(vm("network", "prune", "-f", "--filter", "lable=keep")) == \
            "pydesk: error: invalid filter 'lable'"
        assert one_line_error(vm("network", "prune", "-f", "--filter", "until=yesterday")) == \
            'pydesk: error: failed to parse value as time or duration: "yesterday"'
        assert ls("network", f"label=suite={n}") == [gone, keep, used]
        assert vm("network", "prune", "-f", "--filter", "until=2000-01-01T00:00:00Z", check=True).stdout == ""
        out = vm("network", "prune", "-f", "--filter", f"label=suite={n}", "--filter", "label!=keep", check=True).stdout
        assert out.split() == ["Deleted", "Networks:", gone]  # not the kept one, not the one in use
        assert ls("network", f"label=suite={n}") == [keep, used]

        assert ls("volume", f"label=suite={n}", "dangling=true") == [vgone, vkeep]
        out = vm("volume", "prune", "-f", "--all", "--filter", f"label=suite={n}", "--filter", "label!=keep",
                 check=True).stdout
        assert vgone in out.split() and vkeep not in out
        assert ls("volume", f"label=suite={n}") == [vkeep]
        assert one_line_error(vm("volume", "prune", "-f", "--filter", "until=1h")) == \
            "pydesk: error: invalid filter 'until'"
        assert one_line_error(vm("system", "prune", "-f", "--volumes", "--filter", "until=1h")) == \
            'pydesk: error: the "until" filter is not supported with "--volumes"'
        assert one_line_error(vm("ps", "--filter", "status=sleeping")) == "pydesk: error: invalid filter 'status=sleeping'"

        busybox = vm("images", "-q", "busybox", check=True).stdout.split()[0]
        assert busybox in vm("images", "-q", "--filter", "until=1m", check=True).stdout.split()
        assert vm("images", "-q", "--filter", "until=2023-11-14T22:13:19Z", check=True).stdout == ""  # test images: :20
        assert vm("images", "-q", "--filter", "before=busybox", "--filter", "reference=busybox", check=True).stdout == ""
        assert "No such image" in one_line_error(vm("images", "--filter", "since=no-such-image"))

        until = f"{time.time() + 1:.3f}"

        def events(*flt: str) -> list[str]:
            flags = [x for f in flt for x in ("--filter", f)]
            return vm("events", "--since", since, "--until", until, "--format", "{{.Type}} {{.Action}}", *flags,
                      check=True).stdout.splitlines()

        assert events(f"network={keep}") == ["network create"]
        assert events(f"network={used}", "type=network") == ["network create", "network connect"]
        assert events(f"network={gone}") == ["network create", "network destroy"]  # by the prune
        assert events(f"volume={vgone}") == ["volume create", "volume destroy"]
        assert events(f"volume={vkeep}", "event=create") == ["volume create"]
        # as dockerd's, an object filter matches the ID or name of any event's actor: the
        # volumes' events pass a network filter that names them
        assert events(f"network={vkeep}") == ["volume create"]
        assert events("scope=swarm") == [] and events("daemon=nothing-here") == []
        assert events(f"container={n}", "type=container", "event=start") == ["container start"]
        vm("stop", "-t", "0", n, check=True)
        until = f"{time.time() + 1:.3f}"
        assert events(f"network={used}", "event=disconnect") == ["network disconnect"]
    finally:
        vm("rm", "-f", n)
        vm("network", "rm", keep, used)
        vm("volume", "rm", vkeep)


def test_run_rm_removes_and_detached_rm(vm: Pydesk) -> None:
    n = name()
    assert vm("run", "--rm", "--name", n, "busybox", "true").returncode == 0
    assert vm("ps", "-a", "-q", "--filter", f"name={n}").stdout == ""
    assert vm("run", "-d", "--rm", "--name", n, "busybox", "true").returncode == 0
    wait_removed(vm, n)


def test_nginx_serves_http_inside_the_vm(vm: Pydesk) -> None:
    n = name()
    vm("run", "-d", "--name", n, "nginx", check=True)
    try:
        for _ in range(50):
            got = vm("exec", n, "wget", "-qO-", "http://127.0.0.1/")
            if got.returncode == 0:
                break
            time.sleep(0.3)
        assert "nginx" in got.stdout.lower()
        stop = vm("stop", n)
        assert stop.returncode == 0
        assert vm("inspect", "-f", "{{.State.Running}}", n).stdout == "false\n"
    finally:
        vm("rm", "-f", n)


def test_images_tag_rmi_save_load(vm: Pydesk, tmp_path) -> None:  # type: ignore[no-untyped-def]
    images = vm("images")
    assert images.stdout.splitlines()[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert any(line.split()[:2] == ["hello", "latest"] for line in images.stdout.splitlines())
    rows = [json.loads(line) for line in vm("images", "--format", "json").stdout.splitlines()]
    assert {"hello", "busybox"} <= {r["Repository"] for r in rows}
    tag = f"pdtest/{name()}:v1"
    assert vm("tag", "hello", tag).returncode == 0
    try:
        listed = vm("images", tag.split(":")[0], "--format", "{{.Repository}}:{{.Tag}}").stdout
        assert listed == f"{tag}\n"
        archive = tmp_path / "hello.tar"
        assert vm("save", "-o", str(archive), tag).returncode == 0
        assert archive.stat().st_size > 1000
        rmi = vm("rmi", tag)
        assert rmi.returncode == 0 and f"Untagged: {tag}" in rmi.stdout
        load = vm("load", "-i", str(archive))
        assert load.returncode == 0 and f"Loaded image: {tag}" in load.stdout
    finally:
        vm("rmi", tag)
    assert "No such image" in one_line_error(vm("rmi", "no-such-image:nope"))


def test_commit_export_import(vm: Pydesk, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import gzip
    import tarfile

    n, still = name(), name()
    img = f"pdtest/{n}"
    script = ("echo made > /made; rm /bin/ls; rm -rf /home; mkdir -p /home/new; echo x > /home/new/f; "
              "echo vol > /data/v; touch /ready; sleep 600")
    vm("run", "-d", "--name", n, "-v", "/data", "busybox", "sh", "-c", script, check=True)
    vm("run", "-d", "--name", still, "busybox", "sleep", "600", check=True)
    try:
        deadline = time.monotonic() + 30
        while vm("exec", n, "test", "-f", "/ready").returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.3)
        out = vm("commit", "-c", "CMD cat /made", "-c", "ENV ADDED=1", "-m", "the message", "-a", "Me <me@example.com>",
                 n, f"{img}:v1", check=True).stdout.strip()
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", out), out
        state = json.loads(vm("inspect", n, check=True).stdout)[0]["State"]
        assert state["Running"] and not state["Paused"]  # paused for the commit, then resumed
        assert vm("run", "--rm", f"{img}:v1", check=True).stdout == "made\n"
        seen = vm("run", "--rm", f"{img}:v1", "sh", "-c", "ls /bin/ls; ls -A /home; echo $ADDED; ls -A /data; ls /ready",
                  ).stdout.split()
        assert seen == ["new", "1", "/ready"], seen  # ls and the old /home are gone; the volume's files are not in it
        info = json.loads(vm("image", "inspect", f"{img}:v1", check=True).stdout)[0]
        cid = json.loads(vm("inspect", n, check=True).stdout)[0]["Id"]
        assert (info["Id"], info["Comment"], info["Author"], info["Container"]) == (out, "the message",
                                                                                    "Me <me@example.com>", cid)
        assert info["Config"]["Cmd"] == ["/bin/sh", "-c", "cat /made"] and "ADDED=1" in info["Config"]["Env"]
        assert info["Config"]["Volumes"] == {"/data": {}}  # the container's volume, declared, as dockerd's commit
        busybox = json.loads(vm("image", "inspect", "busybox", check=True).stdout)[0]
        assert info["RootFS"]["Layers"][:-1] == busybox["RootFS"]["Layers"] and len(info["RootFS"]["Layers"]) == \
            len(busybox["RootFS"]["Layers"]) + 1
        assert vm("history", "--format", "{{.Comment}}", f"{img}:v1", check=True).stdout.splitlines()[0] == "the message"
        # nothing changed: no new layer, as dockerd
        vm("commit", still, f"{img}:same", check=True)
        same = json.loads(vm("image", "inspect", f"{img}:same", check=True).stdout)[0]
        assert same["RootFS"]["Layers"] == busybox["RootFS"]["Layers"]
        assert one_line_error(vm("commit", "-c", "FROM busybox", n)) == "pydesk: error: from is not a valid change command"

        exported = tmp_path / "fs.tar"
        vm("export", "-o", str(exported), n, check=True)
        with tarfile.open(exported) as tf:
            names = set(tf.getnames())
        assert {"made", "bin/busybox", "home/new/f", "etc/passwd"} <= names
        assert "bin/ls" not in names and "data/v" not in names and not any(x.startswith("proc/") for x in names)
        out = vm("import", "-c", 'CMD ["/bin/cat", "/made"]', "-m", "imported", str(exported), f"{img}:imp",
                 check=True).stdout.strip()
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", out), out
        assert vm("run", "--rm", f"{img}:imp", check=True).stdout == "made\n"
        imp = json.loads(vm("image", "inspect", f"{img}:imp", check=True).stdout)[0]
        assert imp["Comment"] == "imported" and len(imp["RootFS"]["Layers"]) == 1
        packed = tmp_path / "fs.tar.gz"
        packed.write_bytes(gzip.compress(exported.read_bytes(), compresslevel=1))
        vm("image", "import", str(packed), f"{img}:gz", check=True)
        assert vm("run", "--rm", f"{img}:gz", "cat", "/home/new/f", check=True).stdout == "x\n"

        images_before = vm("images", "-q", "--no-trunc", check=True).stdout
        garbage = tmp_path / "garbage.tar"
        garbage.write_bytes(b"this is not a tar archive" * 100)
        assert "invalid header" in one_line_error(vm("import", str(garbage), f"{img}:bad"))
        assert vm("images", "-q", "--no-trunc", check=True).stdout == images_before
        assert "No such container" in one_line_error(vm("export", "-o", str(tmp_path / "x.tar"), "no-such-container"))
        assert not (tmp_path / "x.tar").exists()
    finally:
        vm("rm", "-f", "-v", n, still)
        for tag in ("v1", "same", "imp", "gz"):
            vm("rmi", f"{img}:{tag}")


def test_pull_output_and_errors(vm: Pydesk) -> None:
    out = vm("pull", "busybox")
    assert out.returncode == 0, out.stderr
    assert "Status: " in out.stdout and out.stdout.splitlines()[-1] == "docker.io/library/busybox:latest"
    # python shares busybox's base layer: that one "Already exists" and is not pulled again
    vm("rmi", "-f", "python")  # whatever an earlier test left
    py = vm("pull", "python", check=True).stdout
    shared = [ln.split(":")[0] for ln in py.splitlines() if ln.endswith(": Already exists")]
    assert shared, py
    for layer in shared:
        assert f"{layer}: Pull complete" not in py and f"{layer}: Pulling fs layer" not in py
    bad = vm("pull", "no-such-image-here")
    assert bad.returncode == 1
    assert "not found" in one_line_error(bad)


def test_errors_are_one_line(vm: Pydesk) -> None:
    for argv in (("stop", "nope-nope"), ("logs", "nope-nope"), ("exec", "nope-nope", "true"),
                 ("inspect", "nope-nope"), ("wait", "nope-nope"), ("start", "nope-nope")):
        proc = vm(*argv)
        assert proc.returncode == 1, argv
        assert "nope-nope" in one_line_error(proc)


def test_system_df(vm: Pydesk) -> None:
    out = vm("system", "df")
    assert out.returncode == 0
    assert [line.split()[0] for line in out.stdout.splitlines()] == ["TYPE", "Images", "Containers", "Local", "Build"]
    rows = [json.loads(line) for line in vm("system", "df", "--format", "json").stdout.splitlines()]
    assert rows[0]["Type"] == "Images" and int(rows[0]["TotalCount"]) >= 1


def test_system_prune_removes_stopped_containers(vm: Pydesk) -> None:
    n = name()
    vm("create", "--name", n, "busybox", "true", check=True)
    declined = vm("system", "prune", input=b"n\n")
    assert declined.returncode == 0
    assert vm("ps", "-a", "-q", "--filter", f"name={n}").stdout.strip()
    out = vm("system", "prune", "-f")
    assert out.returncode == 0 and "Total reclaimed space:" in out.stdout
    assert vm("ps", "-a", "-q", "--filter", f"name={n}").stdout == ""


def test_login_password_stdin(vm: Pydesk) -> None:
    out = vm("login", "-u", "tester", "--password-stdin", "127.0.0.1:5000", input=b"secret\n")
    assert out.returncode == 0 and "Login Succeeded" in out.stdout
    saved = json.loads((vm.home / "config" / "auth.json").read_text())
    assert "127.0.0.1:5000" in saved["auths"]
    assert "non TTY" in one_line_error(vm("login", "-u", "tester", "127.0.0.1:5000"))
    out = vm("logout", "127.0.0.1:5000")
    assert (out.returncode, out.stdout) == (0, "Removing login credentials for 127.0.0.1:5000\n")
    assert "127.0.0.1:5000" not in json.loads((vm.home / "config" / "auth.json").read_text())["auths"]
    again = vm("logout", "127.0.0.1:5000")
    assert (again.returncode, again.stdout) == (0, "Not logged in to 127.0.0.1:5000\n")


def test_tty_without_a_terminal_is_refused(vm: Pydesk) -> None:
    assert "the input device is not a TTY" in one_line_error(vm("run", "--rm", "-it", "busybox", "true"))
