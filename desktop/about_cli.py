"""`pydesk version` and `pydesk info`: what runs, in docker's shape.

``version`` shows the client part even when the VM is not running, then says so in one line
and exits 1, as docker does when its daemon is down.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from typing import Any

from desktop import engine_opts as opts
from desktop.engine_cli import _print_formatted, engine, handles_errors

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def client_info() -> dict[str, str]:
    from agent.api import API_VERSION

    machine = platform.machine().lower()
    return {"Platform": "pydesk", "Version": importlib.metadata.version("pydesk"), "ApiVersion": API_VERSION,
            "PythonVersion": platform.python_version(), "Os": sys.platform.replace("win32", "windows"),
            "Arch": _ARCH.get(machine, machine)}


@handles_errors()
def cmd_version(args: argparse.Namespace) -> int:
    import docker.errors

    from vmkit.errors import VMKitError

    client = client_info()
    try:
        server: dict[str, Any] | None = engine(args).api.version()
        failure: BaseException | None = None
    except (VMKitError, docker.errors.DockerException, OSError) as exc:  # the client half is still worth
        server, failure = None, exc                                       # showing, as docker does
    if args.format:
        _print_formatted([{"Client": client, "Server": server}], args.format)
    else:
        lines = [f"Client: {client['Platform']}",
                 f" Version:           {client['Version']}",
                 f" API version:       {client['ApiVersion']}",
                 f" Python version:    {client['PythonVersion']}",
                 f" OS/Arch:           {client['Os']}/{client['Arch']}"]
        if server is not None:
            lines += ["", f"Server: {(server.get('Platform') or {}).get('Name') or 'pydesk'} engine (in the VM)",
                      f" Version:           {server.get('Version')}",
                      f" API version:       {server.get('ApiVersion')} (minimum version {server.get('MinAPIVersion')})",
                      f" Python version:    {str(server.get('GoVersion', '')).removeprefix('python')}",
                      f" OS/Arch:           {server.get('Os')}/{server.get('Arch')}",
                      f" Kernel Version:    {server.get('KernelVersion')}"]
        print("\n".join(lines))
    if failure is not None:
        sys.stdout.flush()
        raise failure
    return 0


@handles_errors()
def cmd_info(args: argparse.Namespace) -> int:
    info = engine(args).api.info()
    if args.format:
        return _print_formatted([info], args.format)
    mirrors = (info.get("RegistryConfig") or {}).get("Mirrors") or []
    lines = [
        "Server:",
        f" Containers: {info.get('Containers', 0)}",
        f"  Running: {info.get('ContainersRunning', 0)}",
        f"  Paused: {info.get('ContainersPaused', 0)}",
        f"  Stopped: {info.get('ContainersStopped', 0)}",
        f" Images: {info.get('Images', 0)}",
        f" Server Version: {info.get('ServerVersion')}",
        f" Storage Driver: {info.get('Driver')}",
        f" Logging Driver: {info.get('LoggingDriver')}",
        f" Cgroup Driver: {info.get('CgroupDriver')}",
        f" Cgroup Version: {info.get('CgroupVersion')}",
        f" Runtimes: {' '.join(sorted(info.get('Runtimes') or {}))}",
        f" Default Runtime: {info.get('DefaultRuntime')}",
        f" Kernel Version: {info.get('KernelVersion')}",
        f" Operating System: {info.get('OperatingSystem')}",
        f" OSType: {info.get('OSType')}",
        f" Architecture: {info.get('Architecture')}",
        f" CPUs: {info.get('NCPU')}",
        f" Total Memory: {opts.bytes_size(info.get('MemTotal') or 0)}",
        f" Name: {info.get('Name')}",
        f" Docker Root Dir: {info.get('DockerRootDir')}",
    ]
    if mirrors:
        lines += [" Registry Mirrors:", *(f"  {m}" for m in mirrors)]
    print("\n".join(lines))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("version", help="the client's and the engine's versions",
                       description="the client's and the engine's versions")
    p.add_argument("-f", "--format", help="json, or a template like '{{.Server.Version}}'")
    p.set_defaults(func=cmd_version)
    p = sub.add_parser("info", help="what the engine runs and has", description="what the engine runs and has")
    p.add_argument("-f", "--format", help="json, or a template like '{{.ContainersRunning}}'")
    p.set_defaults(func=cmd_info)
