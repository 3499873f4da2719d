"""`docker commit`, `docker export` and `docker import`.

- commit: the container's overlayfs upper dir becomes one more layer on its image's (its
  whiteouts and opaque directories written as OCI's ``.wh.`` entries), with the container's
  config as the image's, the caller's overrides and ``--change`` instructions on top;
- export: the container's merged file system (the engine's own view of its overlay: no
  volumes, no /proc) as one tar;
- import: a tar, plain or compressed with gzip, bzip2, xz or zstd, as a one-layer image.

The new layer is stored uncompressed, as dockerd stores it, and unpacked by the store like any
pulled layer, so a hostile import is refused the same way. A failure leaves no blob behind.
"""

from __future__ import annotations

import bz2
import contextlib
import copy
import functools
import json
import logging
import lzma
import os
import shutil
import stat
import subprocess
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from agent import archive, changes
from agent.containers import Container, utc_now
from agent.gunzip import GunzipReader
from agent.layers import LayerError
from agent.store import MT_OCI_TAR, ImageNotFound, StoreError, host_arch

log = logging.getLogger(__name__)

#: What of a container's config an image keeps (the OCI image config's fields, and Docker's).
IMAGE_CONFIG_KEYS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
                     "StopSignal", "OnBuild", "Shell", "Healthcheck", "ArgsEscaped")
#: Mount points (and /.dockerenv) the engine puts into every container (dockerd keeps them in a
#: hidden init layer): left out of a commit when the image did not have them.
ENGINE_MOUNTS = ("etc/hostname", "etc/hosts", "etc/resolv.conf", "dev", "proc", "sys", "dev/shm", ".dockerenv")


class CommitError(Exception):
    """A commit or import that cannot be done (HTTP ``status``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def image_config(container_config: dict[str, Any], overrides: dict[str, Any] | None,
                 change_list: Iterable[str]) -> dict[str, Any]:
    """The new image's ``config``: the container's, then the request's non-empty fields, then
    the ``--change`` instructions."""
    config = {k: copy.deepcopy(v) for k, v in container_config.items() if k in IMAGE_CONFIG_KEYS and v is not None}
    for k, v in (overrides or {}).items():
        if k in IMAGE_CONFIG_KEYS and v not in (None, "", [], {}):
            config[k] = copy.deepcopy(v)
    try:
        changes.apply(config, change_list)
    except changes.ChangeError as exc:
        raise CommitError(400, str(exc)) from None
    return config


def commit(engine: Any, c: Container, *, tag: str | None, comment: str, author: str,
           change_list: Iterable[str], overrides: dict[str, Any] | None, pause: bool) -> str:
    """A new image of ``c``'s image plus its changes; returns the image id."""
    store = engine.store
    try:
        base_image = store.image(c.r["Image"])
    except (ImageNotFound, StoreError):
        raise CommitError(404, f"the image of container {c.name} is not in the store any more") from None
    config = image_config(c.r["Config"], overrides, change_list)
    lowers = base_image.lower_dirs
    targets = [str(v.get("Destination", "")) for v in c.r.get("Mounts") or []]
    targets += list(c.r["HostConfig"].get("Tmpfs") or {})
    skip = frozenset(m for m in (*ENGINE_MOUNTS, *(os.path.normpath(t).strip("/") for t in targets if t))
                     if m and lower_stat(lowers, m) is None)
    paused_here = False
    if pause and c.running and not c.state.get("Paused"):
        engine.pause(c)  # as dockerd: nothing changes under the walk
        paused_here = True
    try:
        with _upper(c) as fd:
            written = [0]

            def write(out: BinaryIO) -> None:
                written[0] = archive.write_tree(fd, out, layer=True, skip=skip,
                                                lower=functools.partial(lower_stat, lowers))

            digest, size = store.put_layer_tar(write)
    finally:
        if paused_here and c.running:
            engine.pause(c, resume=True)
    now = utc_now()
    doc = json.loads(store.config_bytes(base_image.id))
    empty = written[0] == 0
    doc.update(config=config, created=now, container=c.id)
    if author:
        doc["author"] = author
    if comment:
        doc["comment"] = comment
    history = {"created": now, "created_by": " ".join(c.r["Config"].get("Cmd") or []),
               **({"author": author} if author else {}), **({"comment": comment} if comment else {}),
               **({"empty_layer": True} if empty else {})}
    doc["history"] = [*(doc.get("history") or []), history]
    layers = list(base_image.layers)
    if not empty:  # no changes: no layer, as dockerd
        doc["rootfs"]["diff_ids"] = [*doc["rootfs"]["diff_ids"], digest]
        layers.append((digest, MT_OCI_TAR))
    log.info("commit of %s: layer %s, %d bytes, %d entries", c.name, digest, size, written[0])
    return _add(store, doc, layers, tag, digest)


def lower_stat(lowers: list[Path], rel: str) -> os.stat_result | None:
    """What the image's layers (top-most first) show at ``rel``, as overlayfs merges them:
    names are looked up one component at a time and never through a symlink (which, in a
    layer folder, would point into the engine's own file system), and the first layer that
    has the name, or something that is not a directory on its way, decides."""
    parts = rel.split("/")
    for low in lowers:
        path = low
        for i, part in enumerate(parts):
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                break  # not in this layer: the next one down
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                return None  # a whiteout: deleted in this layer
            if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                return None  # a file or a link here hides the rest of the way
        else:
            return st
    return None


def _add(store: Any, doc: dict[str, Any], layers: list[tuple[str, str]], tag: str | None, digest: str) -> str:
    try:
        return cast(str, store.add_image(json.dumps(doc, separators=(",", ":")).encode(), None, layers,
                                         [tag] if tag else []))
    finally:
        store.discard_unused_blobs([digest])  # (kept when the image uses it)


@contextlib.contextmanager
def _upper(c: Container) -> Iterator[int]:
    fd = os.open(c.root / "upper", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def import_image(store: Any, body: BinaryIO, *, tag: str | None, message: str, change_list: Iterable[str],
                 platform: str | None) -> str:
    """A one-layer image of the tar in ``body``; returns the image id."""
    arch = (platform or "").split("/")[1] if (platform or "").count("/") >= 1 else host_arch()
    if platform and not platform.startswith("linux/"):
        raise CommitError(400, f"invalid platform {platform!r}: only linux images run here")
    config = image_config({}, None, change_list)
    staged = store.root / "tmp" / f"import-{os.urandom(8).hex()}"
    try:
        with open(staged, "wb") as f:
            shutil.copyfileobj(body, f, 1 << 20)
        with _decompressed(staged) as tar:
            digest, _ = store.put_layer_tar(lambda out: shutil.copyfileobj(tar, out, 1 << 20))
    except (EOFError, zlib.error, lzma.LZMAError, LayerError) as exc:  # a cut or corrupt compressed stream
        raise CommitError(400, f"the imported archive cannot be decompressed: {exc}") from None
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise CommitError(400, f"the imported archive cannot be decompressed: {exc}") from None  # bz2's, gzip's
    finally:
        staged.unlink(missing_ok=True)
    now = utc_now()
    comment = message or "Imported from -"  # dockerd's words when there is no message
    doc = {"architecture": arch, "os": "linux", "created": now, "config": config, "comment": comment,
           "rootfs": {"type": "layers", "diff_ids": [digest]}, "history": [{"created": now, "comment": comment}]}
    return _add(store, doc, [(digest, MT_OCI_TAR)], tag, digest)


@contextlib.contextmanager
def _decompressed(path: Path) -> Iterator[BinaryIO]:
    """The tar inside the file ``path``, which may be gzip, bzip2, xz or zstd compressed (the
    formats `docker import` reads)."""
    with open(path, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        with _reader(raw, head, path) as tar:
            yield tar


@contextlib.contextmanager
def _reader(raw: BinaryIO, head: bytes, path: Path) -> Iterator[BinaryIO]:
    if head[:2] == b"\x1f\x8b":
        yield cast(BinaryIO, GunzipReader(raw))
    elif head[:3] == b"BZh":
        with bz2.open(raw, "rb") as f:
            yield cast(BinaryIO, f)
    elif head == b"\xfd7zXZ\x00":
        with lzma.open(raw, "rb") as f:
            yield cast(BinaryIO, f)
    elif head[:4] == b"\x28\xb5\x2f\xfd":
        proc = subprocess.Popen(["zstd", "-dcq", "--", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            yield cast(BinaryIO, proc.stdout)
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
            if proc.wait() != 0:
                raise CommitError(400, f"the imported archive is not valid zstd: {err or 'corrupt stream'}")
    else:
        yield raw
