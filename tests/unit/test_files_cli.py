"""Host-side pieces of bind mounts and `cp` (desktop/files_cli.py), pure."""

from __future__ import annotations

import pytest

from desktop import files_cli
from desktop.engine_opts import FlagError
from vmkit.errors import ConfigError
from vmkit.shares import effective
from vmkit.spec import HostOS, Share


def test_parse_mount() -> None:
    assert files_cli.parse_mount("type=bind,source=/a,target=/b,readonly") == {
        "Type": "bind", "Source": "/a", "Target": "/b", "ReadOnly": True}
    assert files_cli.parse_mount("type=volume,src=v,dst=/d,volume-nocopy=true") == {
        "Type": "volume", "Source": "v", "Target": "/d", "ReadOnly": False, "VolumeOptions": {"NoCopy": True}}
    assert files_cli.parse_mount("type=tmpfs,target=/t,tmpfs-size=64m")["TmpfsOptions"] == {"SizeBytes": 64 << 20}
    with pytest.raises(FlagError):
        files_cli.parse_mount("type=bind,source=/a")
    with pytest.raises(FlagError):
        files_cli.parse_mount("type=bind,source=/a,target=/b,bogus=1")


def test_translate_binds_posix_and_windows() -> None:
    shares = effective((Share("/srv/code"),), True, "/home/me", HostOS.LINUX)
    cfg = {"HostConfig": {"Binds": ["/home/me/app:/app:ro", "data:/data"],
                          "Mounts": [{"Type": "bind", "Source": "/srv/code/x", "Target": "/x"}]}}
    files_cli.translate_mounts(cfg, shares, HostOS.LINUX)
    assert cfg["HostConfig"]["Binds"][:2] == ["/home/me/app:/app:ro", "data:/data"]
    assert cfg["HostConfig"]["Mounts"][0]["Source"] == "/srv/code/x"
    assert files_cli.host_to_guest("./rel", shares, HostOS.LINUX, cwd="/home/me/p") == "/home/me/p/rel"
    win = effective((), True, "C:\\Users\\me", HostOS.WINDOWS)
    cfg = {"HostConfig": {"Binds": ["C:\\Users\\me\\src:/src"]}}
    files_cli.translate_mounts(cfg, win, HostOS.WINDOWS)
    assert cfg["HostConfig"]["Binds"] == ["/mnt/host/c/Users/me/src:/src"]
    with pytest.raises(ConfigError):
        files_cli.translate_mounts({"HostConfig": {"Binds": ["/etc:/x"]}}, shares, HostOS.LINUX)


def test_split_cp_arg() -> None:
    assert files_cli.split_cp_arg("ctr:/etc/passwd", HostOS.LINUX) == ("ctr", "/etc/passwd")
    assert files_cli.split_cp_arg("./a:b", HostOS.LINUX) == (None, "./a:b")
    assert files_cli.split_cp_arg("/tmp/x", HostOS.LINUX) == (None, "/tmp/x")
    assert files_cli.split_cp_arg("C:\\x", HostOS.WINDOWS) == (None, "C:\\x")
    assert files_cli.split_cp_arg("-", HostOS.LINUX) == (None, "-")
