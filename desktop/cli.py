"""The `pydesk` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from desktop import about_cli, commit_cli, docker_context, engine_cli, events_cli, groups_cli, network_cli, watch_cli
from vmkit.errors import AlreadyRunning, ConfigError, ImageError, NotRunning, VMKitError

log = logging.getLogger("pydesk")

EXIT_ERROR = 1


def _console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True, highlight=False)


# --- vm -------------------------------------------------------------------------------
def _apply_overrides(args: argparse.Namespace) -> Any:
    """Settings from the config file with this command's flags applied (and saved)."""
    from vmkit import settings as st
    from vmkit.paths import VMPaths
    from vmkit.spec import PortForward

    current = st.load()
    changes: dict[str, Any] = {}
    if args.cpus is not None:
        changes["cpus"] = args.cpus
    if args.memory is not None:
        changes["memory_mib"] = st.parse_mib(args.memory, what="memory")
    if args.disk is not None:
        changes["disk_gib"] = st.parse_mib(args.disk, what="disk size", default_unit="G") // 1024
        if changes["disk_gib"] < current.disk_gib and _data_disk_exists(args.name):
            raise ConfigError(f"the data disk is {current.disk_gib}G and cannot shrink to {changes['disk_gib']}G",
                              hint=f"a data disk cannot shrink; delete {VMPaths(args.name).data_disk} to start over (its images and containers are lost)")
    if args.accel is not None:
        changes["accel"] = args.accel
    if args.port:
        changes["ports"] = tuple(PortForward.parse(p) for p in args.port)
    if args.dns:
        changes["dns"] = tuple(args.dns)
    if args.restrict_network is not None:
        changes["restrict_network"] = args.restrict_network
    if args.host_service:
        changes["host_services"] = tuple(args.host_service)
    if args.registry_mirror:
        changes["registry_mirrors"] = tuple(args.registry_mirror)
    if args.mirror_only is not None:
        changes["mirror_only"] = args.mirror_only
    if args.share:
        from vmkit.host import host_os
        from vmkit.shares import parse_share

        changes["shares"] = tuple(parse_share(s, host_os()) for s in args.share)
    if args.share_home is not None:
        changes["share_home"] = args.share_home
    if args.share_transport is not None:
        changes["share_transport"] = args.share_transport
    if not changes:
        _check_shares(current)
        return current
    new = dataclasses.replace(current, **changes)
    _check_shares(new)
    st.save(new)
    return new


def _check_shares(settings: Any) -> None:
    """Refuse bad shares here, with the setting named, rather than in the daemon."""
    from vmkit.host import host_os
    from vmkit.vm import vm_shares

    vm_shares(settings, host_os())


def _data_disk_exists(name: str) -> bool:
    from vmkit.paths import VMPaths

    return VMPaths(name).data_disk.exists()


def _ensure_image() -> str:
    """The guest image directory; built on first start where this host can (Linux with
    mmdebstrap)."""
    import platform

    from guest.build import build, load_image
    from guest.recipe import Recipe
    from vmkit.spec import Arch

    recipe = Recipe(Arch.from_machine(platform.machine()))
    try:
        return str(Path(load_image(recipe).kernel).parent)
    except ImageError:
        if not sys.platform.startswith("linux"):
            raise
    with _console().status("building the guest image (first start only)…"):
        return str(build(recipe))


def cmd_vm_start(args: argparse.Namespace) -> int:
    from vmkit.client import DaemonClient, qemu_alive, start_daemon

    client = DaemonClient(args.name)
    if client.reachable():
        raise AlreadyRunning(f"pydesk VM {args.name!r} is already running", hint="see `pydesk vm status`")
    adopt = qemu_alive(args.name)
    image = None
    if not adopt:
        _apply_overrides(args)
        image = _ensure_image()
    console = _console()
    t0 = time.monotonic()
    with console.status("starting the pydesk VM…") as status:
        def on_event(event: dict[str, Any]) -> None:
            msg = event.get("message")
            if msg:
                status.update(f"{msg}…")
                log.debug("%s", msg)

        ready = start_daemon(args.name, on_event, adopt=adopt, debug=args.debug, image_dir=image)
    took = time.monotonic() - t0
    console.print(f"[green]pydesk VM {args.name!r} is running[/] (agent ready in {took:.1f}s, "
                  f"guest {ready.get('guest_release')})")
    console.print(f"[dim]accelerator:[/] {ready.get('accel')} — {ready.get('accel_reason')}")
    return 0


def cmd_vm_stop(args: argparse.Namespace) -> int:
    from vmkit import standby
    from vmkit.client import DaemonClient, ensure_daemon
    from vmkit.paths import VMPaths

    quit_ = getattr(args, "quit", False)
    console = _console()
    if quit_ and not DaemonClient(args.name).reachable():
        released = standby.stop(VMPaths(args.name))
        console.print(f"pydesk VM {args.name!r} is not running" + ("; engine socket released" if released else ""))
        return 0
    client = ensure_daemon(args.name)
    with console.status("stopping the pydesk VM…"):
        reply = client.stop(standby=not quit_)
    console.print(f"pydesk VM {args.name!r} stopped ({reply.get('how')})")
    return 0


def cmd_vm_restart(args: argparse.Namespace) -> int:
    from vmkit.client import DaemonClient

    if DaemonClient(args.name).reachable():
        cmd_vm_stop(args)
    return cmd_vm_start(args)


def _format_status(st: dict[str, Any]) -> str:
    lines = [f"state:        {st.get('state')}"]
    if st.get("state") == "running":
        started = st.get("started_at")
        lines += [
            f"accelerator:  {st.get('accel')} ({st.get('accel_reason')})",
            f"guest:        {st.get('guest_release')} (kernel {st.get('guest_kernel')}, {st.get('boot_layout')} root)",
            f"resources:    {st.get('cpus')} CPUs, {st.get('memory_mib')} MiB memory, {st.get('disk_gib')} GiB disk",
            f"agent:        {'connected' if st.get('agent_connected') else 'not connected'}",
            f"QEMU pid:     {st.get('pid')}",
        ]
        if started:
            lines.append(f"up since:     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}")
        if st.get("ports"):
            lines.append(f"forwards:     {', '.join(st['ports'])}")
    else:
        last = st.get("last_exit") or {}
        if last.get("reason") == "crashed":
            lines.append(f"last run:     crashed — {last.get('detail')} (see `pydesk vm logs`)")
        elif last.get("reason") == "failed":
            lines.append(f"last start:   failed — {last.get('detail')}")
    return "\n".join(lines)


def cmd_vm_status(args: argparse.Namespace) -> int:
    from vmkit.client import DaemonClient, ensure_daemon, qemu_alive
    from vmkit.paths import VMPaths
    from vmkit.status import read_status

    client = DaemonClient(args.name)
    if client.reachable() or qemu_alive(args.name):
        st = ensure_daemon(args.name).status()
    else:
        saved = read_status(VMPaths(args.name))
        st = {"name": args.name, "state": "stopped", "last_exit": saved.get("last_exit")}
    if args.format == "json":
        print(json.dumps(st, indent=2))
    else:
        print(_format_status(st))
    return 0 if st.get("state") == "running" else 3


def cmd_vm_logs(args: argparse.Namespace) -> int:
    from vmkit.paths import VMPaths

    paths = VMPaths(args.name)
    path = paths.daemon_log if args.daemon else paths.console_log
    if not path.exists():
        raise NotRunning(f"no logs yet for VM {args.name!r} ({path})", hint="start it with `pydesk vm start`")
    with open(path, "rb") as f:
        sys.stdout.buffer.write(f.read())
        sys.stdout.flush()
        while args.follow:
            data = f.read()
            if data:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def cmd_vm_shell(args: argparse.Namespace) -> int:
    from desktop import shell
    from vmkit.client import ensure_daemon

    client = ensure_daemon(args.name)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command:
        return shell.run_command(client, command)
    if not sys.stdin.isatty():
        return shell.run_command(client, ["/bin/sh"])
    return shell.interactive(client)


def cmd_guest_build(args: argparse.Namespace) -> int:
    import platform

    from guest.build import build
    from guest.recipe import Recipe
    from vmkit.spec import Arch

    arch = Arch(args.arch) if args.arch else Arch.from_machine(platform.machine())
    print(build(Recipe(arch), force=args.force))
    return 0


# --- parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pydesk", description="Containers on a small, fast Linux VM.")
    p.add_argument("--debug", action="store_true", help="log debug details and show tracebacks")
    p.add_argument("--name", default="default", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    vm = sub.add_parser("vm", help="manage the pydesk VM")
    vms = vm.add_subparsers(dest="vm_command", metavar="ACTION")
    vms.required = True

    def start_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cpus", type=int, help="virtual CPUs (saved in settings)")
        sp.add_argument("--memory", help="memory, e.g. 2G or 1536M (saved)")
        sp.add_argument("--disk", help="data disk size, e.g. 20G (saved; applies when the disk is created)")
        sp.add_argument("--accel", choices=["auto", "kvm", "hvf", "whpx", "tcg"], help="accelerator (saved)")
        sp.add_argument("--port", action="append", metavar="[IP:]HOST:GUEST[/udp]", help="forward a host port into the VM (saved)")
        sp.add_argument("--dns", action="append", metavar="IP", help="DNS server for the VM instead of the host's (saved)")
        sp.add_argument("--restrict-network", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the VM's traffic on this host (saved)")
        sp.add_argument("--host-service", action="append", metavar="GUESTPORT:HOSTPORT",
                        help="let the VM reach 127.0.0.1:HOSTPORT on this host at its own 127.0.0.1:GUESTPORT (saved)")
        sp.add_argument("--registry-mirror", action="append", metavar="REGISTRY=URL", help="a registry mirror (saved)")
        sp.add_argument("--share", action="append", metavar="HOSTPATH[:ro]",
                        help="share a host folder into the VM at the same path (saved; replaces the saved list; "
                             "the home folder is shared too unless --no-share-home)")
        sp.add_argument("--share-home", action=argparse.BooleanOptionalAction, default=None,
                        help="share the home folder into the VM (default: on; saved)")
        sp.add_argument("--share-transport", choices=["auto", "sftp", "virtiofs"],
                        help="how shares reach the VM: virtiofs (Linux, root) or sftp on its own virtio-serial port (saved)")
        sp.add_argument("--mirror-only", action=argparse.BooleanOptionalAction, default=None,
                        help="never fall back from a mirror to the registry itself (saved)")

    s = vms.add_parser("start", help="start the VM")
    start_flags(s)
    s.set_defaults(func=cmd_vm_start)
    s = vms.add_parser("stop", help="stop the VM (clean shutdown)")
    s.add_argument("--quit", action="store_true",
                   help="also release the engine socket (otherwise it answers docker clients "
                        "with \"pydesk VM is not running\")")
    s.set_defaults(func=cmd_vm_stop)
    s = vms.add_parser("restart", help="stop and start the VM")
    start_flags(s)
    s.set_defaults(func=cmd_vm_restart)
    s = vms.add_parser("status", help="show the VM's state (exit 0 running, 3 stopped)")
    s.add_argument("--format", choices=["text", "json"], default="text")
    s.set_defaults(func=cmd_vm_status)
    s = vms.add_parser("logs", help="show the guest console log")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("--daemon", action="store_true", help="show the host daemon's log instead")
    s.set_defaults(func=cmd_vm_logs)
    s = vms.add_parser("shell", help="a root shell in the VM, or run `-- CMD ARGS`")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_vm_shell)

    guest = sub.add_parser("guest", help="the guest image")
    gs = guest.add_subparsers(dest="guest_command", metavar="ACTION")
    gs.required = True
    s = gs.add_parser("build", help="build the guest image from Debian packages")
    s.add_argument("--arch", choices=["x86_64", "aarch64"])
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_guest_build)
    engine_cli.register(sub)
    watch_cli.register(sub)
    commit_cli.register(sub)
    about_cli.register(sub)
    events_cli.register(sub)
    network_cli.register(sub)
    docker_context.register(sub)
    groups_cli.register(sub)  # last: its groups reuse the commands above
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_daemon"]:  # the frozen app re-runs itself as the daemon
        from vmkit.daemon import main as daemon_main

        return daemon_main(argv[1:])
    if argv[:1] == ["_standby"]:  # ... and as the engine socket's standby
        from vmkit.standby import main as standby_main

        return standby_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(name)s: %(message)s")
    if not args.debug:
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except VMKitError as exc:
        if args.debug:
            raise
        print(f"pydesk: error: {exc}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pydesk: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
