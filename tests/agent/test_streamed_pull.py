"""Layers unpacked while they download: RegistryClient.open_blob -> Store.ingest_layer ->
add_image(prepared=...), and agent.pull falling back to a resumed download when the stream
breaks. Against the real docker-registry; faults come from the real TCP proxy."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent import pull
from agent.layers import LayerError
from agent.reference import parse
from agent.registry import Descriptor, DigestMismatch, TransportError
from agent.store import DigestMismatch as BadContent
from agent.store import Store, StoreError, chain_id
from tests.agent.test_registry_client import FaultProxy, client, tampered
from tests.agent.test_store import HOSTILE_TARS, snapshot
from tests.support.registry import RunningRegistry

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="store tests run as root")


def _layer(registry: RunningRegistry, name: str = "busybox", index: int = 0) -> tuple[Descriptor, str, bytes]:
    image = registry.images[name]
    layer = image.manifest.layers[index]
    return (Descriptor(layer.media_type, layer.digest, layer.size), layer.diff_id,
            image.blob(layer.digest).read_bytes())


def test_open_blob_streams_and_checks_the_size(registry: RunningRegistry) -> None:
    desc, _, data = _layer(registry)
    ref = parse(f"{registry.address}/busybox")
    with client().open_blob(ref, desc) as stream:
        assert stream.read() == data
    short = Descriptor(desc.media_type, desc.digest, desc.size - 1)
    with client().open_blob(ref, short) as stream, pytest.raises(DigestMismatch, match="larger than"):
        stream.read()
    plan = lambda n, path: "cut:300000" if "/blobs/" in path else "pass"  # noqa: E731
    with FaultProxy(registry.address, plan) as proxy:
        c = client(mirrors={registry.address: (proxy.url,)}, fall_back_to_registry=False)
        with c.open_blob(ref, desc) as stream, pytest.raises(TransportError, match="after 300000 of"):
            stream.read()


def test_layer_unpacked_while_downloading_equals_the_unpacked_blob(registry: RunningRegistry, store: Store,
                                                                   tmp_path: Path) -> None:
    desc, diff_id, data = _layer(registry)
    with client().open_blob(parse(f"{registry.address}/busybox"), desc) as stream:
        work = store.ingest_layer(stream, desc.digest, desc.size, desc.media_type, None, diff_id)
    assert store.blob_path(desc.digest).read_bytes() == data
    assert not store.ingest_path(desc.digest).exists() and os.listdir(store.root / "ingest") == []
    config = registry.images["busybox"].blob(registry.images["busybox"].manifest.config_digest).read_bytes()
    image_id = store.add_image(config, None, [(desc.digest, desc.media_type)], ["b:1"], {diff_id: work})
    assert not work.exists() and os.listdir(store.root / "tmp") == []
    streamed = store.layer_dir(diff_id)
    assert store.image(image_id).chain_ids == [diff_id]
    assert os.readlink(streamed / "diff/bin/sh") == "/bin/busybox"
    # the same blob unpacked the ordinary way gives the same tree and metadata
    other = Store(tmp_path / "other")
    staged = other.ingest_path(desc.digest)
    staged.write_bytes(data)
    other.commit_blob(staged, desc.digest, desc.size)
    other.add_image(config, None, [(desc.digest, desc.media_type)], ["b:1"])
    assert snapshot(other.layer_dir(diff_id)) == snapshot(streamed)
    other.close()


def test_a_concurrent_download_of_the_same_blob_cannot_mix_in(registry: RunningRegistry, store: Store) -> None:
    # another pull's partial download of the same layer sits in ingest/ (and could be written
    # to while we stream): the streamed copy is a file of its own, so what is committed is
    # exactly what was hashed
    desc, diff_id, data = _layer(registry)
    other = store.ingest_path(desc.digest)
    other.write_bytes(b"another writer's bytes")
    with client().open_blob(parse(f"{registry.address}/busybox"), desc) as stream:
        work = store.ingest_layer(stream, desc.digest, desc.size, desc.media_type, None, diff_id)
    assert store.blob_path(desc.digest).read_bytes() == data
    assert other.read_bytes() == b"another writer's bytes"
    store.discard_prepared([work])


def test_tampered_download_leaves_the_store_unchanged(registry: RunningRegistry, store: Store) -> None:
    desc, diff_id, _ = _layer(registry, "tamper")
    ref = parse(f"{registry.address}/tamper")
    before = snapshot(store.root)
    flip = lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]  # noqa: E731
    with tampered(registry.blob_path(desc.digest), flip):
        with client().open_blob(ref, desc) as stream, pytest.raises(BadContent, match=desc.digest):
            store.ingest_layer(stream, desc.digest, desc.size, desc.media_type, None, diff_id)
    assert snapshot(store.root) == before
    assert os.listdir(store.root / "tmp") == []


def test_wrong_diff_id_leaves_the_store_unchanged(registry: RunningRegistry, store: Store) -> None:
    desc, _, _ = _layer(registry)
    before = snapshot(store.root)
    with client().open_blob(parse(f"{registry.address}/busybox"), desc) as stream, \
            pytest.raises(BadContent, match="diff_id"):
        store.ingest_layer(stream, desc.digest, desc.size, desc.media_type, None, "sha256:" + "0" * 64)
    assert snapshot(store.root) == before
    assert os.listdir(store.root / "tmp") == []


@pytest.mark.parametrize("tar,message", [(t, m) for _, t, m in HOSTILE_TARS],
                         ids=[n for n, _, _ in HOSTILE_TARS])
def test_hostile_layer_stream_leaves_the_store_unchanged(store: Store, tar: bytes, message: str) -> None:
    blob = gzip.compress(tar)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    before = snapshot(store.root)
    with pytest.raises(LayerError) as exc:
        store.ingest_layer(io.BytesIO(blob), digest, len(blob), "application/vnd.oci.image.layer.v1.tar+gzip",
                           None, "sha256:" + hashlib.sha256(tar).hexdigest())
    assert message in str(exc.value)
    assert snapshot(store.root) == before
    assert os.listdir(store.root / "tmp") == []


def test_broken_stream_keeps_the_partial_for_a_resume(registry: RunningRegistry, store: Store) -> None:
    desc, diff_id, data = _layer(registry)
    ref = parse(f"{registry.address}/busybox")
    plan = lambda n, path: "cut:300000" if "/blobs/" in path else "pass"  # noqa: E731
    with FaultProxy(registry.address, plan) as proxy:
        c = client(mirrors={registry.address: (proxy.url,)}, fall_back_to_registry=False)
        with c.open_blob(ref, desc) as stream, pytest.raises(TransportError):
            store.ingest_layer(stream, desc.digest, desc.size, desc.media_type, None, diff_id)
    assert store.ingest_path(desc.digest).read_bytes() == data[:300000]
    assert not store.has_blob(desc.digest) and not store.has_layer(diff_id)
    assert os.listdir(store.root / "tmp") == []


def test_prepared_tree_must_be_the_named_layer(registry: RunningRegistry, store: Store) -> None:
    desc, diff_id, _ = _layer(registry)
    with client().open_blob(parse(f"{registry.address}/busybox"), desc) as stream:
        work = store.ingest_layer(stream, desc.digest, desc.size, desc.media_type, None, diff_id)
    config = registry.images["layers"].blob(registry.images["layers"].manifest.config_digest).read_bytes()
    layers = registry.images["layers"].manifest.layers
    assert layers[0].digest == desc.digest  # busybox, committed above
    wrong = chain_id(layers[0].diff_id, layers[1].diff_id)  # offered busybox's tree for the second layer
    with pytest.raises(StoreError, match="is not layer"):
        store.add_image(config, None, [(l.digest, l.media_type) for l in layers], ["x:1"], {wrong: work})


class _Engine:
    def __init__(self, store: Store, root: Path) -> None:
        self.store, self.root = store, root
        self.events = self

    def emit(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("cut", [False, True], ids=["streamed", "stream-broken-then-resumed"])
def test_pull_streams_layers_and_falls_back_to_a_resumed_download(registry: RunningRegistry, store: Store,
                                                                  tmp_path: Path, cut: bool,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    image = registry.images["nginx"]
    streamed: list[str] = []
    real = store.ingest_layer
    monkeypatch.setattr(store, "ingest_layer", lambda src, digest, *a: streamed.append(digest) or real(src, digest, *a))
    big = max(image.manifest.layers, key=lambda l: l.size)
    cuts: list[str] = []

    def plan(n: int, path: str) -> str:
        if cut and path.endswith(big.digest) and not cuts:
            cuts.append(path)
            return "cut:500000"
        return "pass"

    with FaultProxy(registry.address, plan) as proxy:
        messages: list[dict[str, Any]] = []
        hostport = proxy.url.removeprefix("http://")
        t0 = time.monotonic()
        image_id = pull.pull(_Engine(store, tmp_path), f"{hostport}/nginx:latest", None, None, messages.append)
        took = time.monotonic() - t0
        blob_gets = [(p, h.get("Range")) for p, h in proxy.seen if "/blobs/" in p and p.endswith(big.digest)]
    assert not [m for m in messages if "error" in m], messages
    assert image_id == "sha256:" + image.manifest.config_digest.removeprefix("sha256:")
    assert store.image(image_id).chain_ids[-1] == chain_id(image.manifest.layers[0].diff_id, big.diff_id)
    assert os.listdir(store.root / "tmp") == [] and os.listdir(store.root / "ingest") == []
    assert blob_gets == ([(f"/v2/nginx/blobs/{big.digest}", None),
                          (f"/v2/nginx/blobs/{big.digest}", "bytes=500000-")] if cut
                         else [(f"/v2/nginx/blobs/{big.digest}", None)])
    assert sorted(streamed) == sorted(l.digest for l in image.manifest.layers)
    shown = [m["progressDetail"]["current"] for m in messages
             if m.get("status") == "Downloading" and m["id"] == big.digest[7:19]]
    assert len(shown) <= 2 + took / pull.PROGRESS_EVERY  # not one message per read
    if not cut:
        assert shown[-1] == big.size and shown == sorted(shown)


def test_pull_of_an_oversized_blob_fails_and_keeps_nothing(registry: RunningRegistry, store: Store,
                                                           tmp_path: Path) -> None:
    image = registry.images["nginx"]
    big = max(image.manifest.layers, key=lambda l: l.size)
    before = snapshot(store.root)
    messages: list[dict[str, Any]] = []
    with tampered(registry.blob_path(big.digest), lambda b: b + b"extra"):
        assert pull.pull(_Engine(store, tmp_path), f"{registry.address}/nginx:latest", None, None,
                         messages.append) is None
    errors = [m["error"] for m in messages if "error" in m]
    assert len(errors) == 1 and "larger than its declared size" in errors[0], errors
    assert snapshot(store.root) == before
    assert os.listdir(store.root / "tmp") == []


def test_a_tampered_config_fails_the_pull_and_keeps_nothing(registry: RunningRegistry, store: Store,
                                                            tmp_path: Path) -> None:
    """The config comes while the layers' requests are out: its failure is the pull's one
    error, and what the layers got is not kept."""
    image = registry.images["nginx"]
    before = snapshot(store.root)
    messages: list[dict[str, Any]] = []
    with tampered(registry.blob_path(image.manifest.config_digest), lambda b: b.replace(b"{", b"{ ", 1)):
        assert pull.pull(_Engine(store, tmp_path), f"{registry.address}/nginx:latest", None, None,
                         messages.append) is None
    errors = [m["error"] for m in messages if "error" in m]
    assert len(errors) == 1 and image.manifest.config_digest in errors[0], errors
    assert snapshot(store.root) == before
    assert os.listdir(store.root / "tmp") == [] and os.listdir(store.root / "ingest") == []


def test_a_config_the_registry_cannot_serve_fails_the_pull_with_its_own_error(registry: RunningRegistry,
                                                                              store: Store, tmp_path: Path) -> None:
    image = registry.images["nginx"]
    config_path = f"/blobs/{image.manifest.config_digest}"
    plan = lambda n, path: "503" if path.endswith(config_path) else "pass"  # noqa: E731
    before = snapshot(store.root)
    messages: list[dict[str, Any]] = []
    with FaultProxy(registry.address, plan) as proxy:
        hostport = proxy.url.removeprefix("http://")
        assert pull.pull(_Engine(store, tmp_path), f"{hostport}/nginx:latest", None, None, messages.append) is None
    errors = [m["error"] for m in messages if "error" in m]
    assert len(errors) == 1 and "503" in errors[0] and image.manifest.config_digest in errors[0], errors
    assert snapshot(store.root) == before
