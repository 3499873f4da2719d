"""The run options that reach crun's config: --ulimit (rlimits), --tmpfs, --group-add, and
the network sysctls dockerd sets. Their effect inside containers is checked against a real
dockerd in tests/vm/test_docker_cli.py; here, their parsing and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import runtime
from agent.rootpath import lookup_groups
from agent.volumes import VolumeError, Volumes, plan, tmpfs_options


def test_ulimits_become_rlimits_over_the_defaults() -> None:
    assert runtime.rlimits(None) == runtime.DEFAULT_RLIMITS
    got = runtime.rlimits([{"Name": "nofile", "Soft": 100, "Hard": 200}, {"Name": "core", "Soft": -1, "Hard": -1}])
    assert got == (("RLIMIT_NOFILE", 100, 200), ("RLIMIT_CORE", -1, -1))
    spec = runtime.ContainerSpec(id="c" * 64, rootfs="/r", hostname="h",
                                 process=runtime.ProcessSpec(args=("true",), rlimits=got))
    assert runtime.oci_config(spec)["process"]["rlimits"] == [
        {"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200},
        {"type": "RLIMIT_CORE", "soft": 2**64 - 1, "hard": 2**64 - 1}]  # -1: unlimited
    for bad, message in (([{"Name": "files"}], "invalid ulimit type: files"),
                         ([{"Name": "nofile", "Soft": 5, "Hard": 2}], "soft limit must be less than or equal"),
                         ([{"Name": "nofile", "Soft": -1, "Hard": 2}], "soft limit must be less than or equal"),
                         ([{"Name": "nofile", "Soft": "x"}], "must be numbers"), (["nofile"], "invalid ulimit")):
        with pytest.raises(ValueError, match=message):
            runtime.rlimits(bad)  # type: ignore[arg-type]


def test_tmpfs_options_are_dockerds() -> None:
    assert tmpfs_options("") == (("nosuid", "nodev", "noexec"), False)
    assert tmpfs_options("rw,exec,size=64m,mode=1777") == (("nosuid", "nodev", "exec", "size=64m", "mode=1777"), False)
    assert tmpfs_options("ro,suid,uid=1000,noatime") == (("suid", "nodev", "noexec", "uid=1000", "noatime"), True)
    for bad in ("bogus", "size", "bind", "exec=1"):
        with pytest.raises(VolumeError, match="invalid tmpfs option"):
            tmpfs_options(bad)


def test_tmpfs_targets_are_checked_with_the_other_mounts(tmp_path: Path) -> None:
    vols = Volumes(tmp_path / "volumes")
    assert plan({"Tmpfs": {"/x": "size=1m"}}, {"/x": {}}, vols) == []  # the tmpfs wins over the image's VOLUME
    for host, message in (({"Tmpfs": {"x": ""}}, "invalid mount path: 'x' mount path must be absolute"),
                          ({"Tmpfs": {"/x": ""}, "Mounts": [{"Type": "tmpfs", "Target": "/x"}]}, "Duplicate mount point"),
                          ({"Tmpfs": {"/x": "nope"}}, "invalid tmpfs option")):
        with pytest.raises(VolumeError, match=message):
            plan(host, {}, vols)


def test_group_add_takes_gids_and_names_from_the_container(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/group").write_text("root:x:0:\naudio:x:29:\nstaff:x:50:me\n")
    assert lookup_groups(tmp_path, ["29", "staff", "1234"]) == (29, 50, 1234)
    assert lookup_groups(tmp_path, []) == ()
    with pytest.raises(KeyError, match="Unable to find group video: no matching entries in group file"):
        lookup_groups(tmp_path, ["video"])
