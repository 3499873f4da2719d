"""A private, real dockerd on the host (Debian's docker.io) as the reference for pydesk's API.

Its own data root, exec root, pid file and socket live in a temp folder; no bridge, no
iptables changes (``--bridge=none --iptables=false``), so it touches nothing of the host's
network and never talks to Docker Hub: images come from this suite's OCI layouts, converted
with ``skopeo copy oci:… docker-archive:…`` and ``docker load``-ed.

    with native_dockerd(workdir) as d:          # d.host == "unix:///…/docker.sock"
        d.load(images["busybox"].layout, "busybox:latest")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.docker_cli import DOCKER, DockerCLI

DOCKERD = "/usr/sbin/dockerd"


class NativeDockerdError(Exception):
    pass


def missing() -> list[str]:
    return [b for b in (DOCKERD, DOCKER, "containerd", "runc", "skopeo") if not shutil.which(b)]


@dataclass
class NativeDockerd:
    host: str
    workdir: Path
    cli: DockerCLI

    def load(self, layout: Path, ref: str) -> None:
        tar = self.workdir / (ref.replace("/", "_").replace(":", "_") + ".tar")
        if not tar.exists():
            subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{layout}:latest",
                            f"docker-archive:{tar}:{ref}"], check=True, capture_output=True, timeout=300)
        self.cli.ok("load", "-i", str(tar))


def _no_way_out() -> dict[str, str]:
    """dockerd's environment with every registry request sent to a closed local port: should a
    test ever ask it for an image it does not have, the pull fails here instead of reaching
    Docker Hub."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "no_proxy")}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    return env


@contextlib.contextmanager
def native_dockerd(workdir: Path, start_timeout: float = 60) -> Iterator[NativeDockerd]:
    if os.geteuid() != 0:
        raise NativeDockerdError("a private dockerd needs root")
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "docker.sock"
    log = (workdir / "dockerd.log").open("wb")
    proc = subprocess.Popen([DOCKERD, "--data-root", str(workdir / "data"), "--exec-root", str(workdir / "exec"),
                             "--pidfile", str(workdir / "dockerd.pid"), "-H", f"unix://{sock}",
                             "--iptables=false", "--ip6tables=false", "--bridge=none",
                             "--containerd-namespace", "pydesk-ref", "--containerd-plugins-namespace", "pydesk-ref-p"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=_no_way_out())
    cli = DockerCLI(f"unix://{sock}", workdir / "config")
    try:
        deadline = time.monotonic() + start_timeout
        while cli("version", timeout=30).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (workdir / "dockerd.log").read_text(errors="replace").splitlines()[-3:]
                raise NativeDockerdError(f"dockerd did not start: {' | '.join(tail)}")
            time.sleep(0.3)
        yield NativeDockerd(f"unix://{sock}", workdir, cli)
    finally:
        with contextlib.suppress(Exception):
            for cid in cli("ps", "-aq", timeout=30).stdout.split():
                cli("rm", "-f", cid, timeout=60)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        # its own managed containerd was its child; what it mounted (the netns file under
        # exec/, overlays under data/) must not outlive it
        _unmount_under(workdir)
        shutil.rmtree(workdir / "data", ignore_errors=True)


def _unmount_under(path: Path) -> None:
    """Everything mounted below ``path``, deepest first (``umount -R`` of a folder that is not
    itself a mount point leaves what is under it)."""
    prefix = str(path.resolve()) + "/"
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True)
