"""docker-py's high-level API against pydesk's engine socket (the shared VM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import docker
import docker.errors
import pytest

pytestmark = pytest.mark.vm


def name() -> str:
    return "py" + uuid.uuid4().hex[:10]


def test_images_pull_get_list(docker_client) -> None:  # type: ignore[no-untyped-def]
    image = docker_client.images.pull("busybox", tag="latest")
    assert "busybox:latest" in image.tags
    assert docker_client.images.get("busybox").id == image.id
    assert image.id in {i.id for i in docker_client.images.list(name="busybox")}
    assert all("busybox:latest" in i.tags for i in docker_client.images.list(name="busybox:latest"))
    assert image.history()[0]["Id"] == image.id
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get("no-such-image")
    with pytest.raises(docker.errors.NotFound):
        docker_client.images.pull("no-such-image", tag="latest")


def test_containers_run_output_and_errors(docker_client) -> None:  # type: ignore[no-untyped-def]
    out = docker_client.containers.run("busybox", ["sh", "-c", "echo hello; echo err >&2"], remove=True)
    assert out == b"hello\n"
    with pytest.raises(docker.errors.ContainerError) as exc:
        docker_client.containers.run("busybox", ["sh", "-c", "echo oops >&2; exit 2"], remove=True, stderr=True)
    assert exc.value.exit_status == 2
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get("no-such-container")
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.containers.create("no-such-image-anywhere")


def test_detached_logs_stream_exec_run(docker_client) -> None:  # type: ignore[no-untyped-def]
    c = docker_client.containers.run("busybox", ["sh", "-c", "for i in 1 2 3; do echo n$i; sleep 0.3; done; sleep 600"],
                                     detach=True, name=name(), labels={"pydesk.test": "py"})
    try:
        stream = c.logs(stream=True, follow=True)
        got = b""
        for chunk in stream:
            got += chunk
            if got.count(b"\n") >= 3:
                break
        assert got == b"n1\nn2\nn3\n"
        code, out = c.exec_run(["sh", "-c", "echo $((2+3)); exit 4"])
        assert (code, out) == (4, b"5\n")
        res = c.exec_run(["sh", "-c", "echo out; echo err >&2"], demux=True)
        assert res.output == (b"out\n", b"err\n")
        res = c.exec_run("env", environment={"FOO": "bar"}, workdir="/tmp")
        assert b"FOO=bar" in res.output
        streamed = b"".join(c.exec_run(["sh", "-c", "echo a; sleep 0.3; echo b"], stream=True).output)
        assert streamed == b"a\nb\n"
        assert [x.id for x in docker_client.containers.list(filters={"label": "pydesk.test=py"})] == [c.id]
        c.stop(timeout=1)
        assert c.wait(timeout=60)["StatusCode"] == 137
        c.reload()
        assert c.status == "exited"
    finally:
        c.remove(force=True)


def test_attach_socket_and_put_get(docker_client) -> None:  # type: ignore[no-untyped-def]
    # low-level API: attach before start, the 8-byte multiplexed framing, wait with a condition
    api = docker_client.api
    cid = api.create_container("busybox", ["sh", "-c", "read line; echo got:$line; echo e >&2"], stdin_open=True)["Id"]
    try:
        sock = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        raw = sock._sock
        api.start(cid)
        raw.sendall(b"ping\n")
        data = b""
        raw.settimeout(60)
        while True:
            chunk = raw.recv(4096)
            if not chunk:
                break
            data += chunk
        frames = []
        while data:
            stream, size = data[0], int.from_bytes(data[4:8], "big")
            frames.append((stream, data[8:8 + size]))
            data = data[8 + size:]
        assert (1, b"got:ping\n") in frames and (2, b"e\n") in frames
        assert api.wait(cid, condition="not-running")["StatusCode"] == 0
    finally:
        api.remove_container(cid, force=True)


def test_commit_with_a_config_export_and_import(docker_client) -> None:  # type: ignore[no-untyped-def]
    import io
    import tarfile

    c = docker_client.containers.run("busybox", ["sh", "-c", "echo hi > /greeting; sleep 600"], detach=True)
    tags = []
    try:
        deadline = time.monotonic() + 30
        while c.exec_run(["test", "-f", "/greeting"]).exit_code != 0 and time.monotonic() < deadline:
            time.sleep(0.3)
        # the request's config, then the changes on top, as dockerd merges them
        image = c.commit("pydesk-py/committed", "t1", message="m", author="a",
                         conf={"Cmd": ["cat", "/greeting"], "Env": ["FROM_CONF=1"]}, changes=["ENV FROM_CHANGE=2"])
        tags.append("pydesk-py/committed:t1")
        assert image.tags == ["pydesk-py/committed:t1"]
        assert image.attrs["Config"]["Cmd"] == ["cat", "/greeting"]
        assert image.attrs["Config"]["Env"] == ["FROM_CONF=1", "FROM_CHANGE=2"]
        assert docker_client.containers.run(image.id, remove=True) == b"hi\n"
        data = b"".join(c.export(chunk_size=1 << 16))
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            assert tf.extractfile("greeting").read() == b"hi\n"  # type: ignore[union-attr]
        out = docker_client.api.import_image_from_data(data, repository="pydesk-py/imported", tag="t1",
                                                       changes=["CMD cat /greeting"])
        tags.append("pydesk-py/imported:t1")
        assert json.loads(out.splitlines()[-1])["status"].startswith("sha256:")
        assert docker_client.containers.run("pydesk-py/imported:t1", remove=True) == b"hi\n"
        with pytest.raises(docker.errors.APIError, match="a tag needs a repository name"):
            docker_client.api.commit(c.id, tag="t2")
    finally:
        c.remove(force=True)
        for t in tags:
            docker_client.images.remove(t)


def _read_until(raw, text: bytes, timeout: float = 60) -> bytes:  # type: ignore[no-untyped-def]
    raw.settimeout(timeout)
    data = b""
    while text not in data:
        chunk = raw.recv(4096)
        assert chunk, f"the stream ended before {text!r}: {data!r}"
        data += chunk
    return data


def _ends(raw, timeout: float = 30) -> bytes:  # type: ignore[no-untyped-def]
    """What comes until the engine ends the stream (a timeout fails the test)."""
    raw.settimeout(timeout)
    data = b""
    while chunk := raw.recv(4096):
        data += chunk
    return data


def test_the_engine_ends_a_terminal_session_at_its_detach_keys(docker_client) -> None:  # type: ignore[no-untyped-def]
    # the engine's own watch (for API clients; the CLIs watch their terminals themselves):
    # the session ends, the container and the exec run on
    api = docker_client.api
    cid = api.create_container("busybox", ["sh"], tty=True, stdin_open=True)["Id"]
    try:
        api.start(cid)
        with pytest.raises(docker.errors.APIError, match="Invalid detach keys"):
            api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stream": 1, "detachKeys": "ctrl-9"})
        sock = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stream": 1, "detachKeys": "ctrl-x"})
        raw = sock._sock
        raw.sendall(b"echo one-$((1+1))\n")
        _read_until(raw, b"one-2")
        raw.sendall(b"\x10\x11\x15echo two-$((2+1))\n")  # the default keys are not this session's
        _read_until(raw, b"two-3")
        raw.sendall(b"\x18echo never-$((3+1))\n")  # ctrl-x: what follows it is not passed on
        assert b"never-4" not in _ends(raw)
        sock.close()
        assert api.inspect_container(cid)["State"]["Running"] is True

        with pytest.raises(docker.errors.APIError, match="Invalid detach keys"):
            api.exec_create(cid, ["sh"], stdin=True, tty=True, detach_keys="xx")
        eid = api.exec_create(cid, ["sh"], stdin=True, tty=True, detach_keys="ctrl-a,b")["Id"]
        assert api.exec_inspect(eid)["DetachKeys"] == "ctrl-a,b"
        sock = api.exec_start(eid, tty=True, socket=True)
        raw = sock._sock
        raw.sendall(b"echo three-$((1+2))\n")
        _read_until(raw, b"three-3")
        raw.sendall(b"\x01b")
        _ends(raw)
        sock.close()
        assert api.exec_inspect(eid)["Running"] is True
        # still the container's shell, which still reads its terminal
        sock = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stream": 1})
        sock._sock.sendall(b"echo four-$((2+2))\n")
        _read_until(sock._sock, b"four-4")
        sock.close()
    finally:
        api.remove_container(cid, force=True)


@pytest.mark.parametrize("size", [[24], [24, -1], ["24", "80"], [24, 80, 1], {"h": 24}, [24, 1 << 16]])
def test_a_console_size_that_is_not_one_is_refused(docker_client, size) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(docker.errors.APIError, match=r"invalid ConsoleSize .*: want \[height, width\]"):
        docker_client.api.create_container_from_config(
            {"Image": "busybox", "Cmd": ["true"], "Tty": True, "HostConfig": {"ConsoleSize": size}}, name=name())


def test_networks_and_volumes(docker_client) -> None:  # type: ignore[no-untyped-def]
    net = docker_client.networks.create(name(), driver="bridge", labels={"pydesk.test": "1"})
    try:
        assert net.name in [n.name for n in docker_client.networks.list()]
        assert docker_client.networks.get(net.id).attrs["Labels"] == {"pydesk.test": "1"}
        out = docker_client.containers.run("busybox", ["ip", "-4", "-o", "addr"], network=net.name, remove=True)
        subnet = net.attrs["IPAM"]["Config"][0]["Subnet"]
        assert subnet.rsplit(".", 2)[0].encode() in out
    finally:
        net.remove()
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(net.id)
    vol = docker_client.volumes.create(name(), labels={"pydesk.test": "1"})
    try:
        assert vol.name in [v.name for v in docker_client.volumes.list()]
        assert docker_client.volumes.get(vol.name).attrs["Labels"] == {"pydesk.test": "1"}
    finally:
        vol.remove()
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(vol.name)


def test_exit_clean_up_waits_for_quiet_and_a_start_has_it_done_first(shared_vm, docker_client) -> None:  # type: ignore[no-untyped-def]
    """An exited container's namespace and rootfs mount are left to the housekeeper, which
    runs at a quiet moment (agent/housekeeping.py). Starting the container again right after
    its exit has that clean-up done first, instead of waiting for it (up to a minute)."""
    c = docker_client.containers.run("busybox", ["echo", "hi"], detach=True, name=name())
    try:
        for _ in range(3):
            assert c.wait(timeout=60)["StatusCode"] == 0
            t0 = time.monotonic()
            c.start()  # within milliseconds of the exit: its clean-up has not run yet
            assert time.monotonic() - t0 < 20
        assert c.wait(timeout=60)["StatusCode"] == 0
        assert c.logs() == b"hi\n" * 4
        c.reload()
        assert c.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"] == ""  # none once exited
    finally:
        c.remove(force=True)
    script = (f"grep -c ' [^ ]*{c.id}[^ ]*/rootfs ' /proc/mounts; "
              f"ls /run/netns | grep -c pydesk-{c.id[:12]}; true")
    deadline = time.monotonic() + 30  # at most 10 s after its removal (MAX_WAIT), whatever the load
    while True:
        counts = shared_vm.sh(script, check=True).stdout.split()
        if counts == ["0", "0"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert counts == ["0", "0"], "the removed container's rootfs mount or network namespace was left behind"


def test_version_negotiation(engine_socket: str) -> None:
    for version in ("1.40", "1.41", "1.43"):
        c = docker.DockerClient(base_url=engine_socket, version=version)
        try:
            assert c.version()["Os"] == "linux"
            assert c.ping() is True
        finally:
            c.close()
    too_new = docker.APIClient(base_url=engine_socket, version="9.99")
    with pytest.raises(docker.errors.APIError) as exc:
        too_new.info()
    assert exc.value.status_code == 400 and "too new" in str(exc.value)
    auto = docker.APIClient(base_url=engine_socket, version="auto")
    assert auto.api_version == auto.version()["ApiVersion"]
    headers = auto.get(auto.base_url + "/_ping").headers
    assert headers["Api-Version"] and headers["Ostype"] == "linux"


TESTCONTAINERS_SCRIPT = """
import urllib.request, time
from testcontainers.core.container import DockerContainer

with DockerContainer("nginx").with_exposed_ports(80) as ctr:
    host, port = ctr.get_container_host_ip(), int(ctr.get_exposed_port(80))
    page = ""
    for _ in range(100):
        try:
            page = urllib.request.urlopen(f"http://{host}:{port}/", timeout=5).read().decode()
            break
        except OSError:
            time.sleep(0.2)
    print(host, port, "nginx" if "Welcome to nginx on pydesk!" in page else page)
"""


def test_testcontainers_reads_the_port(engine_socket: str, docker_client) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("testcontainers.core.container", reason="testcontainers (pip extra 'test') is missing")
    docker_client.images.pull("nginx", tag="latest")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "TC_", "TESTCONTAINERS_"))}
    env.update(DOCKER_HOST=engine_socket,
               TESTCONTAINERS_RYUK_DISABLED="true",  # Ryuk's image is on Docker Hub
               # testcontainers takes a host with /.dockerenv (as CI machines often are) for a
               # container and would connect to the bridge gateway; pydesk publishes on the
               # host's localhost, testcontainers' "docker_host" mode
               TESTCONTAINERS_CONNECTION_MODE="docker_host")
    proc = subprocess.run([sys.executable, "-c", TESTCONTAINERS_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    host, port, page = proc.stdout.split()
    assert host == "localhost" and 0 < int(port) < 65536 and page == "nginx"
    assert docker_client.containers.list(filters={"ancestor": "nginx", "publish": "80"}) == []  # removed on exit


def test_the_engine_port_relay_restarts_under_a_linked_host(shared_vm, docker_client) -> None:  # type: ignore[no-untyped-def]
    """The host's Docker API connections ride the engine's own virtio-serial port
    (vmkit/engine_link.py to agent/engine_port.py). Kill the guest's relay: init respawns it,
    its reset line makes the daemon link again, and the API is served as before."""
    def relay_pids() -> set[str]:
        r = shared_vm.sh("pgrep -f 'python3 -m agent[.]engine_port'", check=True)
        return set(r.stdout.split())

    big = docker_client.containers.run("busybox", ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x"],
                                       remove=True)
    assert big == b"x" * 3_000_000  # more than a window's worth through one stream
    before = relay_pids()
    assert len(before) == 1
    shared_vm.sh("pkill -f 'python3 -m agent[.]engine_port'", check=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if relay_pids() - before and docker_client.ping():
                break
        except (docker.errors.DockerException, OSError, AssertionError):
            pass  # a request that met the restart: its stream was closed, the next one links again
        assert time.monotonic() < deadline, "the engine port never came back"
        time.sleep(0.5)
    for _ in range(5):
        assert docker_client.containers.run("busybox", ["echo", "again"], remove=True) == b"again\n"
    log = shared_vm.sh("cat /run/pydesk/engine-port.log", check=True).stdout
    assert log.count("engine port: linked") >= 2
