"""`docker pull`: registry -> verified blobs -> unpacked layers -> an image, reporting
progress in Docker's JSON message stream."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from agent import guest_settings, reference, workers
from agent.registry import (BlobStream, Descriptor, DigestMismatch, Platform, RegistryClient, RegistryConfig,
                            RegistryError, TransportError, run_all)
from agent.layers import LayerError
from agent.store import StoreError, chain_id

log = logging.getLogger(__name__)

PROGRESS_EVERY = 0.1  # seconds between two "Downloading" messages of a layer (as dockerd)

Emit = Callable[[dict[str, Any]], None]


def registry_config(auth: dict[str, str] | None = None, ref: reference.Reference | None = None,
                    config_file: Path = guest_settings.GUEST_SETTINGS, stored_auths: dict[str, Any] | None = None) -> RegistryConfig:
    """Mirrors and insecure registries from the VM settings; credentials from the request
    (X-Registry-Auth) or from `pydesk login`."""
    mirrors: dict[str, list[str]] = {}
    insecure: set[str] = set()
    mirror_only = False
    for key, value in guest_settings.read(config_file):
        if key == "mirror":
            registry, _, url = value.partition("=")
            mirrors.setdefault(registry, []).append(url)
        elif key == "insecure":
            insecure.add(value.strip())
        elif key == "mirror-only":
            mirror_only = value.strip() == "1"
    auths: dict[str, tuple[str, str]] = {}
    for server, cred in (stored_auths or {}).items():
        auths[server] = (cred["username"], cred["password"])
    if auth and auth.get("username") and ref is not None:
        auths[ref.registry] = (auth["username"], auth.get("password", ""))
    return RegistryConfig(mirrors={k: tuple(v) for k, v in mirrors.items()}, insecure=frozenset(insecure), auths=auths,
                          fall_back_to_registry=not mirror_only)


def _bar(current: int, total: int, width: int = 50) -> str:
    if total <= 0:
        return ""
    done = min(width, current * width // total)
    return "[" + "=" * max(done - 1, 0) + (">" if done else "") + " " * (width - done) + f"] {_human(current)}/{_human(total)}"


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}TB"


def pull(engine: Any, text: str, platform: str | None, auth: dict[str, str] | None, emit: Emit) -> str | None:
    """Pull ``text`` into the engine's store; returns the image id, or None after emitting
    an error message (the stream's status is already 200 by then)."""
    def fail(message: str) -> None:
        emit({"errorDetail": {"message": message}, "error": message})

    try:
        ref = reference.parse(text)
    except ValueError as exc:
        fail(str(exc))
        return None
    store = engine.store
    client = RegistryClient(registry_config(auth, ref, stored_auths=engine_auths(engine)))
    emit({"status": f"Pulling from {ref.repository}", "id": ref.tag or ref.digest or "latest"})
    committed: list[str] = []
    prepared: dict[str, Path] = {}  # chain id -> layer unpacked while it downloaded
    try:
        resolved = client.resolve(ref, Platform.of(platform) if platform else None)
        descs: list[Descriptor] = [resolved.config, *resolved.layers]
        todo = []
        for d in resolved.layers:
            short = d.digest.split(":")[1][:12]
            if store.has_blob(d.digest):
                emit({"status": "Already exists", "progressDetail": {}, "id": short})
            else:
                emit({"status": "Pulling fs layer", "progressDetail": {}, "id": short})
                todo.append(d)
        done: dict[str, int] = {}
        shown: dict[str, float] = {}
        lock = threading.Lock()

        def progress(d: Descriptor, n: int) -> None:
            now = time.monotonic()
            with lock:
                done[d.digest] = done.get(d.digest, 0) + n
                cur = done[d.digest]
                # at most every PROGRESS_EVERY per layer, and the last: each message is a write
                # through the engine port, and a read a few milliseconds
                if cur < d.size and now - shown.get(d.digest, 0.0) < PROGRESS_EVERY:
                    return
                shown[d.digest] = now
            emit({"status": "Downloading", "progressDetail": {"current": cur, "total": d.size},
                  "progress": _bar(cur, d.size), "id": d.digest.split(":")[1][:12]})

        # The config (for the layers' diff_ids) comes on a thread of its own while the layers'
        # requests go out: each is a round trip through the VM's forward, and a layer waits
        # for the config only once its own answer has come.
        config: Future[tuple[bytes, dict[str, tuple[str | None, str, str]]]] = Future()

        def load_config() -> None:
            try:
                if not store.has_blob(resolved.config.digest):
                    client.fetch_blob(ref, resolved.config, store.ingest_path(resolved.config.digest))
                    store.commit_blob(store.ingest_path(resolved.config.digest), resolved.config.digest,
                                      resolved.config.size)
                    with lock:
                        committed.append(resolved.config.digest)
                with store.open_blob(resolved.config.digest) as f:
                    config_bytes = f.read()
                config.set_result((config_bytes, _layer_plan(config_bytes, resolved.layers)))
            except BaseException as exc:  # raised where the config is wanted
                config.set_exception(exc)

        def layer_plan() -> dict[str, tuple[str | None, str, str]]:
            try:
                return config.result()[1]
            except Exception:
                raise _ConfigFailed from None  # not a failure of this layer's download

        def get(d: Descriptor) -> None:
            """Download a layer, unpacking it as it arrives when the store can; a stream that
            breaks is resumed as a plain download, unpacked later by add_image."""
            if store.streamable(d.media_type):
                try:
                    with client.open_blob(ref, d) as stream:  # (read ahead by the store as it unpacks)
                        parent, diff_id, chain = layer_plan().get(d.digest, (None, "", ""))
                        if chain:
                            work = store.ingest_layer(_Counting(stream, lambda n: progress(d, n)), d.digest,
                                                      d.size, d.media_type, parent, diff_id)
                            with lock:
                                prepared[chain] = work
                                committed.append(d.digest)
                            emit({"status": "Download complete", "progressDetail": {},
                                  "id": d.digest.split(":")[1][:12]})
                            return
                except TransportError as exc:
                    log.info("layer %s: %s; resuming it as a download", d.digest, exc)
                except DigestMismatch:  # more bytes than declared: nothing of it is worth resuming
                    store.ingest_path(d.digest).unlink(missing_ok=True)
                    raise
            client.fetch_blob(ref, d, store.ingest_path(d.digest), lambda n: progress(d, n))
            store.commit_blob(store.ingest_path(d.digest), d.digest, d.size)
            with lock:
                committed.append(d.digest)
            emit({"status": "Download complete", "progressDetail": {}, "id": d.digest.split(":")[1][:12]})

        config_job = workers.spawn(load_config, name="config")
        try:
            run_all(get, list({d.digest: d for d in todo}.values()), name="layer")
        except _ConfigFailed:
            pass  # the config's own error is raised just below
        finally:
            config_job.join()  # before a failure's clean-up reads ``committed``
        config_bytes = config.result()[0]
        fresh = [d for d in resolved.layers if any(t.digest == d.digest for t in todo)]  # not "Already exists"
        for d in fresh:
            emit({"status": "Extracting", "progressDetail": {}, "id": d.digest.split(":")[1][:12]})
        tags = [str(ref)] if ref.tag and not ref.digest else []
        before = _exists(store, str(ref))
        image_id = store.add_image(config_bytes, resolved.index_digest or resolved.digest,
                                   [(d.digest, d.media_type) for d in resolved.layers], tags, prepared)
        if ref.digest:
            store.tag(image_id, str(ref))
        for d in fresh:
            emit({"status": "Pull complete", "progressDetail": {}, "id": d.digest.split(":")[1][:12]})
        del descs
    except (RegistryError, StoreError, LayerError, OSError, ValueError) as exc:
        log.warning("pull of %s failed: %s", text, exc)
        store.discard_unused_blobs(committed)
        fail(str(exc))
        return None
    except Exception as exc:  # the HTTP status is already sent: report in the stream
        log.exception("pull of %s failed", text)
        store.discard_unused_blobs(committed)
        fail(f"internal error: {exc}")
        return None
    finally:
        store.discard_prepared(prepared.values())
    emit({"status": f"Digest: {resolved.index_digest or resolved.digest}"})
    status = "Image is up to date" if before == image_id else "Downloaded newer image"
    emit({"status": f"Status: {status} for {ref.familiar}"})
    engine.events.emit("image", "pull", image_id, {"name": ref.familiar})
    return image_id


class _ConfigFailed(Exception):
    """A layer stopped because the image config could not be had."""


class _Counting:
    """Reads through, reporting how many bytes each read returned."""

    def __init__(self, src: BlobStream, report: Callable[[int], None]) -> None:
        self.src, self.report = src, report

    def read(self, size: int = -1) -> bytes:
        data = self.src.read(size)
        if data:
            self.report(len(data))
        return data


def _layer_plan(config_bytes: bytes, layers: Sequence[Descriptor]) -> dict[str, tuple[str | None, str, str]]:
    """Layer digest -> (parent chain id, diff_id, chain id) from the image config, so layers can
    be unpacked (and verified) as they arrive, in any order. Empty if the config does not say;
    add_image then reports what is wrong with it."""
    try:
        diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        return {}
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers) \
            or not all(isinstance(x, str) for x in diff_ids):
        return {}
    plan: dict[str, tuple[str | None, str, str]] = {}
    parent: str | None = None
    for d, diff_id in zip(layers, diff_ids):
        chain = chain_id(parent, diff_id)
        plan.setdefault(d.digest, (parent, diff_id, chain))
        parent = chain
    return plan


def _exists(store: Any, ref: str) -> str | None:
    try:
        return store.image(ref).id
    except (StoreError, KeyError):
        return None


def engine_auths(engine: Any) -> dict[str, Any]:
    try:
        return json.loads((engine.root / "auths.json").read_text())
    except (OSError, ValueError):
        return {}
