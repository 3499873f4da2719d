"""`pydesk context`: the DOCKER_HOST line and a real `docker context` named pydesk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(home: Path, docker_config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYDESK_HOME": str(home), "DOCKER_CONFIG": str(docker_config)}
    env.pop("DOCKER_HOST", None)
    env.pop("DOCKER_CONTEXT", None)
    return subprocess.run([sys.executable, "-m", "desktop.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def engine_sock(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from vmkit.paths import VMPaths

    monkeypatch.setenv("PYDESK_HOME", str(home))
    return VMPaths("default").engine


def test_prints_docker_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(tmp_path / "home", tmp_path / "cfg", "context")
    assert out.returncode == 0, out.stderr
    sock = engine_sock(tmp_path / "home", monkeypatch)
    assert out.stdout == f"export DOCKER_HOST=unix://{sock}\n"


def test_docker_host_is_a_named_pipe_on_windows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from desktop.docker_context import docker_host

    monkeypatch.delenv("PYDESK_HOME", raising=False)
    assert docker_host("default", platform="win32") == "npipe:////./pipe/pydesk_engine"
    assert docker_host("dev", platform="win32") == "npipe:////./pipe/pydesk_engine_dev"
    assert docker_host("default", platform="darwin").startswith("unix:///")
    monkeypatch.setenv("PYDESK_HOME", str(tmp_path))  # isolated homes never share a pipe
    isolated = docker_host("default", platform="win32")
    assert isolated.startswith("npipe:////./pipe/pydesk_engine-") and isolated != "npipe:////./pipe/pydesk_engine"


def test_shell_line_per_platform() -> None:
    from desktop.docker_context import shell_line

    pipe = "npipe:////./pipe/pydesk_engine"
    assert shell_line(pipe, "win32") == f'$env:DOCKER_HOST = "{pipe}"'
    assert shell_line("unix:///run/x/engine.sock", "linux") == "export DOCKER_HOST=unix:///run/x/engine.sock"


def test_creates_and_uses_a_docker_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on PATH (apt-get install docker.io)")
    sock = engine_sock(tmp_path / "home", monkeypatch)
    out = run(tmp_path / "home", tmp_path / "cfg", "context", "--use")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"docker context 'pydesk' created (unix://{sock}); now the current context"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "cfg")}
    env.pop("DOCKER_HOST", None)
    env.pop("DOCKER_CONTEXT", None)
    info = json.loads(subprocess.run([docker, "context", "inspect", "pydesk"], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    assert info[0]["Endpoints"]["docker"]["Host"] == f"unix://{sock}"
    current = subprocess.run([docker, "context", "ls", "--format", "{{.Name}} {{.Current}}"], env=env,
                             capture_output=True, text=True, check=True).stdout.split("\n")
    assert "pydesk true" in current
    again = run(tmp_path / "home", tmp_path / "cfg", "context", "--create")
    assert "docker context 'pydesk' updated" in again.stdout
