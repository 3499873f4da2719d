"""The engine in the guest, through the real VM, crun, overlayfs and test registry, driven
with docker-py (the Engine API client) against pydesk's host socket."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import docker
import pytest

from tests.conftest import Pydesk
from tests.support.registry import push_layout

pytestmark = pytest.mark.vm


def run(client, image: str, cmd, **kw):  # type: ignore[no-untyped-def]
    """create + start + wait + logs + remove: (exit code, output)."""
    c = client.containers.create(image, cmd, **kw)
    try:
        c.start()
        code = c.wait(timeout=120)["StatusCode"]
        return code, c.logs().decode()
    finally:
        c.remove(force=True)


def test_hello_offline(docker_client) -> None:  # type: ignore[no-untyped-def]
    out = docker_client.containers.run("hello", remove=True)
    assert b"Hello from pydesk!" in out


def test_exit_codes(docker_client) -> None:  # type: ignore[no-untyped-def]
    docker_client.images.pull("busybox", tag="latest")
    assert run(docker_client, "busybox", ["sh", "-c", "exit 3"])[0] == 3
    c = docker_client.containers.run("busybox", ["sleep", "300"], detach=True)
    try:
        c.kill()
        assert c.wait(timeout=60)["StatusCode"] == 137  # 128 + SIGKILL, as Docker reports
    finally:
        c.remove(force=True)


def test_container_config_is_applied(docker_client) -> None:  # type: ignore[no-untyped-def]
    code, out = run(docker_client, "busybox", ["sh", "-c", "echo $FOO; pwd; id -u; hostname"],
                    environment={"FOO": "bar"}, working_dir="/tmp", user="65534", hostname="box")
    assert code == 0
    assert out.split() == ["bar", "/tmp", "65534", "box"]
    code, out = run(docker_client, "busybox", [], entrypoint=["echo", "from-entrypoint"])
    assert out.strip() == "from-entrypoint"
    code, out = run(docker_client, "busybox", ["sh", "-c", "touch /x"], read_only=True)
    assert code != 0 and "Read-only file system" in out


def test_nginx_serves_inside_the_vm_and_lifecycle(shared_vm: Pydesk, docker_client) -> None:  # type: ignore[no-untyped-def]
    docker_client.images.pull("nginx", tag="latest")
    web = docker_client.containers.run("nginx", detach=True, name="web-engine-test")
    try:
        web.reload()
        assert web.status == "running"
        ip = web.attrs["NetworkSettings"]["IPAddress"]
        assert ip.startswith("172.17.")
        page = ""
        for _ in range(50):
            page = shared_vm.sh(f"wget -qO- http://{ip}/").stdout
            if "Welcome to nginx on pydesk!" in page:
                break
            time.sleep(0.2)
        assert "Welcome to nginx on pydesk!" in page
        assert b"GET / HTTP/1.1" in web.logs()
        code, out = web.exec_run(["sh", "-c", "echo from exec; exit 5"])
        assert (code, out) == (5, b"from exec\n")
        # logs -f follows until the container stops
        stream = web.logs(stream=True, follow=True)
        web.stop(timeout=5)
        assert b"".join(stream)  # the stream ended because the container stopped
        web.reload()
        assert web.status == "exited"
    finally:
        web.remove(force=True)
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get("web-engine-test")


def test_isolation(docker_client) -> None:  # type: ignore[no-untyped-def]
    other = docker_client.containers.run("busybox", ["sleep", "300"], detach=True)
    try:
        code, out = run(docker_client, "busybox", ["sh", "-c", "ps -o pid,comm; cat /proc/mounts"])
        procs = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
        # only this container's own processes: no sleep from the other one, no guest init or sshd
        assert [p[0] for p in procs][:1] == ["1"]
        assert not any(p[1] in ("sleep", "sshd", "init", "python3") for p in procs)
        mountpoints = [line.split()[1] for line in out.splitlines() if len(line.split()) > 3 and line.split()[1].startswith("/")]
        assert not any(m.startswith("/var/lib/pydesk") for m in mountpoints), mountpoints
        assert "/" in mountpoints and "/proc" in mountpoints
        # masked and read-only kernel paths, as in Docker
        code, out = run(docker_client, "busybox", ["sh", "-c", "cat /proc/kcore | head -c1 | wc -c; "
                                                                "echo 1 > /proc/sys/kernel/domainname; echo rc=$?"])
        assert out.split()[0] == "0"
        assert "rc=1" in out
    finally:
        other.remove(force=True)


GUEST_CRUNS = """
import json, os, subprocess
launch, states = "/run/pydesk/launch", "/run/pydesk/crun"
bundles = set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\\0")
    except OSError:
        continue
    if os.path.basename(argv[0]) == "crun" and "--bundle" in argv:
        bundles.add(argv[argv.index("--bundle") + 1])
ids = sorted(os.listdir(states)) if os.path.isdir(states) else []
print(json.dumps({
    "waiting": [i for i in (os.listdir(launch) if os.path.isdir(launch) else [])
                if os.path.join(launch, i) in bundles and i not in ids],
    "states": {i: json.loads(subprocess.run(["crun", "--root", states, "state", i], capture_output=True).stdout or "{}").get("pid")
               for i in ids},
    "bundles": sorted(bundles),
    "launches": sorted(os.listdir(launch)) if os.path.isdir(launch) else [],
}))
"""


def guest_cruns(vm: Pydesk) -> dict:  # type: ignore[type-arg]
    """What crun has in the guest: ``waiting`` (launch ids whose crun, started ahead by the
    engine, waits for a container; agent/launcher.py), ``states`` (crun's containers: id ->
    pid), ``bundles`` (the --bundle of every crun process) and ``launches`` (every launch
    directory)."""
    return json.loads(vm("vm", "shell", "--", "python3", "-c", GUEST_CRUNS, check=True).stdout)


def test_containers_run_on_cruns_started_ahead(shared_vm: Pydesk, docker_client) -> None:  # type: ignore[no-untyped-def]
    """A plain start takes a crun that was already waiting for its config; exec, pause, unpause
    and kill reach the container under crun's id for it, and once its exit is cleaned up,
    neither crun's state nor the launch's directory is left."""
    docker_client.containers.run("busybox", ["true"], remove=True)  # a start has them topped up
    deadline = time.monotonic() + 60
    while not (waiting := guest_cruns(shared_vm)["waiting"]) and time.monotonic() < deadline:
        time.sleep(1)  # the engine starts them once it is quiet
    assert waiting, "no crun was waiting for a container"
    c = docker_client.containers.run("busybox", ["sleep", "300"], detach=True)
    try:
        c.reload()
        runtime_id = next((i for i, pid in guest_cruns(shared_vm)["states"].items() if pid == c.attrs["State"]["Pid"]), None)
        assert runtime_id in waiting, (runtime_id, waiting)
        assert c.exec_run(["echo", "through exec"]).output == b"through exec\n"
        c.pause()
        c.reload()
        assert c.status == "paused"
        c.unpause()
        c.kill()
        assert c.wait(timeout=60)["StatusCode"] == 137
    finally:
        c.remove(force=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = shared_vm.sh(f"ls -d /run/pydesk/launch/{runtime_id} /run/pydesk/crun/{runtime_id} 2>/dev/null; true",
                            check=True).stdout.split()
        if not left:
            break
        time.sleep(1)  # the exit's clean-up waits for a quiet moment
    assert not left, left


def test_crun_at_fixed_addresses_under_tcg_and_containers_randomised(shared_vm: Pydesk, docker_client) -> None:  # type: ignore[no-untyped-def]
    """Under TCG the engine starts crun without address-space randomisation (QEMU reuses the
    code it translated for it; agent/runtime.py), and only crun: every container's processes,
    exec'd ones too, run with the default personality."""
    accel = json.loads(shared_vm("vm", "status", "--format", "json", check=True).stdout)["accel"]
    docker_client.containers.run("busybox", ["true"], remove=True)  # a start has them topped up
    deadline = time.monotonic() + 60
    while not guest_cruns(shared_vm)["waiting"] and time.monotonic() < deadline:
        time.sleep(1)
    personalities = shared_vm.sh("for p in $(pgrep -x crun); do cat /proc/$p/personality; done", check=True).stdout.split()
    assert personalities, "no crun in the guest"
    no_randomize = 0x0040000
    assert all(bool(int(p, 16) & no_randomize) == (accel == "tcg") for p in personalities), (accel, personalities)
    assert docker_client.containers.run("busybox", ["cat", "/proc/self/personality"], remove=True) == b"00000000\n"
    c = docker_client.containers.run("busybox", ["sleep", "300"], detach=True)
    try:
        for tty in (False, True):
            assert c.exec_run(["cat", "/proc/self/personality"], tty=tty).output.strip() == b"00000000"
    finally:
        c.remove(force=True)


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
def test_a_start_that_fails_says_why_and_leaves_no_crun_behind(shared_vm: Pydesk, docker_client,  # type: ignore[no-untyped-def]
                                                               tty: bool) -> None:
    """crun's own reason comes back as Docker's (400: the CLI exits 127), with a terminal as
    without one (crun hands none over and exits), and the failed launch leaves neither a crun
    state nor a launch directory."""
    before = guest_cruns(shared_vm)
    with pytest.raises(docker.errors.APIError) as info:
        docker_client.containers.run("busybox", ["no-such-command"], tty=tty, remove=True)
    assert info.value.status_code == 400
    assert 'exec: "no-such-command": executable file not found in $PATH' in str(info.value.explanation)
    after = guest_cruns(shared_vm)
    assert set(after["states"]) <= set(before["states"]), after["states"]
    assert set(after["launches"]) <= set(before["launches"]) | set(after["waiting"]), after


ADD_KEY = "import ctypes; libc = ctypes.CDLL(None, use_errno=True); print(libc.syscall(248, 0, 0, 0, 0, 0), ctypes.get_errno())"


def test_seccomp_profile_refuses_what_docker_refuses(shared_vm: Pydesk) -> None:
    """The default profile (compiled once by the engine, agent/seccomp.py) is loaded: add_key
    needs no capability, so only seccomp makes it fail with EPERM; --privileged runs without
    a profile, where the kernel answers the null arguments itself (EFAULT/EINVAL)."""
    if shared_vm.sh("uname -m").stdout.strip() != "x86_64":
        pytest.skip("add_key is syscall 248 on x86_64 only")
    r = shared_vm("run", "--rm", "python", "sh", "-c", f"grep Seccomp: /proc/self/status; python3 -c '{ADD_KEY}'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Seccomp:", "2", "-1", "1"]
    r = shared_vm("run", "--rm", "--privileged", "python", "sh", "-c",
                  f"grep Seccomp: /proc/self/status; python3 -c '{ADD_KEY}'")
    assert r.returncode == 0, r.stderr
    status, rc, err = r.stdout.split()[1:]
    assert status == "0" and rc == "-1" and err != "1"


def test_memory_limit_oom_kills(docker_client) -> None:  # type: ignore[no-untyped-def]
    c = docker_client.containers.create("busybox", ["sh", "-c", "head -c 200m /dev/zero | tail"], mem_limit="32m")
    try:
        c.start()
        code = c.wait(timeout=120)["StatusCode"]
        c.reload()
        assert code == 137
        assert c.attrs["State"]["OOMKilled"] is True
    finally:
        c.remove(force=True)


def test_pids_limit_stops_a_fork_bomb(shared_vm: Pydesk, docker_client) -> None:  # type: ignore[no-untyped-def]
    c = docker_client.containers.run("busybox", ["sleep", "300"], detach=True, pids_limit=20)
    try:
        bomb = "i=0; while [ $i -lt 100 ]; do sleep 120 & i=$((i+1)); done; wait"
        code, out = c.exec_run(["sh", "-c", bomb])
        assert b"can't fork" in out or b"Resource temporarily unavailable" in out, out
        cg = f"/sys/fs/cgroup/pydesk/{c.id}/ctr"
        limit, current, events = shared_vm.sh(f"cat {cg}/pids.max {cg}/pids.current {cg}/pids.events").stdout.split("\n")[:3]
        assert limit == "20"
        assert int(current) <= 20
        assert int(events.split()[1]) > 0  # the kernel refused forks at the limit
        c.reload()
        assert c.status == "running"  # the container itself survives
    finally:
        c.remove(force=True)


def test_restart_policy_on_failure(docker_client) -> None:  # type: ignore[no-untyped-def]
    c = docker_client.containers.run("busybox", ["sh", "-c", "echo run; exit 1"], detach=True,
                                     restart_policy={"Name": "on-failure", "MaximumRetryCount": 2})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            c.reload()
            if c.attrs["RestartCount"] == 2 and c.status == "exited":
                break
            time.sleep(0.5)
        assert c.attrs["RestartCount"] == 2
        assert c.logs().decode().count("run") == 3
    finally:
        c.remove(force=True)


# --- hostile images ---------------------------------------------------------------------------
def _oci_layout(root: Path, layer: bytes, diff_id: str | None = None) -> Path:
    """A one-layer OCI image layout around raw (gzip) layer bytes."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h, len(data)

    raw = gzip.decompress(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/x"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id or "sha256:" + hashlib.sha256(raw).hexdigest()]}}).encode()
    cd, cs = put(config)
    ld, ls = put(layer)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld,
                                       "size": ls}]}).encode()
    md, ms = put(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return root


def pull_error(client, repo: str) -> str:  # type: ignore[no-untyped-def]
    """The error a pull reports in its progress stream (the HTTP status is 200 by then)."""
    errors = [m["error"] for m in client.api.pull(repo, "latest", stream=True, decode=True) if "error" in m]
    assert len(errors) == 1, errors
    return errors[0]


def _layer(*members: tuple[str, str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, arg in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(arg)
                tar.addfile(ti, io.BytesIO(arg.encode()))
            elif kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                tar.addfile(ti)
            elif kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, arg
                tar.addfile(ti)
            elif kind == "chardev":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
                tar.addfile(ti)
    return gzip.compress(buf.getvalue())


HOSTILE = {
    "dotdot": _layer(("../../../../evil-dotdot", "file", "pwned")),
    "absolute": _layer(("/evil-absolute", "file", "pwned")),
    "symlink-write": _layer(("d", "symlink", "/"), ("d/evil-through-symlink", "file", "pwned")),
    "hardlink-out": _layer(("h", "hardlink", "../../../../etc/passwd")),
    "device": _layer(("dev-null", "chardev", "")),
    "bad-whiteout": _layer(("a/.wh..", "file", "")),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_are_rejected_and_change_nothing(case, registry, shared_vm, docker_client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    push_layout(registry, _oci_layout(tmp_path / "layout", HOSTILE[case]), "latest", f"hostile/{case}")
    listing = "find /var/lib/pydesk/engine/images -path '*/tmp' -prune -o -print | sort; ls / /var/lib/pydesk"
    before = shared_vm.sh(listing).stdout
    images_before = sorted(i.id for i in docker_client.images.list())
    message = pull_error(docker_client, f"hostile/{case}")
    assert "entry" in message or "whiteout" in message or "device" in message, message
    assert "\n" not in message.strip()
    assert shared_vm.sh(listing).stdout == before
    assert sorted(i.id for i in docker_client.images.list()) == images_before
    assert "evil" not in shared_vm.sh("ls / /etc /var/lib/pydesk").stdout


def test_tampered_blob_fails_its_digest_check(registry, shared_vm, docker_client) -> None:  # type: ignore[no-untyped-def]
    img = registry.images["tamper"]
    push_layout(registry, img.layout, "latest", "library/tamper-vm")  # docker.io/library/... via the mirror
    layer = img.manifests[0].layers[0]
    blob = Path(registry.blob_path(layer.digest))
    original = blob.read_bytes()
    blob.write_bytes(original[:-10] + bytes(10))
    try:
        listing = "find /var/lib/pydesk/engine/images/blobs /var/lib/pydesk/engine/images/layers | sort"
        before = shared_vm.sh(listing).stdout
        assert "digest" in pull_error(docker_client, "tamper-vm").lower()
        assert shared_vm.sh(listing).stdout == before
    finally:
        blob.write_bytes(original)
