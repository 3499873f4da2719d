"""agent.store.Store: blobs, unpack (gzip/zstd/tar), images, rmi/prune, save/load — and that
every hostile input is rejected with the store unchanged and nothing written outside it."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.layers import LayerError
from agent.store import DigestMismatch, ImageInUse, ImageNotFound, Store, StoreError, chain_id
from tests.agent.test_hash_behind import _wait_for_no_hash_thread

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="store tests run as root")

OUTSIDE = Path("/tmp/outside")
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZST = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZ = "application/vnd.docker.image.rootfs.diff.tar.gzip"


# -- helpers ----------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes | str | None]) -> bytes:
    """{name: bytes (file) | "->target" (symlink) | None (dir)} -> tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, content in files.items():
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_600_000_000
            if content is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif isinstance(content, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, content.removeprefix("->")
                tf.addfile(ti)
            else:
                ti.size, ti.mode = len(content), 0o644
                tf.addfile(ti, io.BytesIO(content))
    return buf.getvalue()


def compress(tar: bytes, media_type: str) -> bytes:
    if media_type in (GZ, DOCKER_GZ):
        return gzip.compress(tar, mtime=0)
    if media_type == ZST:
        return subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout
    return tar


def config_for(diff_ids: list[str], created: str = "2024-01-01T00:00:00Z", cmd: str = "sh") -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "created": created,
                       "config": {"Cmd": [cmd]},
                       "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()


def ingest(store: Store, blob: bytes) -> str:
    """Write a blob the way a pull does (into ingest/) and commit it."""
    digest = sha(blob)
    path = store.ingest_path(digest)
    path.write_bytes(blob)
    store.commit_blob(path, digest, len(blob))
    return digest


def add(store: Store, tars: list[bytes], tags: list[str], media_type: str = GZ,
        cmd: str = "sh") -> str:
    layers = []
    for t in tars:
        layers.append((ingest(store, compress(t, media_type)), media_type))
    return store.add_image(config_for([sha(t) for t in tars], cmd=cmd), None, layers, tags)


def snapshot(root: Path) -> list[tuple[str, int, int, bytes]]:
    """Recursive listing of the store (excluding tmp/ and lock files), with file contents."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if d != "tmp"]
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel in ("lock", "ops.lock"):
                continue
            st = p.lstat()
            content = p.read_bytes() if stat.S_ISREG(st.st_mode) else (
                os.readlink(p).encode() if stat.S_ISLNK(st.st_mode) else b"")
            out.append((rel, st.st_mode, st.st_size, content))
    return out


@pytest.fixture
def guard(tmp_path: Path, store: Store) -> Iterator[None]:
    """Sentinel dir next to the store and /tmp/outside must be untouched by the test."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("keep")
    assert not OUTSIDE.exists(), "/tmp/outside exists before the test; remove it"
    yield
    assert sorted(os.listdir(sentinel)) == ["keep"] and (sentinel / "keep").read_text() == "keep"
    assert not OUTSIDE.exists(), "a hostile input created /tmp/outside"
    assert os.listdir(store.root / "tmp") == [], "tmp/ not cleaned after the operation"


BASE = tar_of({"bin/": None, "bin/sh": b"#!busybox\n", "etc/": None, "etc/os-release": b"ID=test\n",
               "etc/localtime": "->/usr/share/zoneinfo/UTC", "etc/motd": b"hello\n",
               "var/cache/": None, "var/cache/old": b"old"})
TOP = tar_of({"etc/.wh.motd": b"", "var/cache/.wh..wh..opq": b"", "var/cache/new": b"new",
              "app/": None, "app/main": b"print(1)\n"})


# -- blobs --------------------------------------------------------------------------------------

def test_commit_blob_verifies_digest_and_size(store: Store, tmp_path: Path, guard: None) -> None:
    data = b"some layer bytes"
    before = snapshot(store.root)
    outside = tmp_path / "download"
    outside.write_bytes(data)
    with pytest.raises(DigestMismatch, match="size"):
        store.commit_blob(outside, sha(data), len(data) + 1)
    with pytest.raises(DigestMismatch, match=sha(b"other")):
        store.commit_blob(outside, sha(b"other"), len(data))
    assert outside.read_bytes() == data  # files outside the store are left alone
    assert snapshot(store.root) == before
    bad = store.ingest_path(sha(b"other"))
    bad.write_bytes(data)
    with pytest.raises(DigestMismatch):
        store.commit_blob(bad, sha(b"other"), len(data))
    assert not bad.exists(), "a corrupt partial download must not be resumed"
    assert snapshot(store.root) == before
    path = store.commit_blob(outside, sha(data), len(data))
    assert store.has_blob(sha(data)) and path.read_bytes() == data
    with store.open_blob(sha(data)) as f:
        assert f.read() == data
    for evil in ("sha256:../../etc", "md5:abc", "sha256:" + "A" * 64):
        with pytest.raises(StoreError, match="invalid or unsupported digest"):
            store.blob_path(evil)


# -- unpack and images --------------------------------------------------------------------------

@pytest.mark.parametrize("media_type", [GZ, ZST, TAR, DOCKER_GZ])
def test_add_image_each_compression(store: Store, media_type: str, guard: None) -> None:
    image_id = add(store, [BASE, TOP], ["docker.io/library/test:latest"], media_type)
    rec = store.image("docker.io/library/test:latest")
    assert rec.id == image_id and rec.tags == ["docker.io/library/test:latest"]
    c1 = chain_id(None, sha(BASE))
    c2 = chain_id(c1, sha(TOP))
    assert rec.chain_ids == [c1, c2] and c1 == sha(BASE)
    assert rec.lower_dirs == [store.root / "layers" / c2[7:] / "diff", store.root / "layers" / c1[7:] / "diff"]
    assert store.lower_dirs(image_id) == rec.lower_dirs
    top = rec.lower_dirs[0]
    assert stat.S_ISCHR((top / "etc/motd").lstat().st_mode)
    assert os.getxattr(top / "var/cache", "trusted.overlay.opaque") == b"y"
    assert os.readlink(rec.lower_dirs[1] / "etc/localtime") == "/usr/share/zoneinfo/UTC"
    meta = json.loads((store.root / "layers" / c2[7:] / "meta.json").read_text())
    assert meta["diff_id"] == sha(TOP) and meta["parent"] == c1 and meta["tar_size"] == len(TOP)
    assert rec.size > 0 and rec.created == "2024-01-01T00:00:00Z"
    assert (store.root / "images" / f"{image_id[7:]}.json").read_bytes() == store.config_bytes(image_id)


def test_lookup_by_id_prefix_digest_and_tags(store: Store) -> None:
    image_id = add(store, [BASE], ["docker.io/library/a:1"])
    for ref in (image_id, image_id[7:], image_id[7:19], image_id[:12 + 7]):
        assert store.image(ref).id == image_id
    with pytest.raises(ImageNotFound, match="no such image: nope:1"):
        store.image("nope:1")
    store.tag("docker.io/library/a:1", "localhost:5000/b:2")
    assert store.image("localhost:5000/b:2").tags == ["docker.io/library/a:1", "localhost:5000/b:2"]
    assert store.untag("localhost:5000/b:2") == image_id
    assert store.image(image_id).tags == ["docker.io/library/a:1"]
    digest = "sha256:" + "ab" * 32
    store.add_image(store.config_bytes(image_id), digest,
                    [(store.image(image_id).layers[0][0], GZ)], ["docker.io/library/a:1"])
    assert store.image(f"docker.io/library/a@{digest}").id == image_id
    assert [r.id for r in store.images()] == [image_id]


def test_records_follow_changes_made_by_another_store_on_the_same_root(tmp_path: Path) -> None:
    """Image records are kept parsed while their files are unchanged; a second Store (another
    process, as at guest build time) that tags or removes an image is seen at once."""
    ours, theirs = Store(tmp_path / "s"), Store(tmp_path / "s")
    try:
        image_id = add(ours, [BASE], ["docker.io/library/a:1"])
        assert ours.image("docker.io/library/a:1").tags == ["docker.io/library/a:1"]
        theirs.tag("docker.io/library/a:1", "docker.io/library/a:2")
        assert ours.image(image_id).tags == ["docker.io/library/a:1", "docker.io/library/a:2"]
        assert ours.image("docker.io/library/a:2").id == image_id
        theirs.untag("docker.io/library/a:1")
        with pytest.raises(ImageNotFound):
            ours.image("docker.io/library/a:1")
        theirs.untag("docker.io/library/a:2")
        theirs.remove_image(image_id)
        with pytest.raises(ImageNotFound):
            ours.image(image_id)
    finally:
        ours.close()
        theirs.close()


def test_layers_are_shared_and_reused(store: Store) -> None:
    a = add(store, [BASE], ["a:1"])
    b = add(store, [BASE, TOP], ["b:1"], ZST)  # same diff_id, other compression: reuses chain
    assert store.image(a).chain_ids[0] == store.image(b).chain_ids[0]
    assert len(os.listdir(store.root / "layers")) == 2


def test_diff_id_mismatch_leaves_store_unchanged(store: Store, guard: None) -> None:
    add(store, [BASE], ["a:1"])
    blob = gzip.compress(TOP)
    digest = sha(blob)
    staged = store.root / "tmp" / "x"
    staged.write_bytes(blob)
    store.commit_blob(staged, digest, len(blob))
    before = snapshot(store.root)
    with pytest.raises(DigestMismatch, match="diff_id"):
        store.add_image(config_for([sha(BASE), sha(b"something else")]), None,
                        [(store.image("a:1").layers[0][0], GZ), (digest, GZ)], ["b:1"])
    assert snapshot(store.root) == before


def _hostile_cases() -> list[tuple[str, bytes, str]]:
    import importlib.util
    spec = importlib.util.spec_from_file_location("_layer_cases", Path(__file__).with_name("test_layers.py"))
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [(n, mod.make_tar(e), m) for n, e, m in mod.HOSTILE]


HOSTILE_TARS = _hostile_cases()


@pytest.mark.parametrize("tar,message", [(t, m) for _, t, m in HOSTILE_TARS],
                         ids=[n for n, _, _ in HOSTILE_TARS])
def test_hostile_layer_leaves_store_unchanged(store: Store, guard: None, tar: bytes, message: str) -> None:
    add(store, [BASE], ["base:1"])
    blob = gzip.compress(tar)
    staged = store.root / "tmp" / "hostile"
    staged.write_bytes(blob)
    store.commit_blob(staged, sha(blob), len(blob))
    before = snapshot(store.root)
    with pytest.raises(LayerError) as exc:
        store.add_image(config_for([sha(BASE), sha(tar)]), None,
                        [(store.image("base:1").layers[0][0], GZ), (sha(blob), GZ)], ["evil:1"])
    assert message in str(exc.value)
    assert snapshot(store.root) == before
    with pytest.raises(ImageNotFound):
        store.image("evil:1")
    _wait_for_no_hash_thread()  # the diff_id's hashing thread ended with the unpacking


@pytest.mark.parametrize("media_type", [GZ, ZST])
def test_truncated_compressed_stream(store: Store, guard: None, media_type: str) -> None:
    big = tar_of({f"f{i}": os.urandom(20000) for i in range(10)})
    blob = compress(big, media_type)[:-200]
    digest = ingest(store, blob)  # the truncated blob has a valid digest of its own
    before = snapshot(store.root)
    with pytest.raises(LayerError, match="corrupt|truncated|zstd"):
        store.add_image(config_for([sha(big)]), None, [(digest, media_type)], ["t:1"])
    assert snapshot(store.root) == before


def test_truncated_tar_layer(store: Store, guard: None) -> None:
    tar = tar_of({f"f{i}": b"x" * 3000 for i in range(4)})
    cut = tar[:3 * (512 + 3072)]  # at an entry boundary: only the missing end marker tells
    digest = ingest(store, cut)
    before = snapshot(store.root)
    with pytest.raises(LayerError, match="truncated tar"):
        store.add_image(config_for([sha(cut)]), None, [(digest, TAR)], ["t:1"])
    assert snapshot(store.root) == before


def test_trailing_junk_after_tar_rejected(store: Store, guard: None) -> None:
    tar = tar_of({"a": b"a"}) + b"\x01" * (2 << 20)
    digest = ingest(store, gzip.compress(tar))
    before = snapshot(store.root)
    with pytest.raises(LayerError, match="after the end of the tar"):
        store.add_image(config_for([sha(tar)]), None, [(digest, GZ)], ["t:1"])
    assert snapshot(store.root) == before


def test_tampered_blob_on_disk_is_caught_at_unpack(store: Store, guard: None) -> None:
    blob = gzip.compress(BASE)
    digest = ingest(store, blob)
    path = store.blob_path(digest)
    os.chmod(path, 0o644)
    path.write_bytes(gzip.compress(TOP))
    before = snapshot(store.root)
    with pytest.raises(DigestMismatch):
        store.add_image(config_for([sha(TOP)]), None, [(digest, GZ)], ["t:1"])
    assert snapshot(store.root) == before


def test_missing_blob_and_bad_config(store: Store, guard: None) -> None:
    before = snapshot(store.root)
    with pytest.raises(StoreError, match="not in the store"):
        store.add_image(config_for([sha(BASE)]), None, [(sha(b"nope"), GZ)], ["t:1"])
    with pytest.raises(StoreError, match="rootfs.diff_ids"):
        store.add_image(b"{not json", None, [], ["t:1"])
    with pytest.raises(StoreError, match="lists 1 layers"):
        store.add_image(config_for([sha(BASE)]), None, [], ["t:1"])
    assert snapshot(store.root) == before


# -- overlayfs on store lower dirs ---------------------------------------------------------------

def test_overlay_mount_of_image(store: Store, tmp_path: Path) -> None:
    image_id = add(store, [BASE, TOP], ["o:1"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = "lowerdir=" + ":".join(str(p) for p in store.lower_dirs(image_id))
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"overlayfs mount not permitted on this host: {proc.stderr.strip()}")
    try:
        assert not (mnt / "etc/motd").exists()
        assert (mnt / "etc/os-release").read_bytes() == b"ID=test\n"
        assert os.listdir(mnt / "var/cache") == ["new"]
        assert (mnt / "app/main").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- rmi and prune ------------------------------------------------------------------------------

def test_remove_image_and_in_use(tmp_path: Path) -> None:
    used: set[str] = set()
    store = Store(tmp_path / "s", in_use=lambda i: i in used)
    a = add(store, [BASE], ["a:1"])
    b = add(store, [BASE, TOP], ["b:1", "b:2"])
    assert store.remove_image("b:2") == [{"Untagged": "b:2"}]
    store.tag("b:1", "b:3")
    with pytest.raises(StoreError, match="multiple repositories"):
        store.remove_image(b)  # by id while two tags point at it
    store.untag("b:3")
    used.add(b)
    with pytest.raises(ImageInUse, match="in use by a container"):
        store.remove_image("b:1")
    assert store.image("b:1").id == b
    used.clear()
    out = store.remove_image("b:1")
    assert {"Deleted": b} in out and {"Deleted": chain_id(sha(BASE), sha(TOP))} in out
    with pytest.raises(ImageNotFound):
        store.image(b)
    assert store.image("a:1").id == a  # shared base layer and its blob kept
    assert store.lower_dirs(a)[0].is_dir() and store.has_blob(store.image(a).layers[0][0])
    assert sorted(os.listdir(store.root / "blobs/sha256")) == [store.image(a).layers[0][0][7:]]
    store.close()


def test_prune(store: Store) -> None:
    a = add(store, [BASE], ["x:1"])
    b = add(store, [BASE, TOP], ["x:1"], cmd="other")  # retags: a becomes dangling
    assert store.image("x:1").id == b
    top_blob = store.image(b).layers[1][0]
    freed = store.prune()
    assert freed > 0
    with pytest.raises(ImageNotFound):
        store.image(a)
    assert store.has_blob(top_blob) and store.image(b).lower_dirs[0].is_dir()
    assert store.prune(dangling_only=False) > 0
    assert store.images() == []
    assert os.listdir(store.root / "layers") == [] and os.listdir(store.root / "blobs/sha256") == []


def test_tmp_cleaned_at_startup_and_state_persists(tmp_path: Path) -> None:
    s = Store(tmp_path / "s")
    image_id = add(s, [BASE], ["p:1"])
    (s.root / "tmp" / "unpack-leftover").mkdir()
    (s.root / "tmp" / "unpack-leftover" / "f").write_text("x")
    s.close()
    s2 = Store(tmp_path / "s")
    assert os.listdir(s2.root / "tmp") == []
    assert s2.image("p:1").id == image_id
    s2.close()


# -- save / load --------------------------------------------------------------------------------

def tree(root: Path) -> list[tuple[str, int, bytes]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else (
                os.readlink(p).encode() if stat.S_ISLNK(st.st_mode) else b"")
            out.append((str(p.relative_to(root)), st.st_mode, data))
    return out


@pytest.mark.parametrize("fmt", ["docker-archive", "oci"])
@pytest.mark.parametrize("media_type", [GZ, ZST])
def test_save_load_round_trip(store: Store, tmp_path: Path, fmt: str, media_type: str) -> None:
    a = add(store, [BASE, TOP], ["docker.io/library/rt:1"], media_type)
    b = add(store, [BASE], ["docker.io/library/base:1"], media_type, cmd="b")
    out = io.BytesIO()
    store.save(["docker.io/library/rt:1", "docker.io/library/base:1"], out, fmt=fmt)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        names = tf.getnames()
    assert "index.json" in names and "oci-layout" in names
    assert ("manifest.json" in names) == (fmt == "docker-archive")
    assert f"blobs/sha256/{sha(TOP)[7:]}" in names  # layers are the uncompressed diffs
    other = Store(tmp_path / "other")
    ids = other.load(io.BytesIO(out.getvalue()))
    assert sorted(ids) == sorted([a, b])
    for ref, image_id in (("docker.io/library/rt:1", a), ("docker.io/library/base:1", b)):
        rec = other.image(ref)
        assert rec.id == image_id and rec.config == store.image(image_id).config
        assert [tree(p) for p in rec.lower_dirs] == [tree(p) for p in store.lower_dirs(image_id)]
    # and back again: the loaded copy saves to an identical archive
    again = io.BytesIO()
    other.save(["docker.io/library/rt:1", "docker.io/library/base:1"], again, fmt=fmt)
    assert again.getvalue() == out.getvalue()
    other.close()


@pytest.mark.parametrize("media_type", [GZ, ZST])
def test_save_of_a_layer_bigger_than_one_decompression_step(store: Store, media_type: str) -> None:
    # zlib hands out a layer in pieces of what each step inflates; tarfile's copy into the
    # archive wants whole reads (a short one is the data's end to it)
    rng = random.Random(3)
    big = tar_of({"big/": None, "big/noise": rng.randbytes(1_500_000), "big/text": b"layer " * 400_000})
    image_id = add(store, [big], ["docker.io/library/big:1"], media_type)
    out = io.BytesIO()
    store.save(["docker.io/library/big:1"], out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        member = tf.extractfile(f"blobs/sha256/{sha(big)[7:]}")
        assert member is not None and member.read() == big
    assert store.image(image_id).diff_ids == [sha(big)]


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_archives_interoperate_with_skopeo(store: Store, tmp_path: Path) -> None:
    """Our archives are read by skopeo, and skopeo's (legacy docker-archive with symlinked
    layers, OCI archive with gzip layers and rewritten config) load back."""
    image_id = add(store, [BASE, TOP], ["docker.io/library/rt:1"])
    for fmt, src, dst in [("docker-archive", "docker-archive", "oci-archive"),
                          ("oci", "oci-archive", "docker-archive")]:
        ours, theirs = tmp_path / f"ours-{fmt}.tar", tmp_path / f"theirs-{fmt}.tar"
        with open(ours, "wb") as f:
            store.save(["docker.io/library/rt:1"], f, fmt=fmt)
        subprocess.run(["skopeo", "copy", "-q", f"{src}:{ours}", f"{dst}:{theirs}:docker.io/library/{fmt}:2"],
                       check=True, capture_output=True)
        other = Store(tmp_path / f"other-{fmt}")
        with open(theirs, "rb") as f:
            [loaded] = other.load(f)
        rec = other.image(loaded)
        assert rec.diff_ids == store.image(image_id).diff_ids
        assert [tree(p) for p in rec.lower_dirs] == [tree(p) for p in store.lower_dirs(image_id)]
        other.close()


def test_load_docker_archive_with_familiar_tags_and_legacy_layout(store: Store) -> None:
    """Old `docker save` layout: <id>/layer.tar with a symlink for a repeated layer."""
    config = config_for([sha(BASE), sha(BASE)])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        def put(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        put("l1/layer.tar", BASE)
        ti = tarfile.TarInfo("l2/layer.tar")
        ti.type, ti.linkname = tarfile.SYMTYPE, "../l1/layer.tar"
        tf.addfile(ti)
        put(f"{sha(config)[7:]}.json", config)
        put("manifest.json", json.dumps([{"Config": f"{sha(config)[7:]}.json",
                                          "RepoTags": ["busybox:latest"],
                                          "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode())
    ids = store.load(io.BytesIO(buf.getvalue()), normalize=lambda r: "docker.io/library/" + r)
    assert store.image("docker.io/library/busybox:latest").id == ids[0] == sha(config)


def _archive(members: list[tuple[str, bytes | str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            if isinstance(data, str):
                ti.type, ti.linkname = tarfile.SYMTYPE, data
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _good_archive_members() -> list[tuple[str, bytes | str]]:
    config = config_for([sha(BASE)])
    return [(f"blobs/sha256/{sha(BASE)[7:]}", BASE), (f"blobs/sha256/{sha(config)[7:]}", config),
            ("manifest.json", json.dumps([{"Config": f"blobs/sha256/{sha(config)[7:]}",
                                           "RepoTags": ["h:1"],
                                           "Layers": [f"blobs/sha256/{sha(BASE)[7:]}"]}]).encode())]


def _hostile_archives() -> list[tuple[str, bytes, str]]:
    good = _good_archive_members()
    config = good[1][1]
    assert isinstance(config, bytes)
    evil_layer = tar_of({"../../../tmp/outside": b"pwned"})
    evil_config = config_for([sha(evil_layer)])
    other = config_for([sha(BASE)], cmd="other")

    def manifest(cfg: str, layers: list[str]) -> tuple[str, bytes]:
        return ("manifest.json", json.dumps([{"Config": cfg, "RepoTags": ["h:1"], "Layers": layers}]).encode())
    return [
        ("dotdot-entry", _archive([("../evil", b"x")] + good), "'../evil'"),
        ("absolute-entry", _archive([("/etc/evil", b"x")] + good), "'/etc/evil'"),
        ("dotdot-in-manifest", _archive(good[:2] + [manifest("../../etc/passwd", [])]), "'../../etc/passwd'"),
        ("symlink-escape", _archive(good[:2] + [("l", "../../../etc/passwd"),
                                                manifest(f"blobs/sha256/{sha(config)[7:]}", ["l"])]),
         "leaves the archive"),
        ("missing-layer", _archive(good[1:]), "missing"),
        ("missing-config", _archive([good[0], good[2]]), "missing"),
        ("layer-digest-mismatch", _archive([(f"blobs/sha256/{sha(BASE)[7:]}", TOP)] + good[1:]),
         "content has digest"),
        ("config-digest-mismatch", _archive([good[0], (f"blobs/sha256/{sha(config)[7:]}", other), good[2]]),
         "content has digest"),
        ("diff-id-mismatch", _archive([("layer.tar", TOP), ("c.json", config), manifest("c.json", ["layer.tar"])]),
         "diff_id"),
        ("hostile-layer-inside", _archive([("layer.tar", evil_layer), ("c.json", evil_config),
                                           manifest("c.json", ["layer.tar"])]), "'..' component"),
        ("device-entry", b"", "unsupported entry type"),
        ("not-an-archive", b"\x00garbage" * 300, "not"),
        ("no-manifest", _archive([("hello", b"x")]), "no manifest.json or index.json"),
    ]


def _device_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo("dev")
        ti.type = tarfile.CHRTYPE
        tf.addfile(ti)
    return buf.getvalue()


HOSTILE_ARCHIVES = [(n, _device_archive() if n == "device-entry" else a, m) for n, a, m in _hostile_archives()]


@pytest.mark.parametrize("archive,message", [(a, m) for _, a, m in HOSTILE_ARCHIVES],
                         ids=[n for n, _, _ in HOSTILE_ARCHIVES])
def test_hostile_archive_rejected(store: Store, guard: None, archive: bytes, message: str) -> None:
    add(store, [TOP], ["existing:1"])
    before = snapshot(store.root)
    with pytest.raises((StoreError, LayerError)) as exc:
        store.load(io.BytesIO(archive))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)
    assert snapshot(store.root) == before
    with pytest.raises(ImageNotFound):
        store.image("h:1")


def test_hostile_oci_layout_rejected(store: Store, guard: None) -> None:
    config = config_for([sha(BASE)])
    manifest = json.dumps({"schemaVersion": 2, "config": {"digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": TAR, "digest": sha(BASE), "size": len(BASE)}]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(manifest),
         "size": len(manifest), "annotations": {"io.containerd.image.name": "o:1"}}]}).encode()
    good = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index),
            (f"blobs/sha256/{sha(manifest)[7:]}", manifest), (f"blobs/sha256/{sha(config)[7:]}", config),
            (f"blobs/sha256/{sha(BASE)[7:]}", BASE)]
    assert store.load(io.BytesIO(_archive(good))) == [sha(config)]
    store.remove_image("o:1")
    before = snapshot(store.root)
    bad_size = index.replace(f'"size": {len(manifest)}'.encode(), b'"size": 3')
    cases = [
        (good[:4] + [(f"blobs/sha256/{sha(BASE)[7:]}", TOP)], "content has digest"),
        (good[:4], "missing"),
        ([good[0], ("index.json", bad_size)] + good[2:], "size"),
        ([good[0], ("index.json", index.replace(sha(manifest).encode(), b"sha256:../../x"))] + good[2:],
         "invalid or unsupported digest"),
    ]
    for members, message in cases:
        with pytest.raises((StoreError, LayerError)) as exc:
            store.load(io.BytesIO(_archive(members)))
        assert message in str(exc.value)
        assert snapshot(store.root) == before
