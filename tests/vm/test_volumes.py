"""Named and anonymous volumes and `cp`, through the real VM (the shared one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import Pydesk

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm(shared_vm: Pydesk) -> Pydesk:
    for image in ("busybox", "volume"):
        shared_vm("pull", image, check=True)
    return shared_vm


def uid() -> str:
    return uuid.uuid4().hex[:10]


def test_named_volume_commands(vm: Pydesk) -> None:
    name = "v" + uid()
    assert vm("volume", "create", "--label", "team=a", name, check=True).stdout.strip() == name
    assert name in vm("volume", "ls", "-q", check=True).stdout.split()
    assert name in vm("volume", "ls", "-q", "--filter", "label=team=a", check=True).stdout.split()
    assert name not in vm("volume", "ls", "-q", "--filter", "label=team=b", check=True).stdout.split()
    info = json.loads(vm("volume", "inspect", name, check=True).stdout)[0]
    assert info["Name"] == name and info["Driver"] == "local" and info["Labels"] == {"team": "a"}
    vm("run", "--rm", "-v", f"{name}:/data", "busybox", "sh", "-c", "echo kept > /data/f", check=True)
    cname = "c" + uid()
    vm("create", "--name", cname, "-v", f"{name}:/data", "busybox", "true", check=True)
    proc = vm("volume", "rm", name)
    assert proc.returncode == 1 and "in use" in proc.stderr
    vm("rm", cname, check=True)
    assert vm("volume", "rm", name, check=True).stdout.strip() == name
    proc = vm("volume", "inspect", name)
    assert proc.returncode == 1 and "no such volume" in proc.stderr
    proc = vm("volume", "create", "bad/name")
    assert proc.returncode == 1 and "invalid characters" in proc.stderr


def test_image_volume_is_anonymous_prefilled_and_removed_with_rm(vm: Pydesk) -> None:
    before = set(vm("volume", "ls", "-q", check=True).stdout.split())
    cname = "c" + uid()
    out = vm("run", "--name", cname, "volume", "sh", "-c",
             "cat /data/seed.txt /data/sub/deep; stat -c '%a' /data /data/seed.txt", check=True).stdout
    assert out.split("\n")[:4] == ["from the image", "deep", "750", "640"]
    new = set(vm("volume", "ls", "-q", check=True).stdout.split()) - before
    assert len(new) == 1
    mounts = json.loads(vm("inspect", cname, check=True).stdout)[0]["Mounts"]
    assert [(m["Type"], m["Name"], m["Destination"]) for m in mounts] == [("volume", next(iter(new)), "/data")]
    vm("rm", "-v", cname, check=True)
    assert set(vm("volume", "ls", "-q", check=True).stdout.split()) == before
    vm("run", "--rm", "volume", "true", check=True)  # --rm takes its anonymous volume along
    assert set(vm("volume", "ls", "-q", check=True).stdout.split()) == before
    # a named volume over the image's VOLUME is filled from the image too, once, when empty
    name = "v" + uid()
    vm("run", "--rm", "-v", f"{name}:/data", "volume", "sh", "-c", "echo mine > /data/seed.txt", check=True)
    out = vm("run", "--rm", "-v", f"{name}:/data", "volume", "cat", "/data/seed.txt", check=True).stdout
    assert out == "mine\n"
    vm("volume", "rm", name, check=True)


def test_volume_prune_takes_anonymous_unless_all(vm: Pydesk) -> None:
    named = "v" + uid()
    vm("volume", "create", named, check=True)
    cname = "c" + uid()
    vm("create", "--name", cname, "volume", "true", check=True)
    anon = json.loads(vm("inspect", cname, check=True).stdout)[0]["Mounts"][0]["Name"]
    vm("rm", cname, check=True)  # without -v: the anonymous volume stays, unused
    out = vm("volume", "prune", "-f", check=True).stdout
    assert anon in out and named not in out
    out = vm("volume", "prune", "-f", "--all", check=True).stdout
    assert named in out


def test_cp_both_ways(vm: Pydesk, tmp_path: Path) -> None:
    cname = "c" + uid()
    vm("run", "-d", "--name", cname, "busybox", "sleep", "600", check=True)
    try:
        src = tmp_path / "tree"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "one").write_text("1\n")
        os.chmod(src / "sub" / "one", 0o751)
        os.symlink("one", src / "sub" / "link")
        vm("cp", str(src), f"{cname}:/tmp/", check=True)
        vm("cp", str(src / "sub" / "one"), f"{cname}:/tmp/renamed", check=True)
        out = vm("exec", cname, "sh", "-c", "cat /tmp/tree/sub/one /tmp/renamed; readlink /tmp/tree/sub/link; "
                 "stat -c '%a %u' /tmp/tree/sub/one", check=True).stdout
        assert out == "1\n1\none\n751 0\n"
        back = tmp_path / "back"
        back.mkdir()
        vm("cp", f"{cname}:/tmp/tree", str(back), check=True)
        vm("cp", f"{cname}:/tmp/tree/.", str(back / "contents"), check=True)
        vm("cp", f"{cname}:/etc/passwd", str(back / "pw"), check=True)
        assert (back / "tree" / "sub" / "one").read_text() == "1\n"
        assert os.readlink(back / "tree" / "sub" / "link") == "one"
        assert ((back / "tree" / "sub" / "one").stat().st_mode & 0o777) == 0o751
        assert (back / "contents" / "sub" / "one").exists()
        assert (back / "pw").read_text().startswith("root:")
        proc = vm("cp", f"{cname}:/no/such", str(back))
        assert proc.returncode == 1 and "Could not find the file /no/such" in proc.stderr
    finally:
        vm("rm", "-f", cname)


def test_cp_cannot_escape_through_a_container_symlink(vm: Pydesk, tmp_path: Path) -> None:
    cname = "c" + uid()
    marker = "escape-" + uid()
    vm("run", "-d", "--name", cname, "busybox", "sh", "-c", "ln -s / /escape; ln -s ../../.. /up; sleep 600",
       check=True)
    try:
        f = tmp_path / marker
        f.write_text("payload\n")
        for dest in (f"{cname}:/escape/", f"{cname}:/escape/tmp/", f"{cname}:/up/"):
            vm("cp", str(f), dest, check=True)
        out = vm("exec", cname, "sh", "-c", f"ls /{marker} /tmp/{marker}", check=True).stdout
        assert sorted(out.split()) == sorted([f"/tmp/{marker}", f"/{marker}"])
        # nothing landed in the VM itself
        assert vm.sh(f"ls /{marker} /tmp/{marker} /var/lib/pydesk/{marker} 2>/dev/null; true").stdout == ""
        # reading through the link reads the container's own files
        vm("cp", f"{cname}:/escape/etc/hostname", str(tmp_path / "h"), check=True)
        own = vm("exec", cname, "cat", "/etc/hostname", check=True).stdout
        assert (tmp_path / "h").read_text() == own
        if shutil.which("docker"):
            env = dict(vm.env, DOCKER_HOST="unix://" + str(vm.run_dir / "engine.sock"))
            proc = subprocess.run(["docker", "cp", str(f), f"{cname}:/escape/root/"], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            assert vm("exec", cname, "ls", f"/root/{marker}", check=True).stdout.strip() == f"/root/{marker}"
            assert vm.sh(f"ls /root/{marker} 2>/dev/null; true").stdout == ""
    finally:
        vm("rm", "-f", cname)


def test_volumes_survive_vm_restart(vm: Pydesk) -> None:
    """Last in this module: restarts the shared VM (its settings, shares included, are saved)."""
    name = "v" + uid()
    vm("run", "--rm", "-v", f"{name}:/data", "busybox", "sh", "-c", "echo survives > /data/f", check=True)
    vm("vm", "restart", check=True, timeout=600)
    out = vm("run", "--rm", "-v", f"{name}:/data", "busybox", "cat", "/data/f", check=True).stdout
    assert out == "survives\n"
    vm("volume", "rm", name, check=True)
    share: Path = vm.share  # type: ignore[attr-defined]
    (share / "after-restart.txt").write_text("still shared\n")
    out = vm("run", "--rm", "-v", f"{share}:/s", "busybox", "cat", "/s/after-restart.txt", check=True).stdout
    assert out == "still shared\n"
