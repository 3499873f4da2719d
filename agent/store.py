"""Content-addressed image store on the VM's data disk.

Layout under ``root``::

    blobs/sha256/<hex>            immutable blobs (layers, configs, manifests), verified on commit
    ingest/<hex>                  partial downloads, resumable (``ingest_path``)
    layers/<chainid-hex>/diff/    one unpacked layer = an overlayfs lower dir
    layers/<chainid-hex>/meta.json  {chain_id, diff_id, parent, size, tar_size, entries}
    images/<id-hex>.json          the image config, byte for byte (its sha256 is the image id)
    images/<id-hex>.meta.json     {layers: [[digest, media_type]...], chain_ids, manifest_digests}
    repositories.json             {"tags": {ref: id}, "digests": {repo@sha256:..: id}}
    tmp/                          in-progress work; emptied at startup
    lock, ops.lock                liveness lock (shared) and mutation lock

Every file is written to tmp/, fsynced and renamed into place; an operation that fails
(bad digest, hostile layer, hostile archive) leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import platform
import queue
import re
import shutil
import subprocess
import tarfile
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self, cast

from . import workers
from .digest import sha256 as fast_sha256
from .gunzip import GunzipReader
from .layers import LayerError, LayerStats, unpack_layer
from .readahead import ReadAhead

log = logging.getLogger(__name__)

__all__ = ["DigestMismatch", "ImageInUse", "ImageNotFound", "ImageRecord", "LayerError", "Store",
           "StoreError", "chain_id", "sha256_digest"]

MT_OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
_GZIP_TYPES = {
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
}
_ZSTD_TYPES = {
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
}
_TAR_TYPES = {MT_OCI_TAR, "application/vnd.oci.image.layer.nondistributable.v1.tar",
              "application/vnd.docker.image.rootfs.diff.tar"}
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_CHUNK = 1 << 20
_MAX_TRAILING = 1 << 20  # zero padding after a tar's end marker (blocking factor) is fine



def _file_key(path: Path) -> tuple[int, int, int] | None:
    """What tells a changed file from an unchanged one (None: there is no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size

class StoreError(Exception):
    """Any store failure; the message is one line fit for a user."""


class DigestMismatch(StoreError):
    """Content does not match the digest (or size) it was announced with."""


class ImageNotFound(StoreError):
    pass


class ImageInUse(StoreError):
    pass


@dataclass(frozen=True)
class ImageRecord:
    id: str                       # "sha256:<hex>" of the config
    config: dict[str, Any]
    tags: list[str]
    digests: list[str]            # "repo@sha256:..." of the manifests it was pulled by
    manifest_digests: list[str]
    created: str
    size: int                     # unpacked bytes of all layers
    layers: list[tuple[str, str]]  # (blob digest, media type), bottom first
    diff_ids: list[str]
    chain_ids: list[str]          # bottom first (OCI order)
    lower_dirs: list[Path] = field(default_factory=list)  # top-most first (overlay order)

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[1][:12]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(parent: str | None, diff_id: str) -> str:
    """OCI ChainID: the diff_id for the bottom layer, else sha256(parent + " " + diff_id)."""
    return diff_id if parent is None else sha256_digest(f"{parent} {diff_id}".encode())


def hex_of(digest: str) -> str:
    """The hex part of a validated sha256 digest (never a path trick)."""
    m = _DIGEST_RE.match(digest)
    if not m:
        raise StoreError(f"invalid or unsupported digest {digest!r}")
    return m.group(1)


def repo_of(ref: str) -> str:
    """'host:5000/a/b:tag' -> 'host:5000/a/b'; digests stripped too."""
    ref = ref.split("@", 1)[0]
    colon = ref.rfind(":")
    return ref[:colon] if colon > ref.rfind("/") else ref


class _Drains:
    """``drain`` for a reader with ``read``, ``n`` (bytes read so far) and ``what``."""

    what: str
    n: int
    read: Callable[[int], bytes]

    def drain(self, budget: int | None = None) -> None:
        """Read to EOF; more than ``budget`` further bytes is an error (trailing junk)."""
        start = self.n
        while self.read(_CHUNK):
            if budget is not None and self.n - start > budget:
                raise LayerError(f"{self.what}: more than {budget} bytes after the end of the tar")


class _HashReader(_Drains):
    """Reads through, hashing and counting; optional byte limit."""

    def __init__(self, raw: BinaryIO, limit: int | None = None, what: str = "stream") -> None:
        self.raw, self.limit, self.what = raw, limit, what
        self.h = fast_sha256()
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        return self._through(self.raw.read(size))

    def read1(self, size: int = -1) -> bytes:
        """A short read where the source allows one (``read1``), else a read."""
        read1 = getattr(self.raw, "read1", None)
        return self._through(read1(size) if read1 is not None else self.raw.read(size))

    def _through(self, data: bytes) -> bytes:
        self.n += len(data)
        if self.limit is not None and self.n > self.limit:
            raise LayerError(f"{self.what} exceeds the limit of {self.limit} bytes")
        self._hash(data)
        return data

    def _hash(self, data: bytes) -> None:
        self.h.update(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


class _HashBehind(_HashReader):
    """A _HashReader whose sha256 runs on a worker thread, up to ``behind`` reads behind
    (the unpacker reads 1 MiB at a time; hashlib lets go of the interpreter lock): the
    unpacker's thread gunzips and writes while the other vCPU hashes. ``digest`` waits for
    the hash to catch up; ``close`` ends the thread (the digest is then unusable)."""

    def __init__(self, raw: BinaryIO, limit: int | None = None, what: str = "stream", behind: int = 8) -> None:
        super().__init__(raw, limit, what)
        self._pending: queue.Queue[bytes | None] = queue.Queue(maxsize=behind)
        self._done = threading.Event()
        self._closed = False
        workers.spawn(self._hash_all, name="hash-behind")

    def _hash_all(self) -> None:
        try:
            while (data := self._pending.get()) is not None:
                self.h.update(data)
        finally:  # however it ends, nothing waits on it (a hash cut short cannot match)
            self._done.set()
            with contextlib.suppress(queue.Empty):
                while True:  # frees a read blocked on a full queue
                    self._pending.get_nowait()

    def _hash(self, data: bytes) -> None:
        if data and not self._done.is_set():
            self._pending.put(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._done.is_set():
                self._pending.put(None)

    @property
    def digest(self) -> str:
        self.close()
        self._done.wait()
        return "sha256:" + self.h.hexdigest()


class _AheadBlob(_Drains):
    """A download read ahead (agent/readahead.py) by a thread that also writes it to disk and
    hashes it (a _Tee under a _HashReader): the unpacker reads it here, and the compressed
    side's work is done on the other vCPU. ``digest`` is complete once a read returned b""."""

    def __init__(self, ahead: ReadAhead, hashed: _HashReader) -> None:
        self.ahead, self.hashed, self.what = ahead, hashed, hashed.what

    def read(self, size: int = -1) -> bytes:
        return self.ahead.read(size)

    @property
    def n(self) -> int:  # type: ignore[override]
        return self.hashed.n

    @property
    def digest(self) -> str:
        return self.hashed.digest


class _Tee:
    """Reads through from a download, writing every byte read to ``out`` (unbuffered) and
    refusing more than ``size`` bytes."""

    def __init__(self, src: BinaryIO, out: BinaryIO, size: int, what: str) -> None:
        self.src, self.out, self.size, self.what = src, out, size, what
        self.n = 0

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        self.n += len(data)
        if self.n > self.size:
            raise DigestMismatch(f"{self.what} is larger than its declared size {self.size}")
        view = memoryview(data)
        while view:
            view = view[self.out.write(view):]
        return data


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """syncfs(2) from the C library the interpreter runs on. (ctypes.util.find_library needs
    ldconfig or a compiler, which the guest has neither of: it cost 40 ms and found nothing.)"""
    def names() -> Iterator[str | None]:
        yield None  # the interpreter's own symbols, libc's among them
        yield "libc.so.6"
        yield ctypes.util.find_library("c")

    for name in names():
        try:
            return cast(Callable[[int], int], ctypes.CDLL(name, use_errno=True).syncfs)
        except (OSError, AttributeError):
            continue
    return None


def _syncfs(path: Path) -> None:
    """Flush a whole unpacked tree cheaply (syncfs(2)); falls back to sync(2)."""
    syncfs = _libc_syncfs()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs is not None and syncfs(fd) == 0:
            return
        os.sync()
    finally:
        os.close(fd)


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class Store:
    def __init__(self, root: Path, *, in_use: Callable[[str], bool] | None = None,
                 max_layer_bytes: int | None = None, max_layer_entries: int = 1_000_000) -> None:
        self.root = Path(root)
        self.in_use = in_use or (lambda image_id: False)
        self.max_layer_bytes = max_layer_bytes
        self.max_layer_entries = max_layer_entries
        for sub in ("blobs/sha256", "ingest", "layers", "images", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._mutex = threading.RLock()
        self._depth = 0
        # Parsed JSON kept while its file is unchanged (same inode, mtime and size: every
        # write is a rename into place) and dropped after each of our own changes. Another
        # process may share the store, so the file is always asked; reading and parsing it
        # again is what costs under TCG.
        self._repos_cache: tuple[tuple[int, int, int] | None, dict[str, dict[str, str]]] | None = None
        self._image_cache: dict[str, tuple[tuple[Any, ...], ImageRecord]] = {}
        self._ops_fd = os.open(self.root / "ops.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._live_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._live_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._clean_tmp()
        except BlockingIOError:
            log.info("store %s is open elsewhere; leaving tmp/ alone", self.root)
        fcntl.flock(self._live_fd, fcntl.LOCK_SH)

    def close(self) -> None:
        for fd in (self._ops_fd, self._live_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ops_fd = self._live_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clean_tmp(self) -> None:
        for entry in (self.root / "tmp").iterdir():
            log.info("removing leftover %s", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                fcntl.flock(self._ops_fd, fcntl.LOCK_EX)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._repos_cache = None  # our own changes never depend on timestamps
                    self._image_cache.clear()
                    fcntl.flock(self._ops_fd, fcntl.LOCK_UN)

    def _tmpdir(self, prefix: str) -> Path:
        path = self.root / "tmp" / f"{prefix}-{uuid.uuid4().hex}"
        path.mkdir(mode=0o700)
        return path

    def _atomic_write(self, dest: Path, data: bytes) -> None:
        tmp = self.root / "tmp" / f"w-{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)

    def _write_json(self, dest: Path, obj: Any) -> None:
        self._atomic_write(dest, json.dumps(obj, indent=1, sort_keys=True).encode())

    # -- blobs ----------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError:
            raise StoreError(f"blob {digest} is not in the store") from None

    def ingest_path(self, digest: str) -> Path:
        """Where a download of ``digest`` is written (and resumed from)."""
        return self.root / "ingest" / hex_of(digest)

    def commit_blob(self, src: Path, digest: str, size: int | None) -> Path:
        """Verify sha256 (+ size) of ``src`` and move it into blobs/; bad ingest files are
        discarded, files outside the store are copied and left alone."""
        src = Path(src)
        rsrc = src.resolve()
        owned = any(rsrc.is_relative_to((self.root / d).resolve()) for d in ("ingest", "tmp"))
        try:
            try:
                actual_size = src.stat().st_size
            except FileNotFoundError:
                raise StoreError(f"blob {digest}: {src} does not exist") from None
            if size is not None and actual_size != size:
                raise DigestMismatch(f"blob {digest}: size {actual_size} != expected {size}")
            if not owned:
                staged = self.root / "tmp" / f"blob-{uuid.uuid4().hex}"
                shutil.copyfile(src, staged)
            else:
                staged = src
            h = fast_sha256()
            with open(staged, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                os.fsync(f.fileno())
            if "sha256:" + h.hexdigest() != digest:
                if staged != src:
                    staged.unlink(missing_ok=True)
                raise DigestMismatch(f"blob {digest}: content has digest sha256:{h.hexdigest()}")
        except DigestMismatch:
            if owned:
                src.unlink(missing_ok=True)
            raise
        return self._install_blob(staged, digest)

    def _install_blob(self, staged: Path, digest: str) -> Path:
        """Move a verified file into blobs/ (or drop it if the blob is there already)."""
        dest = self.blob_path(digest)
        with self._locked():
            if dest.exists():
                staged.unlink(missing_ok=True)
            else:
                os.chmod(staged, 0o444)
                os.rename(staged, dest)
                _fsync_dir(dest.parent)
        return dest

    def put_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store small content (a manifest or config) as a blob; returns its digest."""
        actual = sha256_digest(data)
        if digest is not None and digest != actual:
            raise DigestMismatch(f"blob {digest}: content has digest {actual}")
        if not self.has_blob(actual):
            tmp = self.root / "tmp" / f"blob-{uuid.uuid4().hex}"
            tmp.write_bytes(data)
            self.commit_blob(tmp, actual, len(data))
        return actual

    def put_layer_tar(self, write: Callable[[BinaryIO], None]) -> tuple[str, int]:
        """Store as a blob the uncompressed layer tar that ``write`` writes to the file it is
        given (a commit's changes, an import's tar), hashed as it is written; returns its
        digest, which is also its diff_id, and its size."""
        staged = self.root / "tmp" / f"layer-{uuid.uuid4().hex}"
        try:
            with open(staged, "wb") as f:
                out = _HashingWriter(f)
                write(cast(BinaryIO, out))
                f.flush()
                os.fsync(f.fileno())
            digest = "sha256:" + out.hash.hexdigest()
            self._install_blob(staged, digest)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        return digest, out.size

    def discard_unused_blobs(self, digests: Iterable[str]) -> None:
        """Drop the blobs among ``digests`` that no image uses: what a failed pull, commit or
        import committed, so the store is left as it was found."""
        used = set()
        for img in self.images():
            used.add(img.id)
            used.update(d for d, _ in img.layers)
        for d in digests:
            if d not in used:
                self.blob_path(d).unlink(missing_ok=True)

    # -- layers ---------------------------------------------------------------------------

    def layer_dir(self, chain: str) -> Path:
        return self.root / "layers" / hex_of(chain)

    def has_layer(self, chain: str) -> bool:
        return (self.layer_dir(chain) / "meta.json").is_file()

    def layer_meta(self, chain: str) -> dict[str, Any]:
        try:
            return cast(dict[str, Any], json.loads((self.layer_dir(chain) / "meta.json").read_text()))
        except FileNotFoundError:
            raise StoreError(f"layer {chain} is not in the store") from None

    @contextlib.contextmanager
    def _decompressed(self, f: BinaryIO, digest: str,
                      media_type: str | None) -> Iterator[tuple[BinaryIO, _HashReader | _AheadBlob]]:
        """Yield (uncompressed tar stream, reader hashing the compressed blob ``f``)."""
        blob = f if isinstance(f, _AheadBlob) else _HashReader(f, what=f"blob {digest}")
        kind = _compression(media_type, f)
        proc: subprocess.Popen[bytes] | None = None
        feeder: threading.Thread | None = None
        try:
            if kind == "gzip":
                yield cast(BinaryIO, GunzipReader(cast(BinaryIO, blob))), blob
                blob.drain()
            elif kind == "zstd":
                proc = subprocess.Popen(["zstd", "-dcq"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                feeder = threading.Thread(target=_feed, args=(blob, proc), daemon=True)
                feeder.start()
                assert proc.stdout is not None
                yield cast(BinaryIO, proc.stdout), blob
                rest = proc.stdout.read()
                feeder.join()
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                if proc.wait() != 0 or rest:
                    raise LayerError(f"blob {digest}: zstd: {err.splitlines()[-1] if err else 'corrupt stream'}")
            else:
                yield cast(BinaryIO, blob), blob
                blob.drain()
        finally:
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for s in (proc.stdout, proc.stderr, proc.stdin):
                    if s:
                        with contextlib.suppress(OSError):
                            s.close()
                if feeder:
                    feeder.join(timeout=5)

    def unpack(self, layer_digest: str, media_type: str | None, parent_chain: str | None,
               diff_id: str | None = None) -> str:
        """Unpack a committed layer blob on top of ``parent_chain``; returns its chain id.
        ``diff_id`` (from the config's rootfs.diff_ids) is verified when given."""
        hex_of(layer_digest)
        if diff_id is not None:
            hex_of(diff_id)
        if parent_chain is not None and not self.has_layer(parent_chain):
            raise StoreError(f"parent layer {parent_chain} is not in the store")
        if diff_id is not None and self.has_layer(chain_id(parent_chain, diff_id)):
            return chain_id(parent_chain, diff_id)
        if not self.has_blob(layer_digest):
            raise StoreError(f"layer blob {layer_digest} is not in the store")
        with self.open_blob(layer_digest) as f:
            work, chain = self._unpack_into_tmp(f, layer_digest, media_type, parent_chain, diff_id)
        return self._install_layer(work, chain)

    @staticmethod
    def streamable(media_type: str | None) -> bool:
        """Whether ``ingest_layer`` takes this layer type (zstd goes through a child process
        and a downloaded blob instead)."""
        return media_type in _GZIP_TYPES or media_type in _TAR_TYPES

    def ingest_layer(self, src: BinaryIO, digest: str, size: int, media_type: str, parent_chain: str | None,
                     diff_id: str) -> Path:
        """Write a layer blob from ``src`` (a download) into the store and unpack it in the same pass.

        The store hashes what it writes: the blob goes to blobs/ only if its digest and size
        match, and the unpacked tree (returned, in tmp/, for ``add_image(prepared=...)``) is
        there only if its diff_id matches too. If ``src`` raises, what it got becomes the partial
        file in ingest/ for a resumed download (unless one is there); a bad digest or a bad layer
        leaves nothing."""
        hex_of(digest)
        hex_of(diff_id)
        if not self.streamable(media_type):
            raise StoreError(f"layer {digest}: {media_type} layers are not unpacked while downloading")
        # A file of this call's own: a concurrent pull of the same layer writes its own copy
        # (the bytes hashed are then exactly the bytes on disk), and the first to finish wins.
        staged = self.root / "tmp" / f"blob-{uuid.uuid4().hex}"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb", buffering=0) as out:
            tee = _Tee(src, cast(BinaryIO, out), size, what=f"blob {digest}")
            hashed = _HashReader(cast(BinaryIO, tee), what=f"blob {digest}")
            try:
                # the download, its write to disk and its sha256 on a thread of their own, while
                # this one gunzips, hashes and unpacks what came before (two vCPUs, not one)
                with ReadAhead(hashed, name=f"{hex_of(digest)[:12]}-read") as ahead:
                    work, chain = self._unpack_into_tmp(cast(BinaryIO, _AheadBlob(ahead, hashed)), digest,
                                                        media_type, parent_chain, diff_id)
            except (DigestMismatch, LayerError):
                staged.unlink(missing_ok=True)
                raise
            except BaseException:
                self._keep_partial(staged, digest)
                raise
        try:
            if tee.n != size:
                raise DigestMismatch(f"blob {digest}: size {tee.n} != expected {size}")
            self._install_blob(staged, digest)  # written and hashed in this pass, flushed by the syncfs
        except BaseException:
            staged.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.debug("layer %s unpacked while downloading (chain %s)", digest, chain)
        return work

    def _keep_partial(self, staged: Path, digest: str) -> None:
        """Keep what a broken download got as ingest/'s partial file, for a resumed download,
        unless there is one already."""
        try:
            os.link(staged, self.ingest_path(digest))
        except OSError:
            pass
        finally:
            staged.unlink(missing_ok=True)

    def _unpack_into_tmp(self, raw: BinaryIO, layer_digest: str, media_type: str | None,
                         parent_chain: str | None, diff_id: str | None) -> tuple[Path, str]:
        """Unpack the blob read from ``raw`` into a new tmp dir, checking the blob's digest and
        (if given) the diff_id; returns (tmp dir, chain id). The tmp dir is removed on failure."""
        work = self._tmpdir("unpack")
        tar_reader: _HashBehind | None = None
        try:
            diff = work / "diff"
            diff.mkdir(mode=0o755)
            with self._decompressed(raw, layer_digest, media_type) as (tar, blob):
                tar_reader = _HashBehind(tar, self.max_layer_bytes, what=f"layer {layer_digest}")
                try:
                    stats: LayerStats = unpack_layer(
                        tar_reader, diff, max_entries=self.max_layer_entries,  # type: ignore[arg-type]
                        max_bytes=self.max_layer_bytes)
                    # diff_id covers the whole tar incl. padding (the unpacker read some of it ahead)
                    tar_reader.drain(max(0, _MAX_TRAILING - stats.read_past_end))
                except (OSError, EOFError, ValueError, zlib.error, LayerError) as e:
                    if isinstance(raw, (_Tee, _AheadBlob)):
                        # a download not verified yet: if it is not the announced content, say so
                        # rather than what it broke in the unpacker (bounded: _Tee stops at its size)
                        drained = False
                        with contextlib.suppress(Exception):
                            blob.drain()
                            drained = True
                        if drained and blob.digest != layer_digest:
                            raise DigestMismatch(f"layer {layer_digest}: blob content has digest "
                                                 f"{blob.digest}") from None
                    if isinstance(e, LayerError):
                        raise
                    raise LayerError(f"layer {layer_digest}: corrupt compressed stream: {e}") from None
            if blob.digest != layer_digest:
                raise DigestMismatch(f"layer {layer_digest}: blob content has digest {blob.digest}")
            got = tar_reader.digest
            if diff_id is not None and got != diff_id:
                raise DigestMismatch(f"layer {layer_digest}: diff_id {got} != expected {diff_id}")
            chain = chain_id(parent_chain, got)
            meta = {"chain_id": chain, "diff_id": got, "parent": parent_chain,
                    "size": _tree_size(diff), "tar_size": tar_reader.n,
                    "entries": stats.entries, "blob": layer_digest, "media_type": media_type}
            (work / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            _syncfs(work)
            log.info("unpacked layer %s -> %s (%d entries)", layer_digest, chain, stats.entries)
            return work, chain
        except BaseException:
            if tar_reader is not None:
                tar_reader.close()  # its hashing thread ends
            shutil.rmtree(work, ignore_errors=True)
            raise

    def _install_layer(self, work: Path, chain: str) -> str:
        """Rename an unpacked tmp dir into layers/ (or drop it if the layer is there already)."""
        try:
            with self._locked():
                dest = self.layer_dir(chain)
                if dest.exists():
                    log.debug("layer %s already unpacked", chain)
                else:
                    os.rename(work, dest)
                    _fsync_dir(dest.parent)
            return chain
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def _install_prepared(self, work: Path, chain: str) -> str:
        """Install a tree from ``ingest_layer``; it must be the layer ``chain`` names."""
        try:
            meta = json.loads((work / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("chain_id") != chain:
            shutil.rmtree(work, ignore_errors=True)
            raise StoreError(f"prepared layer {work.name} is not layer {chain}")
        return self._install_layer(work, chain)

    def discard_prepared(self, works: Iterable[Path]) -> None:
        """Remove trees from ``ingest_layer`` that ``add_image`` did not take."""
        tmp = (self.root / "tmp").resolve()
        for work in works:
            if work.resolve().parent == tmp:
                shutil.rmtree(work, ignore_errors=True)

    # -- images ---------------------------------------------------------------------------

    def _repos(self) -> dict[str, dict[str, str]]:
        path = self.root / "repositories.json"
        key = _file_key(path)
        cached = self._repos_cache
        if cached is None or cached[0] != key or key is None:
            try:
                data = json.loads(path.read_text())
            except FileNotFoundError:
                data = {}
            cached = (key, {"tags": dict(data.get("tags", {})), "digests": dict(data.get("digests", {}))})
            self._repos_cache = cached
        return {"tags": dict(cached[1]["tags"]), "digests": dict(cached[1]["digests"])}

    def _save_repos(self, repos: dict[str, dict[str, str]]) -> None:
        self._write_json(self.root / "repositories.json", repos)

    def _image_ids(self) -> list[str]:
        return sorted("sha256:" + p.name[:-len(".meta.json")]
                      for p in (self.root / "images").glob("*.meta.json"))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Hold the lock; on failure remove whatever blobs/layers/images appeared and restore
        repositories.json, so the store is left as it was."""
        with self._locked():
            subs = ("blobs/sha256", "layers", "images")
            before = {s: set(os.listdir(self.root / s)) for s in subs}
            repos_file = self.root / "repositories.json"
            repos_before = repos_file.read_bytes() if repos_file.exists() else None
            try:
                yield
            except BaseException:
                for s in subs:
                    for name in set(os.listdir(self.root / s)) - before[s]:
                        p = self.root / s / name
                        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                if repos_before is None:
                    repos_file.unlink(missing_ok=True)
                elif repos_file.read_bytes() != repos_before:
                    self._atomic_write(repos_file, repos_before)
                raise

    def add_image(self, config_bytes: bytes, manifest_digest: str | None,
                  layers: list[tuple[str, str]], tags: list[str],
                  prepared: Mapping[str, Path] | None = None) -> str:
        """Unpack the image's (committed) layer blobs, verify them against the config's
        diff_ids, record the image and point ``tags`` at it; returns the image id.
        ``prepared`` maps chain ids to trees ``ingest_layer`` already unpacked and verified;
        they are moved into place instead of unpacking their blobs again."""
        try:
            config = json.loads(config_bytes)
            diff_ids = config["rootfs"]["diff_ids"]
            assert isinstance(diff_ids, list) and all(isinstance(d, str) for d in diff_ids)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise StoreError("image config is not valid JSON with rootfs.diff_ids") from None
        if len(diff_ids) != len(layers):
            raise StoreError(f"image config lists {len(diff_ids)} layers, manifest {len(layers)}")
        if manifest_digest is not None:
            hex_of(manifest_digest)
        image_id = sha256_digest(config_bytes)
        with self._transaction():
            chain: str | None = None
            chains = []
            for (digest, media_type), diff_id in zip(layers, diff_ids):
                hex_of(diff_id)
                work = (prepared or {}).get(chain_id(chain, diff_id))
                if work is not None and work.exists() and not self.has_layer(chain_id(chain, diff_id)):
                    chain = self._install_prepared(work, chain_id(chain, diff_id))
                else:
                    chain = self.unpack(digest, media_type, chain, diff_id)
                chains.append(chain)
            hexid = hex_of(image_id)
            meta_path = self.root / "images" / f"{hexid}.meta.json"
            old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            mdigests = list(old.get("manifest_digests", []))
            if manifest_digest and manifest_digest not in mdigests:
                mdigests.append(manifest_digest)
            if not (self.root / "images" / f"{hexid}.json").exists():
                self._atomic_write(self.root / "images" / f"{hexid}.json", config_bytes)
            self._write_json(meta_path, {"layers": [list(x) for x in layers],
                                         "chain_ids": chains, "manifest_digests": mdigests})
            repos = self._repos()
            for tag in tags:
                repos["tags"][tag] = image_id
                if manifest_digest:
                    repos["digests"][f"{repo_of(tag)}@{manifest_digest}"] = image_id
            self._save_repos(repos)
        log.info("added image %s tags=%s", image_id, tags)
        return image_id

    def resolve(self, ref: str) -> str:
        """Image id for a tag, repo@digest, full id, or unique id prefix."""
        repos = self._repos()
        if ref in repos["tags"]:
            return repos["tags"][ref]
        if ref in repos["digests"]:
            return repos["digests"][ref]
        h = ref.removeprefix("sha256:")
        if re.fullmatch(r"[0-9a-f]{64}", h) and (self.root / "images" / f"{h}.meta.json").exists():
            return "sha256:" + h  # a full id (a container's image): no listing of images/
        ids = self._image_ids()
        if re.fullmatch(r"[0-9a-f]{1,64}", h):
            matches = [i for i in ids if i[len("sha256:"):].startswith(h)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise StoreError(f"image id prefix {ref!r} is ambiguous")
        raise ImageNotFound(f"no such image: {ref}")

    def image(self, ref: str) -> ImageRecord:
        """The image's record (shared between callers while the image is unchanged: do not
        modify its config)."""
        image_id = self.resolve(ref)
        hexid = hex_of(image_id)
        key = (_file_key(self.root / "images" / f"{hexid}.meta.json"), _file_key(self.root / "repositories.json"))
        cached = self._image_cache.get(image_id)
        if cached is not None and cached[0] == key and None not in key:
            return cached[1]
        try:
            config_bytes = (self.root / "images" / f"{hexid}.json").read_bytes()
            meta = json.loads((self.root / "images" / f"{hexid}.meta.json").read_text())
        except FileNotFoundError:
            raise ImageNotFound(f"no such image: {ref}") from None
        config = json.loads(config_bytes)
        repos = self._repos()
        chains = list(meta["chain_ids"])
        record = ImageRecord(
            id=image_id, config=config,
            tags=sorted(t for t, i in repos["tags"].items() if i == image_id),
            digests=sorted(d for d, i in repos["digests"].items() if i == image_id),
            manifest_digests=list(meta.get("manifest_digests", [])),
            created=str(config.get("created", "")),
            size=sum(int(self.layer_meta(c).get("size", 0)) for c in chains),
            layers=[(d, m) for d, m in meta["layers"]],
            diff_ids=list(config["rootfs"]["diff_ids"]), chain_ids=chains,
            lower_dirs=[self.layer_dir(c) / "diff" for c in reversed(chains)])
        self._image_cache[image_id] = (key, record)
        return record

    def config_bytes(self, image_id: str) -> bytes:
        return (self.root / "images" / f"{hex_of(image_id)}.json").read_bytes()

    def images(self) -> list[ImageRecord]:
        out = []
        for image_id in self._image_ids():
            with contextlib.suppress(ImageNotFound):
                out.append(self.image(image_id))
        return sorted(out, key=lambda r: r.created, reverse=True)

    def lower_dirs(self, image: str) -> list[Path]:
        """overlayfs lowerdir= list for an image, top-most layer first."""
        return self.image(image).lower_dirs

    def tag(self, image: str, new_ref: str) -> None:
        with self._locked():
            image_id = self.resolve(image)
            repos = self._repos()
            repos["tags"][new_ref] = image_id
            self._save_repos(repos)

    def untag(self, ref: str) -> str:
        """Remove a tag or repo@digest reference; returns the image id it pointed at."""
        with self._locked():
            repos = self._repos()
            for kind in ("tags", "digests"):
                if ref in repos[kind]:
                    image_id = repos[kind].pop(ref)
                    if kind == "tags":  # docker drops the repo's digest refs with its last tag
                        repo = repo_of(ref)
                        if not any(repo_of(t) == repo and i == image_id for t, i in repos["tags"].items()):
                            for d in [d for d, i in repos["digests"].items()
                                      if i == image_id and repo_of(d) == repo]:
                                del repos["digests"][d]
                    self._save_repos(repos)
                    return image_id
            raise ImageNotFound(f"no such tag: {ref}")

    def remove_image(self, ref: str, force: bool = False) -> list[dict[str, str]]:
        """``docker rmi``: untag, and delete the image (and its now unused layers) when no
        tag is left. Returns docker's [{"Untagged": ..}, {"Deleted": ..}] list."""
        with self._locked():
            image_id = self.resolve(ref)
            repos = self._repos()
            refs = [r for kind in ("tags", "digests") for r, i in repos[kind].items() if i == image_id]
            by_name = ref in repos["tags"] or ref in repos["digests"]
            tags = [t for t, i in repos["tags"].items() if i == image_id]
            if by_name and len(tags) > 1 and ref in repos["tags"]:
                self.untag(ref)
                return [{"Untagged": ref}]
            if not by_name and len(tags) > 1 and not force:
                raise StoreError(f"image {image_id[7:19]} is referenced in multiple repositories "
                                 "(use force to remove)")
            if self.in_use(image_id):
                if not force:
                    raise ImageInUse(f"image {ref} is in use by a container (use force to untag it)")
                for r in refs:
                    repos["tags"].pop(r, None)
                    repos["digests"].pop(r, None)
                self._save_repos(repos)
                return [{"Untagged": r} for r in refs]
            for r in refs:
                repos["tags"].pop(r, None)
                repos["digests"].pop(r, None)
            self._save_repos(repos)
            out = [{"Untagged": r} for r in refs] + [{"Deleted": image_id}]
            meta = json.loads((self.root / "images" / f"{hex_of(image_id)}.meta.json").read_text())
            own_blobs = {d for d, _ in meta["layers"]} | set(meta.get("manifest_digests", [])) | {image_id}
            self._delete_image(image_id)
            for chain in self._gc_layers():
                out.append({"Deleted": chain})
            _, referenced = self._referenced()
            for digest in own_blobs - referenced:  # blobs other images still use stay
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()
            return out

    def _delete_image(self, image_id: str) -> int:
        hexid = hex_of(image_id)
        freed = 0
        for suffix in (".meta.json", ".json"):  # meta first: without it the image is gone
            p = self.root / "images" / f"{hexid}{suffix}"
            with contextlib.suppress(FileNotFoundError):
                freed += p.stat().st_size
                p.unlink()
        return freed

    def _referenced(self) -> tuple[set[str], set[str]]:
        chains: set[str] = set()
        blobs: set[str] = set()
        for image_id in self._image_ids():
            meta = json.loads((self.root / "images" / f"{hex_of(image_id)}.meta.json").read_text())
            chains.update(meta["chain_ids"])
            blobs.update(d for d, _ in meta["layers"])
            blobs.update(meta.get("manifest_digests", []))
            blobs.add(image_id)
        # parents of referenced chains are referenced too
        for c in list(chains):
            parent = self.layer_meta(c).get("parent") if self.has_layer(c) else None
            while parent and parent not in chains:
                chains.add(parent)
                parent = self.layer_meta(parent).get("parent") if self.has_layer(parent) else None
        return chains, blobs

    def _gc_layers(self) -> list[str]:
        chains, _ = self._referenced()
        removed = []
        for name in os.listdir(self.root / "layers"):
            if "sha256:" + name not in chains:
                self._remove_layer(name)
                removed.append("sha256:" + name)
        return removed

    def _remove_layer(self, hexname: str) -> int:
        path = self.root / "layers" / hexname
        try:
            size = int(json.loads((path / "meta.json").read_text()).get("size", 0))
        except (OSError, ValueError):
            size = 0
        trash = self._tmpdir("rm")
        os.rename(path, trash / hexname)  # atomic disappearance, slow delete after
        shutil.rmtree(trash, ignore_errors=True)
        return size

    def prune(self, dangling_only: bool = True, only: set[str] | None = None) -> int:
        """Remove untagged (or, with dangling_only=False, all unused) images — of ``only``, if
        given — then layers and blobs no image references. Returns bytes reclaimed. Partial
        downloads are kept."""
        with self._locked():
            repos = self._repos()
            tagged = set(repos["tags"].values())
            freed = 0
            for image_id in self._image_ids():
                if self.in_use(image_id) or (only is not None and image_id not in only):
                    continue
                if dangling_only and image_id in tagged:
                    continue
                for kind in ("tags", "digests"):
                    for r in [r for r, i in repos[kind].items() if i == image_id]:
                        del repos[kind][r]
                freed += self._delete_image(image_id)
            self._save_repos(repos)
            chains, blobs = self._referenced()
            for name in os.listdir(self.root / "layers"):
                if "sha256:" + name not in chains:
                    freed += self._remove_layer(name)
            for name in os.listdir(self.root / "blobs" / "sha256"):
                if "sha256:" + name not in blobs:
                    p = self.root / "blobs" / "sha256" / name
                    freed += p.stat().st_size
                    p.unlink()
            return freed

    # -- archives -------------------------------------------------------------------------

    def save(self, image_refs: list[str], out: BinaryIO, fmt: str = "docker-archive") -> None:
        """Write a ``docker save`` archive (manifest.json + OCI layout) or, with fmt="oci",
        an OCI image layout tar. Layers are written uncompressed (their digest = diff_id)."""
        if fmt not in ("docker-archive", "oci"):
            raise StoreError(f"unsupported archive format {fmt!r}")
        repos = self._repos()
        chosen: dict[str, list[str]] = {}
        for ref in image_refs:
            image_id = self.resolve(ref)
            tags = chosen.setdefault(image_id, [])
            if ref in repos["tags"] and ref not in tags:
                tags.append(ref)
        _save_archive(self, [(self.image(i), t) for i, t in chosen.items()], out, fmt)

    def load(self, src: BinaryIO, normalize: Callable[[str], str] = lambda r: r) -> list[str]:
        """Load a docker-archive or OCI-layout tar; every digest is verified and a bad archive
        leaves the store unchanged. ``normalize`` maps archive tags to full references."""
        work = self._tmpdir("load")
        try:
            with self._transaction():
                return _Loader(self, work, normalize).load(src)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    @contextlib.contextmanager
    def layer_tar(self, digest: str, media_type: str | None) -> Iterator[BinaryIO]:
        """The uncompressed tar of a committed layer blob, streamed."""
        with self.open_blob(digest) as f, self._decompressed(f, digest, media_type) as (tar, _blob):
            yield tar


def _feed(src: _HashReader, proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    try:
        while chunk := src.read(_CHUNK):
            proc.stdin.write(chunk)
    except (BrokenPipeError, ValueError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            proc.stdin.close()


class _HashingWriter:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash, self.size = f, fast_sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _compression(media_type: str | None, f: BinaryIO) -> str:
    if media_type in _GZIP_TYPES:
        return "gzip"
    if media_type in _ZSTD_TYPES:
        return "zstd"
    if media_type in _TAR_TYPES:
        return "none"
    if media_type:
        raise StoreError(f"unsupported layer media type {media_type!r}")
    head = f.read(4)
    f.seek(0)
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "none"


# -- docker save / docker load ------------------------------------------------------------

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_INDEX_TYPES = {MT_OCI_INDEX, "application/vnd.docker.distribution.manifest.list.v2+json"}
_MAX_JSON = 8 << 20
_MAX_ARCHIVE_ENTRIES = 100_000
_HEX_NAME = re.compile(r"(?:^|/)([0-9a-f]{64})(?:\.json)?$")


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o444, 0
    tf.addfile(ti, io.BytesIO(data))


def _save_archive(store: Store, images: list[tuple[ImageRecord, list[str]]], out: BinaryIO,
                  fmt: str) -> None:
    """docker save layout (Docker >= 25): blobs/sha256/* (uncompressed layers, configs, OCI
    manifests), index.json, oci-layout, and for docker-archive also manifest.json."""
    written: set[str] = set()
    docker_manifest: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        def blob_once(digest: str, data: bytes) -> str:
            path = f"blobs/sha256/{hex_of(digest)}"
            if path not in written:
                _add_bytes(tf, path, data)
                written.add(path)
            return path

        for rec, tags in images:
            layer_paths, layer_descs = [], []
            for (digest, media_type), diff_id, chain in zip(rec.layers, rec.diff_ids, rec.chain_ids):
                size = int(store.layer_meta(chain)["tar_size"])
                path = f"blobs/sha256/{hex_of(diff_id)}"
                if path not in written:
                    with store.layer_tar(digest, media_type) as tar:
                        hr = _HashReader(tar)
                        ti = tarfile.TarInfo(path)
                        ti.size, ti.mode, ti.mtime = size, 0o444, 0
                        tf.addfile(ti, hr)
                        if hr.read(1) or hr.digest != diff_id:
                            raise DigestMismatch(f"layer {digest}: stored blob no longer matches {diff_id}")
                    written.add(path)
                layer_paths.append(path)
                layer_descs.append({"mediaType": MT_OCI_TAR, "digest": diff_id, "size": size})
            config = store.config_bytes(rec.id)
            config_path = blob_once(rec.id, config)
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                "config": {"mediaType": MT_OCI_CONFIG, "digest": rec.id, "size": len(config)},
                "layers": layer_descs}, separators=(",", ":")).encode()
            mdigest = sha256_digest(manifest)
            blob_once(mdigest, manifest)
            desc = {"mediaType": MT_OCI_MANIFEST, "digest": mdigest, "size": len(manifest)}
            for tag in tags:
                index.append({**desc, "annotations": {"io.containerd.image.name": tag,
                                                      "org.opencontainers.image.ref.name": tag.rsplit(":", 1)[-1]}})
            if not tags:
                index.append(desc)
            docker_manifest.append({"Config": config_path, "RepoTags": tags or None,
                                    "Layers": layer_paths})
        _add_bytes(tf, "index.json", json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX,
                                                  "manifests": index}).encode())
        _add_bytes(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        if fmt == "docker-archive":
            _add_bytes(tf, "manifest.json", json.dumps(docker_manifest).encode())


def host_arch() -> str:
    """The guest's architecture as OCI names it (amd64, arm64)."""
    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


class _Loader:
    """Spools an archive into tmp/ (flat files, no paths created from archive names), then
    verifies and imports it. Runs inside a store transaction."""

    def __init__(self, store: Store, work: Path, normalize: Callable[[str], str]) -> None:
        self.store, self.work, self.normalize = store, work, normalize
        self.files: dict[str, Path] = {}
        self.links: dict[str, str] = {}

    def load(self, src: BinaryIO) -> list[str]:
        self.spool(src)
        if "manifest.json" in self.files or "manifest.json" in self.links:
            return self.load_docker()
        if "index.json" in self.files:
            return self.load_oci()
        raise StoreError("not a docker-archive or OCI layout tar (no manifest.json or index.json)")

    def spool(self, src: BinaryIO) -> None:
        limit = self.store.max_layer_bytes
        try:
            with tarfile.open(fileobj=src, mode="r|") as tf:
                for i, m in enumerate(tf):
                    if i >= _MAX_ARCHIVE_ENTRIES:
                        raise StoreError(f"archive has more than {_MAX_ARCHIVE_ENTRIES} entries")
                    path = self._norm(m.name, "")
                    if m.isdir():
                        continue
                    if m.issym():
                        self.links[path] = self._norm(m.linkname, path.rpartition("/")[0], m.name)
                    elif m.islnk():
                        self.links[path] = self._norm(m.linkname, "", m.name)
                    elif m.isreg():
                        if limit is not None and m.size > limit:
                            raise StoreError(f"archive entry {m.name!r} exceeds {limit} bytes")
                        spool = self.work / f"f{i}"
                        fsrc = tf.extractfile(m)
                        assert fsrc is not None
                        with open(spool, "wb") as f:
                            shutil.copyfileobj(fsrc, f, _CHUNK)
                        if spool.stat().st_size != m.size:
                            raise StoreError(f"archive entry {m.name!r} is truncated")
                        self.files[path] = spool
                    else:
                        raise StoreError(f"archive entry {m.name!r}: unsupported entry type")
        except (tarfile.TarError, EOFError) as e:
            raise StoreError(f"archive is not a readable tar: {e}") from None

    @staticmethod
    def _norm(name: str, base: str, entry: str | None = None) -> str:
        """Lexically resolve an archive path (link targets relative to ``base``); any escape
        from the archive root, absolute path or NUL is refused."""
        label = f"archive entry {entry or name!r}"
        if "\x00" in name or name.startswith("/"):
            raise StoreError(f"{label}: absolute path or NUL in {name!r}")
        parts = [p for p in base.split("/") if p] if entry else []
        for comp in name.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts or not entry:
                    raise StoreError(f"{label}: path {name!r} leaves the archive")
                parts.pop()
            else:
                parts.append(comp)
        return "/".join(parts)

    def file(self, path: str) -> Path:
        seen = 0
        while path in self.links:
            path, seen = self.links[path], seen + 1
            if seen > 16:
                raise StoreError(f"archive entry {path!r}: too many levels of links")
        if path not in self.files:
            raise StoreError(f"archive is missing {path!r}")
        return self.files[path]

    def json(self, path: str) -> Any:
        f = self.file(path)
        if f.stat().st_size > _MAX_JSON:
            raise StoreError(f"archive entry {path!r} is too large for JSON")
        try:
            return json.loads(f.read_bytes())
        except ValueError:
            raise StoreError(f"archive entry {path!r} is not valid JSON") from None

    def commit(self, path: str, digest: str | None = None, size: int | None = None) -> str:
        """Verify (against ``digest`` or the hex in the path) and commit a file as a blob."""
        f = self.file(path)
        actual = _file_digest(f)
        m = _HEX_NAME.search(path)
        expected = digest or (f"sha256:{m.group(1)}" if m else None)
        if expected is not None and actual != expected:
            raise DigestMismatch(f"archive entry {path!r}: content has digest {actual}, expected {expected}")
        if size is not None and f.stat().st_size != size:
            raise DigestMismatch(f"archive entry {path!r}: size {f.stat().st_size} != {size}")
        if not self.store.has_blob(actual):
            staged = self.store.root / "tmp" / f"blob-{uuid.uuid4().hex}"
            shutil.copyfile(f, staged)
            self.store.commit_blob(staged, actual, f.stat().st_size)
        return actual

    def load_docker(self) -> list[str]:
        entries = self.json("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise StoreError("archive manifest.json is not a non-empty list")
        ids = []
        for n, entry in enumerate(entries):
            try:
                config_path = self._norm(entry["Config"], "")
                layer_paths = [self._norm(p, "") for p in entry["Layers"]]
                tags = [self.normalize(t) for t in (entry.get("RepoTags") or [])]
            except (KeyError, TypeError, AttributeError):
                raise StoreError(f"archive manifest.json entry {n} is malformed") from None
            config_digest = self.commit(config_path)
            config = self.store.blob_path(config_digest).read_bytes()
            layers = []
            for lp in layer_paths:
                digest = self.commit(lp)
                with open(self.store.blob_path(digest), "rb") as f:
                    kind = _compression(None, f)
                layers.append((digest, {"gzip": MT_OCI_TAR + "+gzip", "zstd": MT_OCI_TAR + "+zstd"}
                               .get(kind, MT_OCI_TAR)))
            ids.append(self.store.add_image(config, None, layers, tags))
        return ids

    def load_oci(self) -> list[str]:
        if "oci-layout" not in self.files:
            raise StoreError("archive has index.json but no oci-layout file")
        index = self.json("index.json")
        ids: list[str] = []
        for desc in _descriptors(index, "index.json"):
            ann = desc.get("annotations") or {}
            name = ann.get("io.containerd.image.name") or ann.get("org.opencontainers.image.ref.name")
            tags = [self.normalize(name)] if isinstance(name, str) and ("/" in name or ":" in name) else []
            ids.extend(self.load_manifest(desc, tags, depth=0))
        return ids

    def load_manifest(self, desc: dict[str, Any], tags: list[str], depth: int) -> list[str]:
        if depth > 4:
            raise StoreError("archive index nesting is too deep")
        digest = str(desc.get("digest"))
        path = f"blobs/sha256/{hex_of(digest)}"
        self.commit(path, digest, desc.get("size"))
        doc = self.json(path)
        if desc.get("mediaType") in _INDEX_TYPES or "manifests" in doc:
            children = _descriptors(doc, path)
            images = [c for c in children if (c.get("platform") or {}).get("os") != "unknown"]
            match = [c for c in images if (c.get("platform") or {}).get("architecture") == host_arch()]
            ids = []
            for child in (match[:1] or images):
                ids.extend(self.load_manifest(child, tags, depth + 1))
            return ids
        try:
            cdesc = doc["config"]
            ldescs = doc["layers"]
            config_path = f"blobs/sha256/{hex_of(str(cdesc['digest']))}"
        except (KeyError, TypeError):
            raise StoreError(f"archive manifest {digest} is malformed") from None
        self.commit(config_path, cdesc["digest"], cdesc.get("size"))
        layers = []
        for ld in ldescs:
            ldigest = str(ld.get("digest"))
            self.commit(f"blobs/sha256/{hex_of(ldigest)}", ldigest, ld.get("size"))
            layers.append((ldigest, str(ld.get("mediaType") or MT_OCI_TAR)))
        config = self.store.blob_path(cdesc["digest"]).read_bytes()
        return [self.store.add_image(config, digest, layers, tags)]


def _descriptors(doc: Any, where: str) -> list[dict[str, Any]]:
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(d, dict) for d in manifests):
        raise StoreError(f"archive {where} has no valid manifests list")
    return manifests


def _file_digest(path: Path) -> str:
    h = fast_sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
