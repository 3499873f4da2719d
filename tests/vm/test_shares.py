"""Host folders in containers through the real VM: the shared VM shares a tmp folder
read-write (``shared_vm.share``) and one read-only (``shared_vm.share_ro``) over the agent
channel (sshfs in the guest, our confined SFTP server in the daemon), at the same paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import VM_FLAGS, Pydesk, _teardown, registry_flags

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm(shared_vm: Pydesk) -> Pydesk:
    for image in ("busybox", "git", "python"):
        shared_vm("pull", image, check=True)
    return shared_vm


@pytest.fixture(scope="module")
def sftp_vm(tmp_path_factory: pytest.TempPathFactory, registry) -> Iterator[Pydesk]:  # type: ignore[no-untyped-def]
    """A VM whose read-write share is SFTP on its own virtio-serial port: the path of macOS,
    Windows and Linux without root. (The shared VM's read-write share uses virtiofs when the
    tests run as root, as CI does.)"""
    p = Pydesk(tmp_path_factory.mktemp("sftpvm") / "home")
    p.share = tmp_path_factory.mktemp("sftp-share")  # type: ignore[attr-defined]
    p("vm", "start", *VM_FLAGS, *registry_flags(registry), "--share-transport", "sftp",
      "--share", str(p.share), check=True)  # type: ignore[attr-defined]
    st = json.loads(p("vm", "status", "--format", "json", check=True).stdout)
    assert [(s["transport"], s["mounted"]) for s in st["shares"]] == [("sftp", True)]
    for image in ("busybox", "git", "python"):
        p("pull", image, check=True)
    yield p
    _teardown(p)
    assert not list(p.run_dir.glob("share*.sock")), "share port sockets left behind"


@pytest.fixture(params=["shared", "sftp"])
def tvm(request: pytest.FixtureRequest) -> Pydesk:
    """The VM a read-write share test runs on: the shared one (virtiofs as root) or sftp_vm."""
    return request.getfixturevalue("vm" if request.param == "shared" else "sftp_vm")


def _workdir(p: Pydesk) -> Path:
    d = p.share / f"w{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    d.mkdir()
    return d


@pytest.fixture
def work(tvm: Pydesk) -> Path:
    return _workdir(tvm)


@pytest.fixture
def shared_work(vm: Pydesk) -> Path:
    return _workdir(vm)


def run(vm: Pydesk, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return vm("run", "--rm", *args, timeout=timeout)


def test_files_both_ways_with_metadata(tvm: Pydesk, work: Path) -> None:
    vm = tvm
    f = work / "from-host.txt"
    f.write_bytes(b"written on the host\n")
    os.chmod(f, 0o640)
    os.utime(f, (1_600_000_000, 1_600_000_000))
    script = ("stat -c '%s %Y %a %u %g' /src/from-host.txt && cat /src/from-host.txt && "
              "echo made in the container > /src/from-ctr.txt && chmod 600 /src/from-ctr.txt && "
              "touch -d '2021-03-04 05:06:07' /src/from-ctr.txt && mkdir /src/dir && "
              "echo x > /src/dir/a && mv /src/dir/a /src/dir/b && rm /src/from-host.txt")
    proc = run(vm, "-v", f"{work}:/src", "busybox", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    size, mtime, mode, uid, gid = proc.stdout.splitlines()[0].split()
    assert (size, mtime, mode) == ("20", "1600000000", "640")
    assert (int(uid), int(gid)) == (os.getuid(), os.getgid())  # the host user's numbers, unchanged
    assert "written on the host" in proc.stdout
    made = work / "from-ctr.txt"
    st = made.stat()
    assert made.read_text() == "made in the container\n"
    assert oct(st.st_mode & 0o777) == oct(0o600)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())  # owned by the host user, not the container's root
    assert time.gmtime(st.st_mtime)[:6] == (2021, 3, 4, 5, 6, 7)
    assert not f.exists()  # deleted from the container
    assert (work / "dir" / "b").read_text() == "x\n" and not (work / "dir" / "a").exists()
    # a host-side edit is seen by a running container (caches last about a second)
    cname = "s" + uuid.uuid4().hex[:10]
    vm("run", "-d", "--name", cname, "-v", f"{work}:/src", "busybox", "sleep", "300", check=True)
    try:
        (work / "live.txt").write_text("v1\n")
        (work / "dir" / "b").rename(work / "dir" / "c")
        deadline = time.monotonic() + 30
        while True:
            out = vm("exec", cname, "sh", "-c", "cat /src/live.txt; ls /src/dir").stdout
            if out == "v1\nc\n" or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out == "v1\nc\n"
    finally:
        vm("rm", "-f", cname)


def test_docker_cli_relative_workdir_style(vm: Pydesk, shared_work: Path) -> None:
    work = shared_work
    """`pydesk run -v "$PWD":/src -w /src` — the issue's example."""
    (work / "app.py").write_text("print('hello from', __file__)\n")
    proc = subprocess.run([os.sys.executable, "-m", "desktop.cli", "run", "--rm", "-v", ".:/src", "-w", "/src",
                           "busybox", "cat", "app.py"], cwd=work, env=vm.env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "print('hello from', __file__)\n"


def test_one_gib_file_both_ways(tvm: Pydesk, work: Path) -> None:
    vm = tvm
    block = hashlib.sha256(b"pydesk").digest() * (1 << 15)  # 1 MiB, not all zeros
    digest = hashlib.sha256()
    with open(work / "big.in", "wb") as f:
        for i in range(1024):
            chunk = block[i:] + block[:i]
            f.write(chunk)
            digest.update(chunk)
    proc = run(vm, "-v", f"{work}:/src", "busybox", "sh", "-c",
               "sha256sum /src/big.in | cut -d' ' -f1 && dd if=/dev/zero of=/src/big.out bs=1M count=1024 2>/dev/null "
               "&& stat -c %s /src/big.out", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [digest.hexdigest(), str(1 << 30)]
    out = work / "big.out"
    assert out.stat().st_size == 1 << 30
    h = hashlib.sha256()
    with open(out, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    assert h.hexdigest() == hashlib.sha256(b"\0" * (1 << 30)).hexdigest()
    (work / "big.in").unlink()
    out.unlink()


def test_git_status_over_ten_thousand_files(tvm: Pydesk, work: Path) -> None:
    vm = tvm
    repo = work / "repo"
    for i in range(100):
        d = repo / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(100):
            (d / f"f{j:03d}.txt").write_text(f"{i} {j}\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "10k files"], check=True)
    (repo / "d042" / "f042.txt").write_text("changed on the host\n")
    (repo / "new.txt").write_text("untracked\n")
    proc = run(vm, "-v", f"{repo}:/repo", "-w", "/repo", "git", "git", "-c", "safe.directory=*",
               "status", "--porcelain", timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(["?? new.txt", " M d042/f042.txt"])
    # many small files written in the container are all on the host
    proc = run(vm, "-v", f"{work}:/w", "busybox", "sh", "-c",
               "mkdir /w/small && cd /w/small && for i in $(seq 1 500); do echo $i > f$i; done && ls | wc -l",
               timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "500", proc.stderr
    assert len(list((work / "small").iterdir())) == 500


#: An inotify watcher in the container, as hot-reload tools use (python image, no inotify-tools):
#: prints "MASK NAME" per event on /src and exits when a file named "stop" shows up.
INOTIFY_WATCHER = """
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
assert libc.inotify_add_watch(fd, b"/src", 0xFFF) >= 0
print("READY", flush=True)
while True:
    data = os.read(fd, 65536)
    while data:
        wd, mask, cookie, n = struct.unpack_from("iIII", data)
        name = data[16:16 + n].rstrip(b"\\0").decode() or "."
        print(mask, name, flush=True)
        data = data[16 + n:]
        if name == "stop":
            sys.exit(0)
"""
IN_ATTRIB, IN_ISDIR = 0x4, 0x40000000


def test_host_edits_raise_inotify_events_in_a_container(tvm: Pydesk, work: Path) -> None:
    """Hot reload: a save, a new file and a deletion on the host each reach an inotify watcher
    in the container, and the replay changes nothing on the host (vmkit/filewatch.py)."""
    _inotify_in_a_container(tvm, work)


def test_host_edits_in_a_read_only_share_raise_inotify_events(vm: Pydesk) -> None:
    """The container's bind is read-only; the replay goes through the agent's read-write mount."""
    work = vm.share_ro / f"w{uuid.uuid4().hex[:8]}"  # type: ignore[attr-defined]
    work.mkdir()
    _inotify_in_a_container(vm, work)


def _inotify_in_a_container(vm: Pydesk, work: Path) -> None:
    app, old = work / "app.py", work / "old.py"
    app.write_text("print(1)\n")
    old.write_text("old\n")
    os.chmod(app, 0o640)
    name = "iw" + uuid.uuid4().hex[:8]
    vm("run", "-d", "--name", name, "-v", f"{work}:/src", "python", "python3", "-c", INOTIFY_WATCHER, check=True)
    try:
        def events(until: Callable[[list[tuple[int, str]]], bool]) -> list[tuple[int, str]]:
            deadline = time.monotonic() + 60
            while True:
                lines = vm("logs", name).stdout.splitlines()
                got = [(int(m), n) for m, n in (ln.split(" ", 1) for ln in lines if ln != "READY")]
                if (lines and until(got)) or time.monotonic() > deadline:
                    return got
                time.sleep(0.5)

        assert events(lambda g: True) == []  # ready, and nothing yet
        deadline = time.monotonic() + 60  # the daemon hears what to watch when the container starts
        while f"watching {work} for changes" not in vm("vm", "logs", "--daemon").stdout:
            assert time.monotonic() < deadline, "the daemon never watched the bind-mounted folder"
            time.sleep(0.5)
        app.write_text("print(2)\n")
        saved = app.stat()
        got = events(lambda g: (IN_ATTRIB, "app.py") in g)
        assert (IN_ATTRIB, "app.py") in got, got
        (work / "new.py").write_text("new\n")
        got = events(lambda g: (IN_ATTRIB, "new.py") in g)
        assert (IN_ATTRIB, "new.py") in got, got
        old.unlink()  # told as a change of the folder
        got = events(lambda g: (IN_ATTRIB | IN_ISDIR, ".") in g)
        assert (IN_ATTRIB | IN_ISDIR, ".") in got, got
        time.sleep(3)
        assert events(lambda _: True) == got, "events kept coming after the host went quiet (an echo loop?)"
        after = app.stat()
        assert (after.st_mode, after.st_mtime_ns, after.st_size) == (saved.st_mode, saved.st_mtime_ns, saved.st_size)
        assert app.read_text() == "print(2)\n"
        (work / "stop").write_text("")
        assert vm("wait", name, timeout=60).stdout.strip() == "0"
    finally:
        vm("rm", "-f", name)


@pytest.mark.parametrize("which", ["share", "share_ro"])  # virtiofs (as root on Linux) and sftp
def test_symlinks_do_not_reach_outside_the_share(vm: Pydesk, which: str, tmp_path: Path) -> None:
    work = getattr(vm, which) / f"w{uuid.uuid4().hex[:8]}"
    work.mkdir()
    secret = tmp_path / "host-secret.txt"  # outside every share
    secret.write_text("HOST SECRET\n")
    os.symlink(secret, work / "abs-link")
    os.symlink(os.path.relpath(secret, work), work / "rel-link")
    os.symlink(str(tmp_path), work / "dir-link")
    script = ("for p in /src/abs-link /src/rel-link /src/dir-link/host-secret.txt; do cat $p 2>&1; done; "
              "echo planted > /src/dir-link/planted 2>&1; ls /src/dir-link/ 2>&1; true")
    proc = run(vm, "-v", f"{work}:/src", "busybox", "sh", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert "HOST SECRET" not in proc.stdout
    assert "host-secret.txt" not in proc.stdout.splitlines()  # not listed through the dir link
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host-secret.txt"]
    assert secret.read_text() == "HOST SECRET\n"
    # the links themselves are intact, as the host wrote them
    assert os.readlink(work / "abs-link") == str(secret)


def test_bind_outside_the_shares_is_refused_with_the_setting(vm: Pydesk, docker_client) -> None:  # type: ignore
    import docker.errors

    proc = vm("run", "--rm", "-v", "/etc:/x", "busybox", "true")
    assert proc.returncode == 125
    assert "--share" in proc.stderr and "settings.json" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # the raw API (docker CLI, docker-py) sends host paths verbatim: the engine refuses them
    with pytest.raises(docker.errors.APIError) as exc:
        docker_client.containers.create("busybox", "true", volumes={"/etc": {"bind": "/x", "mode": "ro"}})
    assert exc.value.status_code == 400
    assert "not shared with the VM" in str(exc.value) and "--share" in str(exc.value)
    # a symlink inside a share cannot smuggle a VM path in either
    link = vm.share / f"to-etc-{uuid.uuid4().hex[:6]}"  # type: ignore[attr-defined]
    os.symlink("/etc", link)
    with pytest.raises(docker.errors.APIError) as exc:
        docker_client.containers.create("busybox", "true", volumes={str(link): {"bind": "/x"}})
    assert "outside the folders shared" in str(exc.value)


def test_read_only_share(vm: Pydesk) -> None:
    ro: Path = vm.share_ro  # type: ignore[attr-defined]
    (ro / "keep.txt").write_text("original\n")
    proc = run(vm, "-v", f"{ro}:/ro", "busybox", "sh", "-c",
               "cat /ro/keep.txt; echo changed > /ro/keep.txt; echo rc=$?; touch /ro/new; echo rc=$?")
    assert "original" in proc.stdout
    assert "rc=0" not in proc.stdout, proc.stdout
    assert (ro / "keep.txt").read_text() == "original\n"
    assert not (ro / "new").exists()


def test_vm_status_lists_the_shares(vm: Pydesk) -> None:
    from vmkit.spec import HostOS
    from vmkit.virtiofs import available

    st = json.loads(vm("vm", "status", "--format", "json", check=True).stdout)
    got = {s["host_path"]: (s["guest_path"], s["read_only"], s["mounted"], s["transport"]) for s in st["shares"]}
    fast = "virtiofs" if available(HostOS.LINUX)[0] else "sftp"
    assert got[str(vm.share)] == (str(vm.share), False, True, fast)  # type: ignore[attr-defined]
    assert got[str(vm.share_ro)] == (str(vm.share_ro), True, True, "sftp")  # type: ignore[attr-defined]


@pytest.mark.skipif(shutil.which("docker") is None, reason="the docker CLI is not installed on this host")
def test_real_docker_cli_binds_host_paths_verbatim(vm: Pydesk, shared_work: Path) -> None:
    work = shared_work
    (work / "hello.txt").write_text("hi from the host\n")
    env = dict(vm.env, DOCKER_HOST="unix://" + str(vm.run_dir / "engine.sock"))
    proc = subprocess.run(["docker", "run", "--rm", "-v", f"{work}:/w", "busybox", "cat", "/w/hello.txt"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hi from the host\n"
