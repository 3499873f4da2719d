"""docker's management commands, `pydesk image ...` and `pydesk container ...`: the same
commands as the short forms (`image ls` is `images`, `container rm` is `rm`), with their
flags copied from those parsers, plus `image prune` and `container prune`."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from desktop import engine_opts as opts
from desktop.engine_cli import _section, cmd_inspect, confirm, engine, handles_errors, image_prune_lines

#: (name in the group, the top-level command it is, aliases)
IMAGE = (("ls", "images", ["list"]), ("rm", "rmi", ["remove"]), ("inspect", "inspect", []), ("tag", "tag", []),
         ("pull", "pull", []), ("save", "save", []), ("load", "load", []), ("history", "history", []),
         ("import", "import", []))
CONTAINER = (("ls", "ps", ["list", "ps"]), ("rm", "rm", ["remove"]), ("inspect", "inspect", []),
             *((n, n, []) for n in ("run", "create", "start", "stop", "restart", "kill", "wait", "attach",
                                    "logs", "exec", "top", "stats", "pause", "unpause", "rename", "port", "cp",
                                    "diff", "update", "commit", "export")))


@handles_errors()
def cmd_image_prune(args: argparse.Namespace) -> int:
    filters = opts.filters(args.filter)  # a malformed flag is refused before anything is asked
    filters["dangling"] = ["false" if args.all else "true"]
    if not args.force and not confirm(
            "WARNING! This will remove all images without at least one container associated to them."
            if args.all else "WARNING! This will remove all dangling images."):
        return 0
    out = engine(args).api.prune_images(filters=filters)
    _section("Deleted Images", image_prune_lines(out))
    print(f"Total reclaimed space: {opts.human_size(out.get('SpaceReclaimed') or 0)}")
    return 0


@handles_errors()
def cmd_container_prune(args: argparse.Namespace) -> int:
    filters = opts.filters(args.filter) or None
    if not args.force and not confirm("WARNING! This will remove all stopped containers."):
        return 0
    out = engine(args).api.prune_containers(filters=filters)
    _section("Deleted Containers", out.get("ContainersDeleted"))
    print(f"Total reclaimed space: {opts.human_size(out.get('SpaceReclaimed') or 0)}")
    return 0


def _group(sub: Any, name: str, help: str, members: tuple[tuple[str, str, list[str]], ...],
           kind: str) -> Any:
    group = sub.add_parser(name, help=help, description=help)
    gsub = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    for member, source, aliases in members:
        parent = sub.choices[source]
        p = gsub.add_parser(member, parents=[parent], conflict_handler="resolve", aliases=aliases,
                            help=parent.description, description=parent.description)
        if member == "inspect":  # (not set_defaults(type=...): the --type action is the parent's own object)
            p.set_defaults(func=functools.partial(_inspect_as, kind))
    return gsub


def _inspect_as(kind: str, args: argparse.Namespace) -> int:
    args.type = args.type or kind
    return cmd_inspect(args)


def register(sub: Any) -> None:
    images = _group(sub, "image", "manage images", IMAGE, "image")
    p = images.add_parser("prune", help="remove unused images", description="remove unused images")
    p.add_argument("-a", "--all", action="store_true", help="all images without a container, not just dangling ones")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="until=<time>, label=<key>[=<value>]")
    p.set_defaults(func=cmd_image_prune)
    containers = _group(sub, "container", "manage containers", CONTAINER, "container")
    p = containers.add_parser("prune", help="remove all stopped containers", description="remove all stopped containers")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("--filter", action="append", metavar="KEY=VALUE", help="until=<time>, label=<key>[=<value>]")
    p.set_defaults(func=cmd_container_prune)
