"""`docker top`: the guest's ``ps`` with the caller's options (``-ef`` by default), cut down to
the rows of one container's processes, as dockerd does it (it runs ``ps`` on its host and
keeps the rows whose PID is in the container's cgroup)."""

from __future__ import annotations

import shlex
import subprocess

DEFAULT_ARGS = "-ef"


class TopError(Exception):
    """ps could not be run with these options, or its output has no PID column."""


def processes(pids: set[int], ps_args: str = "") -> dict[str, list]:
    """``{"Titles": [...], "Processes": [[...], ...]}`` for the processes ``pids``."""
    try:
        argv = ["ps", *shlex.split(ps_args or DEFAULT_ARGS)]
    except ValueError as exc:
        raise TopError(f"invalid ps options {ps_args!r}: {exc}") from None
    try:
        out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopError(f"ps: {exc}") from None
    if out.returncode != 0:
        raise TopError(f"ps: {out.stderr.decode(errors='replace').strip() or f'exit status {out.returncode}'}")
    return parse(out.stdout.decode(errors="replace"), pids)


def parse(output: str, pids: set[int]) -> dict[str, list]:
    lines = output.splitlines()
    titles = lines[0].split() if lines else []
    if "PID" not in titles:
        raise TopError("Couldn't find PID field in ps output")
    at = titles.index("PID")
    rows = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) <= at or not fields[at].isdigit() or int(fields[at]) not in pids:
            continue
        # the last column (the command) may hold spaces: what overhangs belongs to it
        rows.append(fields[:len(titles) - 1] + [" ".join(fields[len(titles) - 1:])])
    return {"Titles": titles, "Processes": rows}
