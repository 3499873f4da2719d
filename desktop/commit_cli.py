"""`pydesk commit`, `export` and `import`, docker-compatible: a container's changes as a new
image, a container's file system as a tar, and a tar as a one-layer image."""

from __future__ import annotations

import argparse
import json
from typing import Any

from desktop.engine_cli import Fail, command_adder, engine, handles_errors, open_input, write_archive


def split_ref(text: str | None) -> tuple[str | None, str | None]:
    """``REPOSITORY[:TAG]`` as (repository, tag); a ``:`` before the last ``/`` is a port."""
    if not text:
        return None, None
    name, sep, tag = text.rpartition(":")
    if not sep or "/" in tag:
        return text, None
    return name, tag


@handles_errors()
def cmd_commit(args: argparse.Namespace) -> int:
    repo, tag = split_ref(args.repository)
    out = engine(args).api.commit(args.container, repository=repo, tag=tag, message=args.message or None,
                                  author=args.author or None, pause=args.pause, changes=args.change or None)
    print(out["Id"])
    return 0


@handles_errors()
def cmd_export(args: argparse.Namespace) -> int:
    import sys

    if not args.output and sys.stdout.isatty():
        raise Fail("cowardly refusing to save to a terminal. Use the -o flag or redirect")
    api = engine(args).api
    res = api._get(api._url("/containers/{0}/export", args.container), stream=True)
    api._raise_for_status(res)
    write_archive(res, args.output, "export")
    return 0


@handles_errors()
def cmd_import(args: argparse.Namespace) -> int:
    if "://" in args.file:
        raise Fail("importing from a URL is not supported: the VM reaches no outside address; "
                   "download the file and import it from there")
    repo, tag = split_ref(args.repository)
    params: dict[str, Any] = {"fromSrc": "-", "repo": repo, "tag": tag, "message": args.message or None,
                              "changes": args.change or None, "platform": args.platform or None}
    api = engine(args).api
    with open_input(args.file, "import") as data:
        res = api._post(api._url("/images/create"), params={k: v for k, v in params.items() if v is not None},
                        data=data, headers={"Content-Type": "application/tar"}, stream=True, timeout=None)
        api._raise_for_status(res)
        for line in res.iter_lines():
            if not line.strip():
                continue
            msg = json.loads(line)
            if msg.get("error"):
                raise Fail(msg["error"])
            if msg.get("status"):
                print(msg["status"])
    return 0


def register(sub: Any) -> None:
    add = command_adder(sub)

    p = add("commit", cmd_commit, "make an image of a container's changes")
    p.add_argument("-a", "--author", help='e.g. "Jane Doe <jane@example.com>"')
    p.add_argument("-c", "--change", action="append", metavar="INSTRUCTION",
                   help="a Dockerfile instruction for the image (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, "
                        "VOLUME, WORKDIR, ONBUILD, STOPSIGNAL, SHELL)")
    p.add_argument("-m", "--message", help="the commit message")
    p.add_argument("-p", "--pause", action=argparse.BooleanOptionalAction, default=True,
                   help="pause the container while its changes are read (default)")
    p.add_argument("container")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]")
    p = add("export", cmd_export, "write a container's file system as a tar archive")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.add_argument("container")
    p = add("import", cmd_import, "make a one-layer image of a tar archive (plain, gzip, bzip2, xz or zstd)")
    p.add_argument("-c", "--change", action="append", metavar="INSTRUCTION", help="as for commit")
    p.add_argument("-m", "--message", help="the image's comment")
    p.add_argument("--platform", help="os/arch of the image (default: the VM's)")
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("repository", nargs="?", metavar="REPOSITORY[:TAG]")
