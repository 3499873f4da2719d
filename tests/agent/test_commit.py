"""agent.commit and its parts: an overlayfs upper dir as an OCI layer (through a real overlay
mount), `--change` instructions, and `import` of plain and compressed tars into a real Store."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from agent import archive, changes, commit
from agent.store import Store
from tests.agent.test_store import TAR, add, snapshot, tar_of

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts and the store need root")


def tree(root: Path) -> dict[str, str]:
    """{relative path: what it is} of a directory, as a container would see it."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_text()
    return out


def test_an_upper_dir_becomes_a_layer_that_rebuilds_the_merged_tree(store: Store, tmp_path: Path) -> None:
    base = add(store, [tar_of({"etc/": None, "etc/keep": b"k", "etc/gone": b"g", "data/": None, "data/old": b"o",
                               "bin/": None, "bin/sh": "->busybox"})], ["b:1"])
    lower = store.image(base).lower_dirs
    upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={':'.join(map(str, lower))},upperdir={upper},workdir={work}", str(merged)], check=True)
    try:
        (merged / "etc/gone").unlink()                  # a whiteout
        subprocess.run(["rm", "-rf", str(merged / "data")], check=True)
        (merged / "data").mkdir()                        # an opaque directory
        (merged / "data/new").write_text("n")
        (merged / "etc/keep").write_text("changed")      # a copy-up
        (merged / "hostname").write_text("")             # an engine mount point: skipped
        expected = tree(merged)
        expected.pop("hostname")
        buf = io.BytesIO()
        fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
        try:
            n = archive.write_tree(fd, buf, layer=True, skip=frozenset({"hostname"}))
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
        names = tf.getnames()
    assert sorted(names) == ["data", "data/.wh..wh..opq", "data/new", "etc", "etc/.wh.gone", "etc/keep"]
    assert n == len(names)
    # the layer, unpacked by the store on top of the image's, is the tree the container saw
    digest, _ = store.put_layer_tar(lambda out: out.write(buf.getvalue()))
    doc = json.loads(store.config_bytes(base))
    doc["rootfs"]["diff_ids"].append(digest)
    new = store.add_image(json.dumps(doc).encode(), None, [*store.image(base).layers, (digest, TAR)], ["b:2"])
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    lowers = store.image(new).lower_dirs
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={':'.join(map(str, lowers))}",
                    str(rebuilt)], check=True)
    try:
        assert tree(rebuilt) == expected
    finally:
        subprocess.run(["umount", str(rebuilt)], check=True)


def test_changes_are_applied_as_dockerd_applies_them() -> None:
    config = {"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"], "WorkingDir": "/srv"}
    changes.apply(config, ['CMD ["nginx", "-g", "daemon off;"]', "ENTRYPOINT echo hi", "ENV A=2 B='two words'",
                           "ENV C the rest", "LABEL a=b c=\"d e\"", "EXPOSE 80 53/udp", 'VOLUME ["/data"]',
                           "VOLUME /a /b", "USER nobody", "WORKDIR app", "STOPSIGNAL SIGQUIT",
                           "ONBUILD RUN true\nexpose 8080"])
    assert config == {
        "Env": ["PATH=/bin", "A=2", "B=two words", "C=the rest"], "Cmd": ["nginx", "-g", "daemon off;"],
        "Entrypoint": ["/bin/sh", "-c", "echo hi"], "Labels": {"a": "b", "c": "d e"},
        "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080/tcp": {}}, "Volumes": {"/data": {}, "/a": {}, "/b": {}},
        "User": "nobody", "WorkingDir": "/srv/app", "StopSignal": "SIGQUIT", "OnBuild": ["RUN true"]}
    shell = {"Shell": ["/bin/bash", "-c"]}
    changes.apply(shell, ["CMD ls"])
    assert shell["Cmd"] == ["/bin/bash", "-c", "ls"]
    for bad, message in (("FROM busybox", "from is not a valid change command"),
                         ("RUN true", "run is not a valid change command"),
                         ("FOO bar", "unknown instruction: FOO"), ("EXPOSE eighty", "Invalid containerPort: eighty"),
                         ("CMD", "CMD requires at least one argument"), ("ENV A", "must be followed by a value"),
                         ("SHELL bash", "SHELL requires the arguments to be in JSON form")):
        with pytest.raises(changes.ChangeError, match=message):
            changes.apply({}, [bad])


def _zstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("pack", [lambda t: t, gzip.compress, bz2.compress, lzma.compress, _zstd],
                         ids=["tar", "gzip", "bzip2", "xz", "zstd"])
def test_import_reads_plain_and_compressed_tars(store: Store, pack) -> None:  # type: ignore[no-untyped-def]
    data = tar_of({"bin/": None, "bin/hello": b"hi\n", "etc/": None})
    image_id = commit.import_image(store, io.BytesIO(pack(data)), tag="docker.io/library/imported:1",
                                   message="", change_list=["CMD /bin/hello"], platform=None)
    img = store.image("docker.io/library/imported:1")
    assert img.id == image_id and len(img.diff_ids) == 1
    assert img.config["config"] == {"Cmd": ["/bin/sh", "-c", "/bin/hello"]}
    assert img.config["history"][0]["comment"] == "Imported from -"
    assert (img.lower_dirs[0] / "bin/hello").read_bytes() == b"hi\n"


def test_a_bad_import_leaves_the_store_as_it_was(store: Store) -> None:
    add(store, [tar_of({"a": b"a"})], ["keep:1"])
    before = snapshot(store.root)
    for body, message in ((gzip.compress(os.urandom(5000))[:100], "cannot be decompressed"),
                          (bz2.compress(os.urandom(5000))[:400], "cannot be decompressed"),
                          (b"not a tar at all" * 100, "invalid header"),
                          (tar_of({"../escape": b"x"}), r"\.\.")):
        with pytest.raises(Exception, match=message) as info:
            commit.import_image(store, io.BytesIO(body), tag="docker.io/library/bad:1", message="",
                                change_list=[], platform=None)
        assert "Traceback" not in str(info.value)
        assert snapshot(store.root) == before
    with pytest.raises(commit.CommitError, match="only linux images"):
        commit.import_image(store, io.BytesIO(tar_of({"a": b"a"})), tag=None, message="", change_list=[],
                            platform="windows/amd64")


def test_a_directory_copied_up_only_for_skipped_mount_points_is_no_change(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "etc", upper / "etc", upper / "new"):
        d.mkdir(parents=True)
        d.chmod(0o755)
    (upper / "etc/hostname").write_text("")

    def below(rel: str) -> os.stat_result | None:
        return os.lstat(lower / rel) if os.path.lexists(lower / rel) else None

    def names() -> list[str]:
        buf = io.BytesIO()
        fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
        try:
            n = archive.write_tree(fd, buf, layer=True, skip=frozenset({"etc/hostname"}), lower=below)
        finally:
            os.close(fd)
        with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tf:
            assert len(tf.getnames()) == n
            return tf.getnames()

    assert names() == ["new"]  # a new directory is a change even when empty
    (upper / "new").rmdir()
    assert names() == []  # etc was copied up for the mount point only
    (upper / "etc").chmod(0o700)
    assert names() == ["etc"]  # its own metadata changed
    (upper / "etc").chmod(0o755)
    (upper / "etc/motd").write_text("hi")
    assert names() == ["etc", "etc/motd"]  # the parent comes first


def test_the_lower_layers_are_looked_up_as_overlayfs_merges_them(tmp_path: Path) -> None:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    (bottom / "etc").mkdir(parents=True)
    (bottom / "etc/hosts").write_text("x")
    (bottom / "gone").write_text("x")
    (bottom / "data").mkdir()
    top.mkdir()
    (top / "etc").symlink_to("/etc")  # an absolute link, as images have: never followed
    os.mknod(top / "gone", 0o600 | stat.S_IFCHR, 0)  # a whiteout
    lowers = [top, bottom]
    assert commit.lower_stat(lowers, "etc/passwd") is None and commit.lower_stat(lowers, "etc/hosts") is None
    assert stat.S_ISLNK(commit.lower_stat(lowers, "etc").st_mode)  # type: ignore[union-attr]
    assert commit.lower_stat(lowers, "gone") is None
    assert stat.S_ISDIR(commit.lower_stat(lowers, "data").st_mode)  # type: ignore[union-attr]
    assert commit.lower_stat(lowers, "data/none") is None
