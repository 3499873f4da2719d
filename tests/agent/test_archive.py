"""`cp` archives (agent/archive.py) against a directory standing in for a container root.

The container's symlinks must resolve inside its root: a link to ``/`` or ``../..`` can
neither make a copy-in write outside the root nor a copy-out read outside it."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from agent import archive


def _tar(entries: dict[str, bytes | None], links: dict[str, str] | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in entries.items():
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.size, ti.mode, ti.mtime = len(data), 0o640, 1_000_000_000
                tar.addfile(ti, io.BytesIO(data))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tar.addfile(ti)
    buf.seek(0)
    return buf


@pytest.fixture
def world(tmp_path: Path) -> tuple[Path, Path]:
    """(container root, a directory outside it that must stay untouched)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("ctr\n")
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    return root, outside


def test_put_through_symlink_to_slash_stays_in_root(world: tuple[Path, Path]) -> None:
    root, outside = world
    os.symlink("/", root / "out")
    os.symlink(str(outside), root / "abs")  # an absolute host path: inside the root it means root/<that path>
    os.symlink("../../../../../../..", root / "up")
    with archive.open_root(str(root)) as fd:
        for where in ("/out", "/up", "/up/etc/..", "/out/out/up/"):
            archive.extract_tar(fd, where, _tar({"planted": b"x"}))
        with pytest.raises(archive.ArchiveError):
            archive.extract_tar(fd, "/abs", _tar({"planted": b"x"}))  # no such path in the container
    assert (root / "planted").read_bytes() == b"x"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not Path("/planted").exists()


def test_put_entry_through_container_symlink_and_dotdot(world: tuple[Path, Path]) -> None:
    root, outside = world
    os.symlink("/", root / "etc" / "escape")
    with archive.open_root(str(root)) as fd:
        archive.extract_tar(fd, "/etc", _tar({"escape/tmp-planted": b"y"}))
        with pytest.raises(archive.ArchiveError, match="leaves the extraction directory"):
            archive.extract_tar(fd, "/etc", _tar({"../../x": b"z"}))
    assert (root / "tmp-planted").read_bytes() == b"y"
    assert not (root.parent / "x").exists()


def test_put_does_not_follow_a_symlink_it_overwrites(world: tuple[Path, Path]) -> None:
    root, outside = world
    os.symlink(str(outside / "secret"), root / "etc" / "passwd")
    with archive.open_root(str(root)) as fd:
        archive.extract_tar(fd, "/etc", _tar({"passwd": b"root:x:0:0\n"}))
    assert (outside / "secret").read_text() == "host secret\n"
    assert (root / "etc" / "passwd").read_bytes() == b"root:x:0:0\n"
    assert not (root / "etc" / "passwd").is_symlink()


def test_get_of_symlink_to_outside_reads_container_file(world: tuple[Path, Path]) -> None:
    root, outside = world
    os.symlink(str(outside), root / "abs")
    (root / str(outside).lstrip("/")).mkdir(parents=True)
    (root / str(outside).lstrip("/") / "secret").write_text("container file\n")
    out = io.BytesIO()
    with archive.open_root(str(root)) as fd:
        archive.write_tar(fd, "/abs/", out)
        info = archive.path_stat(fd, "/abs")
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        names = tar.getnames()
        data = tar.extractfile("abs/secret").read()  # type: ignore[union-attr]
    assert names == ["abs", "abs/secret"]
    assert data == b"container file\n"
    assert info["linkTarget"] == str(outside)
    assert info["mode"] & (1 << 27)  # Go's ModeSymlink


def test_round_trip_keeps_modes_times_and_links(world: tuple[Path, Path]) -> None:
    root, _ = world
    with archive.open_root(str(root)) as fd:
        archive.extract_tar(fd, "/", _tar({"d": None, "d/f": b"data"}, {"d/l": "f"}), copy_owner=True)
        out = io.BytesIO()
        archive.write_tar(fd, "/d", out)
        header = json.loads(base64.b64decode(archive.stat_header(archive.path_stat(fd, "/d/f"))))
    st = os.stat(root / "d" / "f")
    assert oct(st.st_mode & 0o777) == oct(0o640) and int(st.st_mtime) == 1_000_000_000
    assert os.readlink(root / "d" / "l") == "f"
    assert header["name"] == "f" and header["size"] == 4
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        assert sorted(tar.getnames()) == ["d", "d/f", "d/l"]


def test_missing_paths_and_non_directories(world: tuple[Path, Path]) -> None:
    root, _ = world
    with archive.open_root(str(root)) as fd:
        with pytest.raises(archive.ArchiveError) as e1:
            archive.path_stat(fd, "/nope")
        with pytest.raises(archive.ArchiveError) as e2:
            archive.extract_tar(fd, "/etc/hostname", _tar({"x": b""}))
    assert e1.value.status == 404
    assert e2.value.status == 400
