"""`pydesk events`: the engine's events as they happen (or between ``--since`` and ``--until``),
one line each in docker's layout, or through ``--format``."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from desktop import engine_opts as opts
from desktop.engine_cli import engine, handles_errors


def line(ev: dict[str, Any]) -> str:
    """docker's layout: ``TIME TYPE ACTION ID (key=value, ...)``, the time in UTC to the ns."""
    nanos = int(ev.get("timeNano") or int(ev.get("time") or 0) * 1_000_000_000)
    secs, ns = divmod(nanos, 1_000_000_000)
    when = datetime.fromtimestamp(secs, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"
    actor = ev.get("Actor") or {}
    attrs = actor.get("Attributes") or {}
    tail = f" ({', '.join(f'{k}={v}' for k, v in sorted(attrs.items()))})" if attrs else ""
    return f"{when} {ev.get('Type')} {ev.get('Action')} {actor.get('ID', '')}{tail}"


@handles_errors()
def cmd_events(args: argparse.Namespace) -> int:
    since = opts.parse_since(args.since) if args.since else None
    until = opts.parse_since(args.until) if args.until else None
    api = engine(args).api
    template = "{{json .}}" if args.format == "json" else args.format
    for ev in api.events(since=since, until=until, filters=opts.filters(args.filter) or None, decode=True):
        print(opts.render_template(template, ev) if template else line(ev), flush=True)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("events", help="show the engine's events as they happen",
                       description="show the engine's events as they happen")
    p.add_argument("--since", help="from this time: 10m, 2024-01-02T13:00:00Z or a unix time")
    p.add_argument("--until", help="up to this time (without it, until interrupted)")
    p.add_argument("-f", "--filter", action="append", metavar="KEY=VALUE",
                   help="type=, event=, container=, image=, label=")
    p.add_argument("--format", help="json, or a template like '{{.Action}} {{.Actor.Attributes.name}}'")
    p.set_defaults(func=cmd_events)
