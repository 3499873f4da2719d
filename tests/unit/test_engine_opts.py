"""The docker-compatible CLI's pure parts: flag values, the create body, exit codes, output."""

from __future__ import annotations

import argparse
import io
import struct
from pathlib import Path

import pytest

from desktop import engine_cli, engine_opts as opts, engine_stream
from desktop.cli import build_parser
from vmkit.errors import VMKitError


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# --- sizes, cpus, restart ---------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    ("32m", 32 * 1024 ** 2), ("32M", 32 * 1024 ** 2), ("1g", 1024 ** 3), ("1GB", 1024 ** 3),
    ("8192k", 8192 * 1024), ("1.5g", int(1.5 * 1024 ** 3)), ("67108864", 64 * 1024 ** 2), ("64mib", 64 * 1024 ** 2),
])
def test_memory_sizes(value: str, expected: int) -> None:
    assert opts.parse_memory(value) == expected


@pytest.mark.parametrize("value", ["32x", "", "m", "-1m", "1.2.3m"])
def test_bad_memory_sizes(value: str) -> None:
    with pytest.raises(opts.FlagError, match=r'invalid argument .* for "-m, --memory" flag: invalid size'):
        opts.parse_memory(value)


def test_memory_minimum() -> None:
    with pytest.raises(opts.FlagError, match="Minimum memory limit allowed is 6MB"):
        opts.parse_memory("1m")


@pytest.mark.parametrize("value,nano", [("1", 10 ** 9), ("0.5", 5 * 10 ** 8), ("1.5", 15 * 10 ** 8),
                                        ("2.000000001", 2000000001), ("0", 0)])
def test_cpus(value: str, nano: int) -> None:
    assert opts.parse_cpus(value) == nano


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "0.0000000001"])
def test_bad_cpus(value: str) -> None:
    with pytest.raises(opts.FlagError, match='for "--cpus" flag'):
        opts.parse_cpus(value)


@pytest.mark.parametrize("value,policy", [
    ("no", {"Name": "no", "MaximumRetryCount": 0}),
    ("always", {"Name": "always", "MaximumRetryCount": 0}),
    ("unless-stopped", {"Name": "unless-stopped", "MaximumRetryCount": 0}),
    ("on-failure", {"Name": "on-failure", "MaximumRetryCount": 0}),
    ("on-failure:3", {"Name": "on-failure", "MaximumRetryCount": 3}),
])
def test_restart(value: str, policy: dict) -> None:
    assert opts.parse_restart(value) == policy


@pytest.mark.parametrize("value,msg", [
    ("sometimes", "invalid restart policy 'sometimes'"),
    ("always:3", "maximum retry count can only be used with 'on-failure'"),
    ("on-failure:x", "maximum retry count must be an integer"),
    ("on-failure:-1", "cannot be negative"),
])
def test_bad_restart(value: str, msg: str) -> None:
    with pytest.raises(opts.FlagError, match=msg):
        opts.parse_restart(value)


# --- env ---------------------------------------------------------------------------------------
def test_env_items() -> None:
    env = {"HOME": "/home/me"}
    assert opts.env_item("A=1", env) == "A=1"
    assert opts.env_item("A=", env) == "A="
    assert opts.env_item("A=b=c", env) == "A=b=c"
    assert opts.env_item("HOME", env) == "HOME=/home/me"
    assert opts.env_item("UNSET", env) is None
    with pytest.raises(opts.FlagError):
        opts.env_item("=x", env)


def test_env_file(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# comment\n\nA=1\n  B=two words\nC=\"quoted\"\nHOME\nUNSET\nD=x=y\n")
    assert opts.parse_env_file(f, {"HOME": "/h"}) == ["A=1", "B=two words", 'C="quoted"', "HOME=/h", "D=x=y"]


def test_env_file_errors(tmp_path: Path) -> None:
    with pytest.raises(opts.FlagError, match="open .*missing"):
        opts.parse_env_file(tmp_path / "missing", {})
    bad = tmp_path / "bad"
    bad.write_text("BAD KEY=1\n")
    with pytest.raises(opts.FlagError, match="line 1"):
        opts.parse_env_file(bad, {})


def test_env_order_files_then_flags(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("A=file\n")
    assert opts.build_env(["A=flag"], [str(f)], {}) == ["A=file", "A=flag"]


# --- ports, labels -----------------------------------------------------------------------------
def test_publish() -> None:
    exposed, bindings = opts.parse_publish(["8080:80", "127.0.0.1:5353:53/udp", "9000", "[::1]:8443:443"])
    assert exposed == {"80/tcp": {}, "53/udp": {}, "9000/tcp": {}, "443/tcp": {}}
    assert bindings["80/tcp"] == [{"HostIp": "", "HostPort": "8080"}]
    assert bindings["53/udp"] == [{"HostIp": "127.0.0.1", "HostPort": "5353"}]
    assert bindings["9000/tcp"] == [{"HostIp": "", "HostPort": ""}]
    assert bindings["443/tcp"] == [{"HostIp": "::1", "HostPort": "8443"}]


@pytest.mark.parametrize("value", ["abc:80", "80:abc", "1:2:3:4", "80/icmp", ":"])
def test_bad_publish(value: str) -> None:
    with pytest.raises(opts.FlagError):
        opts.parse_publish([value])


def test_labels() -> None:
    assert opts.parse_labels(["a=1", "b", "c=x=y"]) == {"a": "1", "b": "", "c": "x=y"}


# --- exit codes ------------------------------------------------------------------------------
@pytest.mark.parametrize("message,code", [
    ('failed to create task for container: exec: "nosuch": executable file not found in $PATH: unknown', 127),
    ("Error response from daemon: exec: /x: no such file or directory", 127),
    ("failed to create task for container: open executable: permission denied: unknown", 126),
    ("exec /etc: is a directory", 126),
    ("No such image: x:latest", 125),
    ("cgroup: something else", 125),
])
def test_start_error_exit_codes(message: str, code: int) -> None:
    assert opts.start_error_exit_code(message) == code


# --- the create body --------------------------------------------------------------------------
def test_run_flags_to_create_body(tmp_path: Path) -> None:
    envf = tmp_path / "e"
    envf.write_text("FROM_FILE=1\n")
    args = parse("run", "-d", "--rm", "-e", "A=1", "--env-file", str(envf), "-w", "/w", "-u", "1000:1000",
                 "--name", "web", "--entrypoint", "/bin/sh", "-l", "k=v", "--read-only", "--init",
                 "-m", "32m", "--cpus", "1.5", "--pids-limit", "20", "--network", "none", "--hostname", "h",
                 "-v", "/a:/b:ro", "-v", "/anon", "-p", "8080:80", "busybox", "-c", "echo hi")
    assert args.name == "default"  # the VM; --name after `run` names the container
    assert args.container_name == "web"
    cfg = engine_cli.container_config(args, environ={})
    assert cfg["Image"] == "busybox"
    assert cfg["Cmd"] == ["-c", "echo hi"]
    assert cfg["Entrypoint"] == ["/bin/sh"]
    assert cfg["Env"] == ["FROM_FILE=1", "A=1"]
    assert (cfg["WorkingDir"], cfg["User"], cfg["Hostname"]) == ("/w", "1000:1000", "h")
    assert cfg["Labels"] == {"k": "v"}
    assert cfg["ExposedPorts"] == {"80/tcp": {}}
    assert cfg["AttachStdout"] is False and cfg["Tty"] is False
    host = cfg["HostConfig"]
    assert host["Memory"] == 32 * 1024 ** 2
    assert host["NanoCpus"] == 1_500_000_000
    assert host["PidsLimit"] == 20
    assert host["AutoRemove"] is True and host["ReadonlyRootfs"] is True and host["Init"] is True
    assert host["NetworkMode"] == "none"
    assert host["Binds"] == ["/a:/b:ro"]
    assert cfg["Volumes"] == {"/anon": {}}  # -v with no source: an anonymous volume, as docker's CLI sends it
    assert host["PortBindings"] == {"80/tcp": [{"HostIp": "", "HostPort": "8080"}]}


def test_runtime_flags_to_create_body() -> None:
    args = parse("run", "--cap-add", "NET_ADMIN", "--cap-drop", "ALL", "--group-add", "audio", "--group-add", "29",
                 "--sysctl", "net.ipv4.ip_forward=1", "--ulimit", "nofile=100:200", "--ulimit", "core=-1",
                 "--tmpfs", "/run:size=1m,exec", "--tmpfs", "/x", "--shm-size", "1m", "-c", "512",
                 "--memory-swap", "-1", "--expose", "7000-7001/udp", "--stop-signal", "SIGQUIT", "--stop-timeout", "3",
                 "--security-opt", "seccomp=unconfined", "busybox")
    cfg = engine_cli.container_config(args, environ={})
    host = cfg["HostConfig"]
    assert (host["CapAdd"], host["CapDrop"], host["GroupAdd"]) == (["NET_ADMIN"], ["ALL"], ["audio", "29"])
    assert host["SecurityOpt"] == ["seccomp=unconfined"]
    assert host["Sysctls"] == {"net.ipv4.ip_forward": "1"}
    assert host["Ulimits"] == [{"Name": "nofile", "Soft": 100, "Hard": 200}, {"Name": "core", "Soft": -1, "Hard": -1}]
    assert host["Tmpfs"] == {"/run": "size=1m,exec", "/x": ""}
    assert (host["ShmSize"], host["CpuShares"], host["MemorySwap"]) == (1024 ** 2, 512, -1)
    assert cfg["ExposedPorts"] == {"7000/udp": {}, "7001/udp": {}}
    assert (cfg["StopSignal"], cfg["StopTimeout"]) == ("SIGQUIT", 3)
    for flags, message in ((("--ulimit", "nofile"), "invalid ulimit argument: nofile"),
                           (("--ulimit", "nofile=a:b"), "invalid ulimit argument"),
                           (("--sysctl", "noequals"), "is not a KEY=VALUE pair"),
                           (("--expose", "http"), "invalid range format for --expose")):
        with pytest.raises(opts.FlagError, match=message):
            engine_cli.container_config(parse("run", *flags, "busybox"), environ={})


def test_command_after_image_is_not_parsed_as_flags() -> None:
    args = parse("run", "--rm", "busybox", "ls", "-l", "-e", "--name", "x")
    assert args.image == "busybox" and args.command == ["ls", "-l", "-e", "--name", "x"]
    assert args.env is None and args.container_name is None


def test_it_and_attached_defaults() -> None:
    args = parse("run", "-it", "busybox", "sh")
    cfg = engine_cli.container_config(args, environ={})
    assert cfg["Tty"] and cfg["OpenStdin"] and cfg["AttachStdin"] and cfg["StdinOnce"]
    assert "Entrypoint" not in cfg and "HostConfig" in cfg


def test_empty_entrypoint_resets_it() -> None:
    assert engine_cli.container_config(parse("run", "--entrypoint", "", "busybox"), {})["Entrypoint"] == [""]


def test_rm_conflicts_with_restart() -> None:
    with pytest.raises(opts.FlagError, match="Conflicting options: --restart and --rm"):
        engine_cli.container_config(parse("run", "--rm", "--restart", "always", "busybox"), {})


def test_bad_flag_value_in_run_is_exit_125(capsys: pytest.CaptureFixture[str]) -> None:
    from desktop.cli import main

    assert main(["run", "-m", "lots", "busybox"]) == 125
    err = capsys.readouterr().err
    assert err.strip() == 'pydesk: error: invalid argument "lots" for "-m, --memory" flag: invalid size: \'lots\''


def test_commands_fail_in_one_line_without_a_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from desktop.cli import main

    monkeypatch.setenv("PYDESK_HOME", str(tmp_path))
    for argv in (["ps"], ["logs", "x"], ["images"], ["stop", "x"], ["system", "df"], ["top", "x"], ["stats"],
                 ["info"], ["system", "info"], ["image", "prune", "-f"], ["container", "ls"], ["version"],
                 ["diff", "x"], ["history", "x"], ["image", "history", "x"], ["update", "-m", "64m", "x"],
                 ["events", "--since", "10m"]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert err == ("pydesk: error: pydesk VM 'default' is not running "
                       "(hint: start it with `pydesk vm start`)\n"), argv
        if argv == ["version"]:  # the client's half still shows, as docker's does
            assert out.startswith("Client: pydesk\n Version:           ") and "Server" not in out, out


def test_every_command_is_registered() -> None:
    for cmd in ("pull run create start stop kill restart rm ps logs exec attach wait inspect images rmi "
                "tag login save load").split():
        assert parse(*([cmd] + {"run": ["x"], "create": ["x"], "pull": ["x"], "ps": [], "images": [],
                                "logs": ["x"], "exec": ["x", "true"], "attach": ["x"], "inspect": ["x"],
                                "tag": ["a", "b"], "login": [], "load": [], "save": ["x"]}.get(cmd, ["x"]))).func
    assert parse("system", "df").func is engine_cli.cmd_system_df
    assert parse("system", "prune", "-f").force
    # docker's management forms are the short forms, with their flags
    for group, member, short in (("image", "ls", "images"), ("image", "rm", "rmi"), ("container", "ls", "ps"),
                                 ("container", "rm", "rm"), ("container", "stats", "stats")):
        assert parse(group, member, *(["x"] if member == "rm" else [])).func is parse(short, *(["x"] if short in (
            "rmi", "rm") else [])).func
    assert parse("container", "ls", "-a", "-q").all and parse("image", "rm", "-f", "x").force
    assert parse("inspect", "x").type is None  # the groups' inspect does not change the short form's
    assert parse("image", "inspect", "x").type is None and parse("container", "inspect", "x").type is None


# --- references, time, output -----------------------------------------------------------------
def test_refs() -> None:
    assert engine_cli.full_ref("busybox") == "busybox:latest"
    assert engine_cli.full_ref("127.0.0.1:5000/x/y") == "127.0.0.1:5000/x/y:latest"
    assert engine_cli.canonical("busybox") == "docker.io/library/busybox:latest"
    assert engine_cli.canonical("me/app:1") == "docker.io/me/app:1"
    assert engine_cli.canonical("localhost:5000/app") == "localhost:5000/app:latest"
    assert engine_cli.canonical("x@sha256:" + "a" * 64) == "docker.io/library/x@sha256:" + "a" * 64


def test_since() -> None:
    assert opts.parse_since("10m", now=1000.0) == "400"
    assert opts.parse_since("1h30m", now=10000.0) == "4600"
    assert opts.parse_since("1700000000") == "1700000000"
    assert opts.parse_since("2024-01-02T00:00:00Z") == "1704153600"
    with pytest.raises(opts.FlagError):
        opts.parse_since("yesterday")


def test_human_units() -> None:
    assert opts.human_size(1990000) == "1.99MB"
    assert opts.human_size(0) == "0B"
    assert opts.human_size(11_900_000) == "11.9MB"
    assert opts.bytes_size(593920) == "580KiB" and opts.bytes_size(67108864) == "64MiB"
    assert opts.bytes_size(2678784) == "2.555MiB" and opts.bytes_size(0) == "0B"  # as docker stats shows them
    assert opts.human_duration(0.2) == "Less than a second"
    assert opts.human_duration(90) == "About a minute"
    assert opts.human_duration(14 * 60) == "14 minutes"
    assert opts.human_duration(3 * 365 * 86400) == "3 years"


def test_table_and_templates() -> None:
    assert opts.table([["A", "BB"], ["ccc", "d"]]) == "A     BB\nccc   d"
    obj = {"Names": "web", "State": {"ExitCode": 3}, "Labels": {"a": "1"}}
    assert opts.render_template("{{.Names}}\\t{{.State.ExitCode}}", obj) == "web\t3"
    assert opts.render_template("{{json .Labels}}", obj) == '{"a":"1"}'
    with pytest.raises(VMKitError):
        opts.render_template("{{.Nope}}", obj)


def test_ps_row_and_ports() -> None:
    c = {"Id": "a" * 64, "Names": ["/web"], "Image": "nginx", "Command": "nginx -g daemon off; and more",
         "Created": 100, "State": "running", "Status": "Up 2 minutes", "Labels": {"k": "v"},
         "Ports": [{"IP": "127.0.0.1", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"},
                   {"PrivatePort": 53, "Type": "udp"}]}
    row = engine_cli.ps_row(c, now=220)
    assert row["ID"] == "a" * 12 and row["Names"] == "web"
    assert row["Command"] == '"nginx -g daemon off…"'
    assert row["Ports"] == "127.0.0.1:8080->80/tcp, 53/udp"
    assert row["RunningFor"] == "2 minutes ago"
    assert row["Labels"] == "k=v"


# --- streams ----------------------------------------------------------------------------------
def test_demultiplexing_frames() -> None:
    data = (struct.pack(">BxxxL", 1, 3) + b"out" + struct.pack(">BxxxL", 2, 3) + b"err"
            + struct.pack(">BxxxL", 1, 0) + struct.pack(">BxxxL", 1, 1) + b"!")
    buf = io.BytesIO(data)
    out, err = io.BytesIO(), io.BytesIO()
    engine_stream.copy_frames(engine_stream.frames(buf.read, tty=False), out, err)
    assert out.getvalue() == b"out!" and err.getvalue() == b"err"
    raw = io.BytesIO(b"tty bytes")
    assert list(engine_stream.frames(raw.read, tty=True)) == [(1, b"tty bytes")]


def test_pull_plain_output() -> None:
    events = iter([{"status": "Pulling from library/busybox", "id": "latest"},
                   {"status": "Pulling fs layer", "id": "abc"},
                   {"status": "Downloading", "progressDetail": {"current": 1, "total": 2}, "id": "abc"},
                   {"status": "Pull complete", "id": "abc"},
                   {"status": "Status: Downloaded newer image for busybox:latest"}])
    out = io.StringIO()
    assert engine_stream._pull_plain(events, out) is None
    assert out.getvalue() == ("latest: Pulling from library/busybox\nabc: Pulling fs layer\nabc: Pull complete\n"
                              "Status: Downloaded newer image for busybox:latest\n")
    err = iter([{"status": "Pulling from x", "id": "latest"}, {"error": "manifest unknown", "errorDetail": {}}])
    assert engine_stream._pull_plain(err, io.StringIO()) == "manifest unknown"


def test_pull_fancy_display_returns_errors() -> None:
    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    events = iter([{"status": "Pulling from library/busybox", "id": "latest"},
                   {"status": "Downloading", "progressDetail": {"current": 5, "total": 10}, "id": "abc"},
                   {"status": "Pull complete", "id": "abc"},
                   {"error": "boom"}])
    assert engine_stream._pull_fancy(events, console) == "boom"
