"""`pydesk network ...` and `pydesk port`: docker-compatible, on docker-py like the rest."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from desktop import engine_opts as opts
from desktop.engine_cli import Fail, _print_formatted, confirm, engine, handles_errors


@handles_errors()
def cmd_port(args: argparse.Namespace) -> int:
    client = engine(args)
    info = client.api.inspect_container(args.container)
    ports: dict[str, Any] = (info.get("NetworkSettings") or {}).get("Ports") or {}
    if args.private:
        key = args.private if "/" in args.private else f"{args.private}/tcp"
        binds = ports.get(key)
        if not binds:
            raise Fail(f"No public port '{key}' published for {args.container}")
        for b in binds:
            print(f"{b['HostIp']}:{b['HostPort']}")
        return 0
    for key, binds in sorted(ports.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0])):
        for b in binds or []:
            print(f"{key} -> {b['HostIp']}:{b['HostPort']}")
    return 0


@handles_errors()
def cmd_network_create(args: argparse.Namespace) -> int:
    client = engine(args)
    ipam = None
    if args.subnet:
        import docker.types

        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=args.subnet)])
    net = client.api.create_network(args.network, driver=args.driver, internal=args.internal,
                                    labels=opts.parse_labels(args.label or []) or None, ipam=ipam,
                                    check_duplicate=True)
    print(net["Id"])
    return 0


def _rows(nets: list[dict[str, Any]], no_trunc: bool) -> list[dict[str, Any]]:
    return [{"ID": n["Id"] if no_trunc else n["Id"][:12], "Name": n["Name"], "Driver": n["Driver"],
             "Scope": n["Scope"], "Internal": str(n.get("Internal", False)).lower(),
             "Labels": ",".join(f"{k}={v}" for k, v in (n.get("Labels") or {}).items())} for n in nets]


@handles_errors()
def cmd_network_ls(args: argparse.Namespace) -> int:
    client = engine(args)
    nets = sorted(client.api.networks(filters=opts.filters(args.filter) or None), key=lambda n: n["Name"])
    rows = _rows(nets, args.no_trunc)
    if args.quiet:
        for r in rows:
            print(r["ID"])
        return 0
    if args.format:
        return _print_formatted(rows, args.format)
    print(opts.table([["NETWORK ID", "NAME", "DRIVER", "SCOPE"]] +
                     [[r["ID"], r["Name"], r["Driver"], r["Scope"]] for r in rows]))
    return 0


@handles_errors()
def cmd_network_rm(args: argparse.Namespace) -> int:
    import docker.errors

    from desktop.engine_cli import api_message, error

    client = engine(args)
    failed = False
    for name in args.networks:
        try:
            client.api.remove_network(name)
            print(name)
        except docker.errors.APIError as exc:
            error(api_message(exc))
            failed = True
    return 1 if failed else 0


@handles_errors()
def cmd_network_inspect(args: argparse.Namespace) -> int:
    client = engine(args)
    found = [client.api.inspect_network(n) for n in args.networks]
    if args.format:
        return _print_formatted(found, args.format)
    print(json.dumps(found, indent=4))
    return 0


@handles_errors()
def cmd_network_connect(args: argparse.Namespace) -> int:
    client = engine(args)
    client.api.connect_container_to_network(args.container, args.network, aliases=args.alias or None,
                                            ipv4_address=args.ip)
    return 0


@handles_errors()
def cmd_network_disconnect(args: argparse.Namespace) -> int:
    client = engine(args)
    client.api.disconnect_container_from_network(args.container, args.network, force=args.force)
    return 0


@handles_errors()
def cmd_network_prune(args: argparse.Namespace) -> int:
    flt = opts.filters(args.filter) or None
    if not args.force and not confirm("WARNING! This will remove all custom networks not used by at least one "
                                      "container."):
        return 0
    client = engine(args)
    out = client.api.prune_networks(filters=flt)
    deleted = out.get("NetworksDeleted") or []
    if deleted:
        print("Deleted Networks:")
        for n in deleted:
            print(n)
    return 0


def register(sub: Any) -> None:
    def add(parent: Any, name: str, func: Callable[[argparse.Namespace], int], help: str,
            **kw: Any) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p

    p = add(sub, "port", cmd_port, "list a container's published ports")
    p.add_argument("container")
    p.add_argument("private", nargs="?", metavar="PRIVATE_PORT[/PROTO]")

    net = sub.add_parser("network", help="manage networks", description="manage networks")
    ns = net.add_subparsers(dest="network_command", metavar="COMMAND", required=True)
    p = add(ns, "create", cmd_network_create, "create a network")
    p.add_argument("-d", "--driver", default="bridge")
    p.add_argument("--subnet", help="subnet in CIDR form, e.g. 172.30.0.0/16")
    p.add_argument("--internal", action="store_true", help="no access to the outside")
    p.add_argument("--label", action="append", metavar="KEY[=VALUE]")
    p.add_argument("network", metavar="NETWORK")
    p = add(ns, "ls", cmd_network_ls, "list networks", aliases=["list"])
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("-f", "--filter", action="append")
    p.add_argument("--format")
    p.add_argument("--no-trunc", action="store_true")
    p = add(ns, "rm", cmd_network_rm, "remove networks", aliases=["remove"])
    p.add_argument("networks", nargs="+", metavar="NETWORK")
    p = add(ns, "inspect", cmd_network_inspect, "show networks in detail")
    p.add_argument("-f", "--format")
    p.add_argument("networks", nargs="+", metavar="NETWORK")
    p = add(ns, "connect", cmd_network_connect, "connect a container to a network")
    p.add_argument("--alias", action="append")
    p.add_argument("--ip")
    p.add_argument("network", metavar="NETWORK")
    p.add_argument("container", metavar="CONTAINER")
    p = add(ns, "disconnect", cmd_network_disconnect, "disconnect a container from a network")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("network", metavar="NETWORK")
    p.add_argument("container", metavar="CONTAINER")
    p = add(ns, "prune", cmd_network_prune, "remove all unused networks")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="until=TIME, label=KEY[=VALUE] or label!=…")
