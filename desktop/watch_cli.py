"""`pydesk top`, `stats`, `diff` and `history`: what runs in containers, what it uses and what
it changed, and what made an image; docker-compatible.

stats works as docker's CLI does on the engine's samples: the CPU percentage is the container's
CPU time over all CPUs' time between two samples a second apart, times the CPUs (so one busy
thread reads ~100 %); memory is the usage less the inactive page cache, against the limit;
network and block I/O are totals since the start.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from desktop import engine_opts as opts
from desktop.engine_cli import _print_formatted, command_adder, engine, handles_errors

INTERVAL = 1.0  # seconds between samples, as docker's


@handles_errors()
def cmd_top(args: argparse.Namespace) -> int:
    client = engine(args)
    out = client.api.top(args.container, ps_args=" ".join(args.ps_args) or None)
    print(opts.table([list(out.get("Titles") or []), *[list(p) for p in out.get("Processes") or []]]))
    return 0


@handles_errors()
def cmd_diff(args: argparse.Namespace) -> int:
    changes = engine(args).api.diff(args.container) or []
    for change in changes:
        print(f"{'CAD'[change.get('Kind', 0)] if change.get('Kind') in (0, 1, 2) else '?'} {change.get('Path')}")
    return 0


@handles_errors()
def cmd_history(args: argparse.Namespace) -> int:
    now = time.time()
    rows = []
    for entry in engine(args).api.history(args.image):
        image_id = str(entry.get("Id") or "<missing>")
        created = int(entry.get("Created") or 0)
        by = str(entry.get("CreatedBy") or "")
        rows.append({
            "ID": image_id if args.no_trunc or image_id == "<missing>" else image_id.removeprefix("sha256:")[:12],
            "CreatedSince": f"{opts.human_duration(now - created)} ago" if args.human else str(created),
            "CreatedBy": by if args.no_trunc else opts.truncate(by, 45),
            "Size": opts.human_size(entry.get("Size") or 0) if args.human else str(entry.get("Size") or 0),
            "Comment": str(entry.get("Comment") or ""),
        })
    if args.quiet:
        print("\n".join(r["ID"] for r in rows))
        return 0
    if args.format:
        return _print_formatted(rows, args.format)
    print(opts.table([["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
                      *[[r["ID"], r["CreatedSince"], r["CreatedBy"], r["Size"], r["Comment"]] for r in rows]]))
    return 0


def cpu_percent(cur: dict[str, Any], pre: dict[str, Any] | None) -> float:
    if not pre:
        return 0.0
    c, p = cur.get("cpu_stats") or {}, pre.get("cpu_stats") or {}
    used = ((c.get("cpu_usage") or {}).get("total_usage") or 0) - ((p.get("cpu_usage") or {}).get("total_usage") or 0)
    system = (c.get("system_cpu_usage") or 0) - (p.get("system_cpu_usage") or 0)
    if used <= 0 or system <= 0:
        return 0.0
    return used / system * (c.get("online_cpus") or 1) * 100.0


def row(cur: dict[str, Any], pre: dict[str, Any] | None, info: dict[str, Any], no_trunc: bool) -> dict[str, str]:
    mem = cur.get("memory_stats") or {}
    usage, limit = mem.get("usage") or 0, mem.get("limit") or 0
    inactive = (mem.get("stats") or {}).get("inactive_file") or 0
    used = usage - inactive if inactive < usage else usage
    nets = (cur.get("networks") or {}).values()
    io = (cur.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
    read = sum(e.get("value") or 0 for e in io if str(e.get("op")).lower() == "read")
    written = sum(e.get("value") or 0 for e in io if str(e.get("op")).lower() == "write")
    cid = info["Id"] if no_trunc else info["Id"][:12]
    return {
        "Container": info.get("_asked") or cid, "ID": cid, "Name": info["Name"].lstrip("/"),
        "CPUPerc": f"{cpu_percent(cur, pre):.2f}%",
        "MemUsage": f"{opts.bytes_size(used)} / {opts.bytes_size(limit)}",
        "MemPerc": f"{(used / limit * 100.0) if limit else 0.0:.2f}%",
        "NetIO": f"{opts.human_size(sum(n.get('rx_bytes') or 0 for n in nets))} / "
                 f"{opts.human_size(sum(n.get('tx_bytes') or 0 for n in nets))}",
        "BlockIO": f"{opts.human_size(read)} / {opts.human_size(written)}",
        "PIDs": str((cur.get("pids_stats") or {}).get("current") or 0),
    }


HEADS = [("CONTAINER ID", "ID"), ("NAME", "Name"), ("CPU %", "CPUPerc"), ("MEM USAGE / LIMIT", "MemUsage"),
         ("MEM %", "MemPerc"), ("NET I/O", "NetIO"), ("BLOCK I/O", "BlockIO"), ("PIDS", "PIDs")]


def _targets(api: Any, args: argparse.Namespace, named: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The containers to show: those named (looked up once, before the first refresh), else
    every running one (or every one, ``-a``) as listed at this refresh."""
    if args.containers:
        return named
    return [{"Id": c["Id"], "Name": (c.get("Names") or [""])[0]} for c in api.containers(all=args.all)]


@handles_errors()
def cmd_stats(args: argparse.Namespace) -> int:
    import docker.errors

    client = engine(args)
    api = client.api
    pre: dict[str, dict[str, Any]] = {}
    fancy = not args.no_stream and sys.stdout.isatty() and not args.format

    def sample(info: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return api.stats(info["Id"], stream=False, one_shot=True)
        except docker.errors.NotFound:
            return None  # removed meanwhile: no longer shown

    named = [{"Id": (info := api.inspect_container(n))["Id"], "Name": info["Name"], "_asked": n}
             for n in args.containers]
    while True:
        targets = _targets(api, args, named)
        if not pre:  # the first figures need a sample a second before them
            pre = {t["Id"]: s for t in targets if (s := sample(t)) is not None}
            time.sleep(INTERVAL)
        rows, now = [], {}
        for t in targets:
            cur = sample(t)
            if cur is None:
                continue
            rows.append(row(cur, pre.get(t["Id"]), t, args.no_trunc))
            now[t["Id"]] = cur
        pre = now
        _show(rows, args.format, clear=fancy)
        if args.no_stream:
            return 0
        sys.stdout.flush()
        time.sleep(INTERVAL)


def _show(rows: list[dict[str, str]], fmt: str | None, *, clear: bool) -> None:
    if clear:
        print("\033[2J\033[H", end="")
    if fmt:
        _print_formatted(rows, fmt)
        return
    print(opts.table([[h for h, _ in HEADS], *[[r[k] for _, k in HEADS] for r in rows]]))


def register(sub: Any) -> None:
    add = command_adder(sub)

    p = add("top", cmd_top, "show a container's processes")
    p.add_argument("container")
    p.add_argument("ps_args", nargs=argparse.REMAINDER, metavar="PS_OPTIONS", help="options for ps (default -ef)")
    p = add("stats", cmd_stats, "show containers' resource use, live")
    p.add_argument("-a", "--all", action="store_true", help="all containers, not just running ones")
    p.add_argument("--no-stream", action="store_true", help="one table, then exit")
    p.add_argument("--format", help="json, or a template like '{{.Name}} {{.CPUPerc}}'")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("containers", nargs="*", metavar="CONTAINER")
    p = add("diff", cmd_diff, "list what a container changed in its file system (A added, C changed, D deleted)")
    p.add_argument("container")
    p = add("history", cmd_history, "show how an image was made, newest step first")
    p.add_argument("-H", "--human", action=argparse.BooleanOptionalAction, default=True,
                   help="sizes and times for people (default)")
    p.add_argument("-q", "--quiet", action="store_true", help="only IDs")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("--format", help="json, or a template like '{{.CreatedBy}}'")
    p.add_argument("image")
