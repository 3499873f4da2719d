"""Where host folders appear in the VM and how host paths become guest paths (vmkit/shares.py)."""

from __future__ import annotations

import pytest

from vmkit import shares
from vmkit.errors import ConfigError
from vmkit.settings import Settings
from vmkit.spec import HostOS, Share
from vmkit.vm import guest_config, vm_shares


def test_posix_shares_keep_their_path() -> None:
    got = shares.effective((Share("/srv/code"),), True, "/home/me", HostOS.LINUX)
    assert [(s.host_path, s.guest_path) for s in got] == [("/srv/code", "/srv/code"), ("/home/me", "/home/me")]
    assert shares.to_guest("/home/me/src/app", got, HostOS.LINUX) == "/home/me/src/app"
    assert shares.to_guest("/Users/me", shares.effective((), True, "/Users/me", HostOS.DARWIN), HostOS.DARWIN) == "/Users/me"


def test_windows_drives_go_under_a_fixed_prefix() -> None:
    got = shares.effective((), True, "C:\\Users\\me", HostOS.WINDOWS)
    assert got[0].guest_path == "/mnt/host/c/Users/me"
    assert shares.to_guest("C:\\Users\\me\\src", got, HostOS.WINDOWS) == "/mnt/host/c/Users/me/src"
    assert shares.to_guest("c:\\users\\me\\src", got, HostOS.WINDOWS) == "/mnt/host/c/Users/me/src"
    assert shares.split_volume_spec("C:\\src:/src:ro", HostOS.WINDOWS) == ("C:\\src", ":/src:ro")
    assert shares.parse_share("D:\\data:ro", HostOS.WINDOWS) == Share("D:\\data", "", True)


def test_guest_paths_lead_back_to_the_host_folder() -> None:
    linux = shares.effective((Share("/srv/code"),), True, "/home/me", HostOS.LINUX)
    assert shares.to_host("/home/me/src/app.py", linux, HostOS.LINUX) == "/home/me/src/app.py"
    assert shares.to_host("/srv/code", linux, HostOS.LINUX) == "/srv/code"
    assert shares.to_host("/srv/codex/a", linux, HostOS.LINUX) is None  # a prefix of the name is not inside
    assert shares.to_host("/etc/passwd", linux, HostOS.LINUX) is None
    assert shares.to_host("/srv/code/../../etc", linux, HostOS.LINUX) is None
    win = shares.effective((), True, "C:\\Users\\me", HostOS.WINDOWS)
    assert shares.to_host("/mnt/host/c/Users/me/src/app.py", win, HostOS.WINDOWS) == "C:\\Users\\me\\src\\app.py"
    assert shares.to_guest(shares.to_host("/mnt/host/c/Users/me/x", win, HostOS.WINDOWS) or "", win,
                           HostOS.WINDOWS) == "/mnt/host/c/Users/me/x"


def test_outside_every_share_is_refused_with_the_setting() -> None:
    got = shares.effective((), True, "/home/me", HostOS.LINUX)
    with pytest.raises(ConfigError) as exc:
        shares.to_guest("/etc", got, HostOS.LINUX)
    assert "--share" in (exc.value.hint or "") and "settings.json" in (exc.value.hint or "")
    with pytest.raises(ConfigError):
        shares.to_guest("/home/meme", got, HostOS.LINUX)  # a prefix of the name is not inside


def test_shares_may_not_hide_the_vms_own_folders() -> None:
    for bad in ("/", "/etc", "/usr/lib", "/var/lib/pydesk", "/run"):
        with pytest.raises(ConfigError):
            shares.effective((Share(bad),), False, "", HostOS.LINUX)
    # root's home is the VM's own /root: the default share is skipped, not an error
    assert shares.effective((), True, "/root", HostOS.LINUX) == ()
    with pytest.raises(ConfigError, match="overlap"):
        shares.effective((Share("/home/me/a"),), True, "/home/me", HostOS.LINUX)


def test_parse_share_and_guest_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from vmkit.host import host_os

    assert shares.parse_share("/data:ro", HostOS.LINUX) == Share("/data", "", True)
    with pytest.raises(ConfigError):
        shares.parse_share("relative/dir", HostOS.LINUX)
    (tmp_path / "a").mkdir()
    s = Settings(shares=(Share(str(tmp_path / "a"), read_only=True), Share(str(tmp_path / "gone"))), share_home=False)
    got = vm_shares(s, host_os(), home="/home/me")  # a folder that does not exist is left out
    assert guest_config(s, got).splitlines() == [f"share-ro={tmp_path}/a"]


def test_settings_round_trip_shares() -> None:
    s = Settings(shares=(Share("/srv/a", "", True),), share_home=False)
    assert Settings.from_json(s.to_json()) == s
    with pytest.raises(ConfigError):
        Settings.from_json({"shares": ["/srv/a"]})
