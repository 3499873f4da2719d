"""agent.layers.unpack_layer: normal layers, every hostile case, and real overlayfs semantics."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.layers import LayerError, unpack_layer

OUTSIDE = Path("/tmp/outside")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="layer unpacking tests run as root")


# -- building tars ----------------------------------------------------------------------------

def reg(name: str, data: bytes = b"x", mode: int = 0o644, uid: int = 0, gid: int = 0,
        mtime: int = 1_600_000_000, xattrs: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.uid, ti.gid, ti.mtime = len(data), mode, uid, gid, mtime
    if xattrs:
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return ti, data


def mkdir(name: str, mode: int = 0o755, mtime: int = 1_500_000_000) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, mtime
    return ti, None


def link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    ti.linkname, ti.mtime = target, 1_400_000_000
    return ti, None


def special(name: str, kind: bytes, major: int = 1, minor: int = 3) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.devmajor, ti.devminor, ti.mode = kind, major, minor, 0o666
    return ti, None


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def listing(root: Path) -> list[tuple[str, int, int, int, bytes]]:
    """Recursive (path, mode, uid, size, content-or-linktarget) listing, for before/after checks."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(p).encode()
            elif stat.S_ISREG(st.st_mode):
                content = p.read_bytes()
            else:
                content = b""
            out.append((str(p.relative_to(root)), st.st_mode, st.st_uid, st.st_size, content))
    return out


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "layer"
    d.mkdir()
    yield d


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[Path]:
    """A directory next to the unpack target that hostile layers aim at; must stay untouched."""
    s = tmp_path / "sentinel"
    s.mkdir()
    (s / "keep").write_text("keep")
    assert not OUTSIDE.exists(), "/tmp/outside exists before the test; remove it"
    before = listing(s)
    yield s
    assert listing(s) == before
    assert not OUTSIDE.exists(), "a hostile layer created /tmp/outside"


# -- normal layers --------------------------------------------------------------------------

NORMAL = [
    mkdir("./"),
    mkdir("etc"),
    reg("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    link("etc/localtime", "/usr/share/zoneinfo/UTC"),
    mkdir("usr/bin", 0o755),
    reg("usr/bin/su", b"\x7fELF-su", 0o4755),
    reg("usr/bin/wall", b"\x7fELF-wall", 0o2755, gid=5),
    link("usr/bin/su-again", "usr/bin/su", hard=True),
    link("usr/bin/sh", "../../bin/busybox"),
    mkdir("tmp", 0o1777),
    reg("home/user/.profile", b"export A=1\n", 0o600, uid=1000, gid=1000),
    reg("data/attr", b"x", xattrs={"user.note": "hello", "trusted.overlay.redirect": "/etc",
                                   "security.selinux": "evil_t"}),
    reg("etc/.wh.motd", b""),
    reg("var/cache/.wh..wh..opq", b""),
    reg("var/cache/new", b"new"),
]


def test_normal_layer(dest: Path, sentinel: Path) -> None:
    stats = unpack_layer(io.BytesIO(make_tar(NORMAL)), dest)
    assert stats.whiteouts == 1 and stats.opaque == 1
    assert stats.entries == len(NORMAL)
    assert (dest / "etc/passwd").read_bytes().startswith(b"root:")
    assert os.readlink(dest / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    assert os.readlink(dest / "usr/bin/sh") == "../../bin/busybox"
    su = (dest / "usr/bin/su").stat()
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert su.st_ino == (dest / "usr/bin/su-again").stat().st_ino and su.st_nlink == 2
    wall = (dest / "usr/bin/wall").stat()
    assert stat.S_IMODE(wall.st_mode) == 0o2755 and wall.st_gid == 5
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    prof = (dest / "home/user/.profile").stat()
    assert (prof.st_uid, prof.st_gid, stat.S_IMODE(prof.st_mode)) == (1000, 1000, 0o600)
    assert prof.st_mtime == 1_600_000_000
    assert (dest / "etc").stat().st_mtime == 1_500_000_000  # set after its children
    assert (dest / "etc/localtime").lstat().st_mtime == 1_400_000_000
    assert os.getxattr(dest / "data/attr", "user.note") == b"hello"
    attrs = os.listxattr(dest / "data/attr")
    assert "trusted.overlay.redirect" not in attrs and "security.selinux" not in attrs
    wh = (dest / "etc/motd").lstat()
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "var/cache", "trusted.overlay.opaque") == b"y"
    assert (dest / "var/cache/new").read_bytes() == b"new"


def test_later_entries_replace_earlier_ones(dest: Path) -> None:
    tar = make_tar([
        reg("a", b"first"), reg("a", b"second"),
        reg("b", b"file"), mkdir("b"), reg("b/inner", b"i"),
        mkdir("c"), reg("c/x"), link("c", "/etc"),
        link("d", "/etc"), reg("d", b"not a link"),
        reg("h", b"h"), link("h", "h", hard=True),
    ])
    unpack_layer(io.BytesIO(tar), dest)
    assert (dest / "a").read_bytes() == b"second"
    assert (dest / "b/inner").read_bytes() == b"i"
    assert os.readlink(dest / "c") == "/etc"
    assert (dest / "d").read_bytes() == b"not a link" and not (dest / "d").is_symlink()
    assert (dest / "h").read_bytes() == b"h"


def test_a_replaced_directory_is_not_written_through(dest: Path) -> None:
    """The unpacker keeps directories open between entries: one that a later entry replaces
    (by a file, then a new directory) is not where later entries go."""
    tar = make_tar([
        mkdir("c"), mkdir("c/d"), reg("c/d/old", b"old"),
        reg("c", b"a file now"), mkdir("c"), reg("c/d/new", b"new"),
        mkdir("e"), reg("e/x", b"x"), mkdir("e"), reg("e/y", b"y"),  # a dir entry again keeps it
        reg("f", b"target"), mkdir("g"), reg("g/h"), link("g", "f", hard=True), reg("g2/i", b"i"),
    ])
    unpack_layer(io.BytesIO(tar), dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "c", "c/d", "c/d/new", "e", "e/x", "e/y", "f", "g", "g2", "g2/i"]
    assert (dest / "c/d/new").read_bytes() == b"new"
    assert (dest / "g").read_bytes() == b"target" and (dest / "g").stat().st_ino == (dest / "f").stat().st_ino


def test_many_directories_keep_few_open(dest: Path) -> None:
    """Directory entries as real images have them, more of them than the process may open at
    once: the unpacker keeps a bounded number open, also while it sets their times at the end."""
    import resource

    entries = []
    for i in range(600):
        entries += [mkdir(f"d{i}"), mkdir(f"d{i}/s"), reg(f"d{i}/s/f", b"x")]
    tar = make_tar(entries)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (before + 400, hard))
    try:
        unpack_layer(io.BytesIO(tar), dest)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(os.listdir(dest)) == 600 and (dest / "d599/s/f").read_bytes() == b"x"
    untimed = [d for i in range(600) for d in (f"d{i}", f"d{i}/s") if (dest / d).stat().st_mtime != 1_500_000_000]
    assert untimed == []  # the times set at the end, every one
    assert len(os.listdir("/proc/self/fd")) == before  # all closed at the end


def test_fifo_allowed_and_whiteout_of_same_layer_entry_ignored(dest: Path) -> None:
    unpack_layer(io.BytesIO(make_tar([special("run/fifo", tarfile.FIFOTYPE),
                                      reg("keep", b"k"), reg(".wh.keep", b"")])), dest)
    assert stat.S_ISFIFO((dest / "run/fifo").lstat().st_mode)
    assert (dest / "keep").read_bytes() == b"k"


def test_aufs_metadata_is_skipped(dest: Path) -> None:
    unpack_layer(io.BytesIO(make_tar([mkdir(".wh..wh.plnk"), reg(".wh..wh.plnk/123.456"),
                                      reg("ok")])), dest)
    assert sorted(os.listdir(dest)) == ["ok"]


# -- hostile layers -------------------------------------------------------------------------

HOSTILE: list[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]], str]] = [
    ("dotdot", [reg("../evil")], "'../evil'"),
    ("absolute", [reg("/abs")], "'/abs'"),
    ("dotdot-inner", [reg("a/../../x")], "'a/../../x'"),
    ("dotdot-deep", [mkdir("a"), reg("a/b/../../../sentinel/keep", b"pwned")], "'..' component"),
    ("write-through-symlink", [link("d", str(OUTSIDE)), reg("d/file", b"pwned")],
     "'d/file': path goes through symlink 'd'"),
    ("dir-through-symlink", [link("d", str(OUTSIDE)), mkdir("d/sub")], "'d/sub'"),
    ("whiteout-through-symlink", [link("d", str(OUTSIDE)), reg("d/.wh.x", b"")], "'d/.wh.x'"),
    ("opaque-through-symlink", [link("d", str(OUTSIDE)), reg("d/.wh..wh..opq", b"")], "'d/.wh..wh..opq'"),
    ("hardlink-through-symlink", [link("d", "/etc"), link("pw", "d/passwd", hard=True)],
     "'pw': hardlink target 'd/passwd': path goes through symlink 'd'"),
    ("hardlink-outside", [link("pw", "../../etc/passwd", hard=True)], "'pw'"),
    ("hardlink-absolute", [link("pw", "/etc/passwd", hard=True)], "'pw'"),
    ("hardlink-nonexistent", [link("pw", "etc/passwd", hard=True)], "'pw': hardlink target 'etc/passwd'"),
    ("hardlink-nonexistent-file", [mkdir("etc"), link("pw", "etc/passwd", hard=True)],
     "'pw': hardlink target 'etc/passwd' is not an earlier entry"),
    ("hardlink-to-symlink", [link("s", "/etc/passwd"), link("pw", "s", hard=True)],
     "'pw': hardlink target 's' is not a regular file"),
    ("hardlink-to-dir", [mkdir("dd"), link("pw", "dd", hard=True)], "'pw'"),
    ("char-device", [special("dev/mem", tarfile.CHRTYPE, 1, 1)], "'dev/mem': device nodes"),
    ("char-device-0-0", [special("fake-whiteout", tarfile.CHRTYPE, 0, 0)], "'fake-whiteout'"),
    ("block-device", [special("dev/sda", tarfile.BLKTYPE, 8, 0)], "'dev/sda': device nodes"),
    ("whiteout-dotdot", [reg(".wh..", b"")], "'.wh..': malformed whiteout"),
    ("whiteout-dotdotdot", [reg("a/.wh...", b"")], "'a/.wh...': malformed whiteout"),
    ("whiteout-empty", [reg(".wh.", b"")], "'.wh.': malformed whiteout"),
    ("whiteout-as-dir", [reg("dir/.wh.a/b", b"")], "'dir/.wh.a/b': malformed whiteout"),
    ("opaque-at-root", [reg(".wh..wh..opq", b"")], "'.wh..wh..opq': opaque marker"),
    # a directory already opened (and kept open by the unpacker) is replaced by a symlink
    ("write-through-replaced-dir", [mkdir("c"), reg("c/x"), link("c", str(OUTSIDE)), reg("c/y", b"pwned")],
     "'c/y': path goes through symlink 'c'"),
    ("write-through-replaced-subdir", [mkdir("c"), mkdir("c/d"), reg("c/d/x"), link("c", str(OUTSIDE)),
                                       reg("c/d/y", b"pwned")], "'c/d/y': path goes through symlink 'c'"),
    ("hardlink-into-replaced-dir", [mkdir("c"), reg("c/x"), link("c", "/etc"), link("pw", "c/passwd", hard=True)],
     "'pw': hardlink target 'c/passwd': path goes through symlink 'c'"),

]


def _unknown_type() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    ti = tarfile.TarInfo("weird")
    ti.type = b"Z"
    return [(ti, None)]


def _bad_owner() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    ti, data = reg("owned")
    ti.pax_headers = {"uid": "-5"}
    return [(ti, data)]


def _nul_name() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    ti, data = reg("a")
    ti.pax_headers = {"path": "a\x00b"}  # a ustar name cannot hold NUL, a PAX path can
    return [(ti, data)]


HOSTILE.append(("unknown-type", _unknown_type(), "'weird': unknown tar entry type"))
HOSTILE.append(("nul-in-name", _nul_name(), "name contains NUL"))
HOSTILE.append(("negative-uid", _bad_owner(), "'owned': invalid owner"))
HOSTILE.append(("too-deep", [reg("d/" * 300 + "f")], "more than 256 path components"))
HOSTILE.append(("too-long", [reg("n" * 5000)], "name longer than 4096 bytes"))


@pytest.mark.parametrize("entries,message", [(e, m) for _, e, m in HOSTILE],
                         ids=[n for n, _, _ in HOSTILE])
def test_hostile_layer_rejected(dest: Path, sentinel: Path,
                                entries: list[tuple[tarfile.TarInfo, bytes | None]], message: str) -> None:
    with pytest.raises(LayerError) as exc:
        unpack_layer(io.BytesIO(make_tar(entries)), dest)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_truncated_tar(dest: Path, sentinel: Path) -> None:
    tar = make_tar([reg(f"f{i}", b"abc" * 300) for i in range(5)])
    for cut in (700, 2048, 1536 * 3, 1536 * 5):  # mid-data, mid-header, at entry boundaries
        d = dest / f"cut{cut}"
        d.mkdir()
        with pytest.raises(LayerError, match="truncated"):
            unpack_layer(io.BytesIO(tar[:cut]), d)


def test_garbage_is_rejected(dest: Path) -> None:
    with pytest.raises(LayerError):
        unpack_layer(io.BytesIO(b"\x01" * 5000), dest)


def test_limits(tmp_path: Path) -> None:
    tar = make_tar([reg(f"f{i}", b"z" * 100) for i in range(10)])
    for n, kw, msg in [(1, {"max_entries": 5}, "more than 5 entries"),
                       (2, {"max_bytes": 550}, "exceeds the limit of 550 bytes")]:
        d = tmp_path / f"l{n}"
        d.mkdir()
        with pytest.raises(LayerError, match=msg):
            unpack_layer(io.BytesIO(tar), d, **kw)  # type: ignore[arg-type]


def test_oversized_pax_header_and_sparse_files_rejected(tmp_path: Path) -> None:
    ti, data = reg("big")
    ti.pax_headers = {"comment": "x" * (2 << 20)}
    sparse = tarfile.TarInfo("holes")
    sparse.type, sparse.size = tarfile.GNUTYPE_SPARSE, 0
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(sparse, io.BytesIO(b""))
    for n, (tar, msg) in enumerate([(make_tar([(ti, data)]), "extended header"),
                                    (buf.getvalue(), "'holes': sparse files are not supported")]):
        d = tmp_path / f"d{n}"
        d.mkdir()
        with pytest.raises(LayerError, match=msg):
            unpack_layer(io.BytesIO(tar), d)


def test_dest_must_be_empty(dest: Path) -> None:
    (dest / "x").write_text("x")
    with pytest.raises(LayerError, match="not empty"):
        unpack_layer(io.BytesIO(make_tar([reg("a")])), dest)


# -- overlayfs applies our whiteouts ----------------------------------------------------------

def overlay_mount(lowers: list[Path], target: Path) -> None:
    """mount -t overlay, lowerdir top-most first; skips if the host does not allow it."""
    opts = "lowerdir=" + ":".join(str(p) for p in lowers)
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"overlayfs mount not permitted on this host: {proc.stderr.strip()}")


def test_overlay_applies_whiteouts(tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        pytest.skip("overlayfs mount not permitted on this host: no mount(8)")
    base = make_tar([reg("etc/gone", b"lower"), reg("etc/stays", b"lower"),
                     reg("opq/old", b"old"), reg("opq/sub/deep", b"old"), reg("plain/old", b"old")])
    top = make_tar([reg("etc/.wh.gone", b""), reg("opq/.wh..wh..opq", b""), reg("opq/new", b"new"),
                    reg("plain/new", b"new")])
    l1, l2, mnt = tmp_path / "l1", tmp_path / "l2", tmp_path / "mnt"
    for d in (l1, l2, mnt):
        d.mkdir()
    unpack_layer(io.BytesIO(base), l1)
    unpack_layer(io.BytesIO(top), l2)
    overlay_mount([l2, l1], mnt)
    try:
        assert not (mnt / "etc/gone").exists()
        assert (mnt / "etc/stays").read_bytes() == b"lower"
        assert sorted(os.listdir(mnt / "opq")) == ["new"]
        assert sorted(os.listdir(mnt / "plain")) == ["new", "old"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


class _CountingStream(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        return super().read(size)


def test_source_is_read_in_large_pieces(dest: Path) -> None:
    """Every read of the source goes through gunzip and two hashes: a 9 MB layer of one big
    file and 300 small ones is read in ~1 MiB pieces, not tarfile's 10 KiB (was ~900 reads)."""
    big = os.urandom(1 << 16) * 128  # 8 MiB
    entries = [reg("big", big)] + [reg(f"d/small{i}", bytes([i % 256]) * (i * 7)) for i in range(300)]
    tar = make_tar(entries)
    src = _CountingStream(tar)
    stats = unpack_layer(src, dest)  # type: ignore[arg-type]
    assert stats.entries == 301
    assert src.reads <= len(tar) // (1 << 20) + 3, src.reads
    assert (dest / "big").read_bytes() == big
    assert all((dest / f"d/small{i}").read_bytes() == bytes([i % 256]) * (i * 7) for i in range(300))
    # the stream was read to its end; what came after the end-of-archive block was read ahead
    # (the padding to tar's 10 KiB record), and the store counts it against its trailing budget
    assert src.tell() == len(tar)
    assert 0 < stats.read_past_end <= tarfile.RECORDSIZE
    end_block = len(tar) - stats.read_past_end - tarfile.BLOCKSIZE
    assert tar[end_block:].count(0) == len(tar) - end_block
