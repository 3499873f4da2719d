"""Debian's docker-compose (1.29, on docker-py) runs a two-service project on pydesk."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tests.support.docker_cli import COMPOSE, DOCKER, DockerCLI, missing_clients

pytestmark = pytest.mark.vm

COMPOSE_FILE = """\
version: "3.8"
services:
  web:
    image: nginx
  client:
    image: busybox
    depends_on: [web]
    command: ["sh", "-c", "while :; do wget -qO- http://web/ && echo REACHED-WEB; sleep 1; done"]
"""


def test_compose_up_ps_logs_down(engine_socket: str, tmp_path: Path) -> None:
    missing = missing_clients(COMPOSE, DOCKER)
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install docker-compose docker.io)")
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE)
    project = "pd" + uuid.uuid4().hex[:8]
    compose = DockerCLI(engine_socket, tmp_path / "cfg", binary=COMPOSE)
    docker = DockerCLI(engine_socket, tmp_path / "cfg")
    base = ("-p", project, "-f", str(tmp_path / "docker-compose.yml"))
    docker.ok("pull", "nginx")
    docker.ok("pull", "busybox")
    try:
        up = compose("--no-ansi", *base, "up", "-d", cwd=tmp_path)
        assert up.returncode == 0, up.stderr
        assert f"Creating {project}_web_1" in up.stderr and f"Creating {project}_client_1" in up.stderr
        ps = compose.ok(*base, "ps", cwd=tmp_path)
        rows = {ln.split()[0]: ln for ln in ps.splitlines()[2:] if ln.strip()}
        assert set(rows) == {f"{project}_web_1", f"{project}_client_1"}
        assert all(" Up " in row for row in rows.values()), ps
        logs = ""
        for _ in range(60):
            logs = compose.ok(*base, "logs", "--no-color", "client", cwd=tmp_path)
            if "REACHED-WEB" in logs:
                break
            time.sleep(1)
        assert "Welcome to nginx on pydesk!" in logs and "REACHED-WEB" in logs, logs
        web_logs = compose.ok(*base, "logs", "--no-color", "web", cwd=tmp_path)
        assert "GET / HTTP/1.1" in web_logs
    finally:
        down = compose(*base, "down", "-t", "1", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert f"Removing network {project}_default" in down.stderr
    assert docker.ok("ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={project}") == ""
    assert f"{project}_default" not in docker.ok("network", "ls", "--format", "{{.Name}}").split()
