"""The in-guest registry client against a real docker-registry on 127.0.0.1 (no mocks).

Faults (dropped connections, 5xx, redirects to another host) are injected by a real TCP proxy
in front of the real registry."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.reference import parse
from agent.registry import (
    OCI_MANIFEST, AuthError, Descriptor, DigestMismatch, ManifestError, NotFound, Platform, RegistryClient, RegistryConfig,
    TransportError,
)
from tests.support.images import LAYER_GZIP, LAYER_ZSTD
from tests.support.registry import RunningRegistry, free_port

FAST = dict(retries=2, backoff=0.01, max_backoff=0.05, connect_timeout=5, read_timeout=10)


def client(**kw: object) -> RegistryClient:
    return RegistryClient(RegistryConfig(**{**FAST, **kw}))  # type: ignore[arg-type]


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class Counter:
    def __init__(self) -> None:
        self.total = 0
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self.lock:
            self.total += n


@contextlib.contextmanager
def only_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record every host dialled; anything but 127.0.0.1 fails the test (and is never contacted)."""
    dialled: list[str] = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):  # type: ignore[no-untyped-def]
        dialled.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"test forbids dialling {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    yield dialled


# --- anonymous pulls ------------------------------------------------------------------------

def test_resolve_and_fetch_anonymous(registry: RunningRegistry, tmp_path: Path) -> None:
    image = registry.images["busybox"]
    c = client()
    resolved = c.resolve(parse(f"{registry.address}/busybox"), "linux/amd64")
    assert resolved.digest == image.digest and resolved.index_digest is None
    assert resolved.media_type == OCI_MANIFEST
    assert hashlib.sha256(resolved.manifest).hexdigest() == image.digest[7:]
    assert resolved.config.digest == image.manifest.config_digest
    assert [(l.digest, l.size, l.media_type) for l in resolved.layers] == \
        [(l.digest, l.size, l.media_type) for l in image.manifest.layers]
    assert resolved.reference.digest == image.digest and resolved.reference.tag == "latest"
    for desc in (resolved.config, *resolved.layers):
        dest = tmp_path / desc.digest.replace(":", "_")
        progress = Counter()
        c.fetch_blob(resolved.reference, desc, dest, progress)
        assert dest.read_bytes() == image.blob(desc.digest).read_bytes()
        assert progress.total == desc.size


def test_unknown_repository_and_tag(registry: RunningRegistry) -> None:
    c = client()
    with pytest.raises(NotFound, match="not found"):
        c.resolve(parse(f"{registry.address}/does-not-exist"))
    with pytest.raises(NotFound, match="no-such-tag"):
        c.resolve(parse(f"{registry.address}/busybox:no-such-tag"))


def test_unreachable_registry_is_a_transport_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(TransportError, match=f"127.0.0.1:{port}"):
        client(retries=1).resolve(parse(f"127.0.0.1:{port}/busybox"))


# --- platforms ------------------------------------------------------------------------------

@pytest.mark.parametrize(("wanted", "platform"), [
    ("linux/amd64", "linux/amd64"),
    (("linux", "amd64", None), "linux/amd64"),
    ("linux/x86_64", "linux/amd64"),
    ("linux/arm64", "linux/arm64/v8"),
    (("linux", "arm64", "v8"), "linux/arm64/v8"),
    ("linux/aarch64", "linux/arm64/v8"),
])
def test_platform_selection(registry: RunningRegistry, wanted: object, platform: str) -> None:
    image = registry.images["multiarch"]
    expected = image.for_platform(platform)
    resolved = client().resolve(parse(f"{registry.address}/multiarch"), wanted)  # type: ignore[arg-type]
    assert resolved.index_digest == image.digest
    assert resolved.digest == expected.digest
    assert str(resolved.platform) == platform
    assert [l.digest for l in resolved.layers] == [l.digest for l in expected.layers]
    assert resolved.reference.digest == image.digest  # pinned to the index, like docker


def test_missing_platform_lists_available(registry: RunningRegistry) -> None:
    with pytest.raises(ManifestError) as err:
        client().resolve(parse(f"{registry.address}/multiarch"), "linux/ppc64le")
    message = str(err.value)
    assert "linux/ppc64le" in message and "linux/amd64" in message and "linux/arm64/v8" in message
    assert "unknown" not in message  # the attestation entry is not a platform
    assert "\n" not in message
    with pytest.raises(ManifestError, match="linux/arm64/v8"):
        client().resolve(parse(f"{registry.address}/multiarch"), "linux/arm64/v7")


def test_single_manifest_ignores_platform(registry: RunningRegistry) -> None:
    # A plain manifest is returned as is (docker does the same; the config says what it is).
    resolved = client().resolve(parse(f"{registry.address}/busybox"), "linux/arm64")
    assert resolved.digest == registry.images["busybox"].digest


# --- digests --------------------------------------------------------------------------------

def test_digest_pinning(registry: RunningRegistry) -> None:
    image = registry.images["busybox"]
    c = client()
    resolved = c.resolve(parse(f"{registry.address}/busybox@{image.digest}"))
    assert resolved.digest == image.digest
    # A child manifest of an index can be pinned directly.
    arm = registry.images["multiarch"].for_platform("linux/arm64/v8")
    resolved = c.resolve(parse(f"{registry.address}/multiarch@{arm.digest}"), "linux/amd64")
    assert resolved.digest == arm.digest and resolved.index_digest is None
    # A digest the repository does not have.
    other = registry.images["hello"].digest
    with pytest.raises(NotFound):
        c.resolve(parse(f"{registry.address}/busybox@{other}"))


@contextlib.contextmanager
def tampered(path: Path, change: Callable[[bytes], bytes]) -> Iterator[None]:
    original = path.read_bytes()
    path.write_bytes(change(original))
    try:
        yield
    finally:
        path.write_bytes(original)


def test_tampered_manifest_is_rejected(registry: RunningRegistry) -> None:
    image = registry.images["tamper"]
    ref = parse(f"{registry.address}/tamper@{image.digest}")
    # Still valid JSON, so the registry serves it; only the digest can tell.
    with tampered(registry.blob_path(image.digest), lambda b: b.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')):
        with pytest.raises(DigestMismatch, match=image.digest):
            client().resolve(ref)
    assert client().resolve(ref).digest == image.digest
    # A mirror that changes the content and sends no Docker-Content-Digest: the pinned digest
    # alone must catch it.
    with FaultProxy(registry.address, lambda n, p: "nodigest") as proxy:
        c = client(mirrors={registry.address: (proxy.url,)}, fall_back_to_registry=False)
        with pytest.raises(DigestMismatch, match=image.digest):
            c.resolve(ref)
        assert c.resolve(parse(f"{registry.address}/tamper")).digest != image.digest  # by tag: accepted
    assert proxy.seen


def test_tampered_blob_is_rejected_and_removed(registry: RunningRegistry, tmp_path: Path) -> None:
    image = registry.images["tamper"]
    layer = image.manifest.layers[0]
    desc = Descriptor(layer.media_type, layer.digest, layer.size)
    ref = parse(f"{registry.address}/tamper")
    dest = tmp_path / "layer"
    flip = lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:]  # noqa: E731
    with tampered(registry.blob_path(layer.digest), flip):
        with pytest.raises(DigestMismatch, match=layer.digest):
            client().fetch_blob(ref, desc, dest)
        assert not dest.exists()
    with tampered(registry.blob_path(layer.digest), lambda b: b[:-10]):
        with pytest.raises(DigestMismatch, match="expected"):
            client().fetch_blob(ref, desc, dest)
        assert not dest.exists()
    with tampered(registry.blob_path(layer.digest), lambda b: b + b"extra"):
        with pytest.raises(DigestMismatch, match="larger than its declared size"):
            client().fetch_blob(ref, desc, dest)
        assert not dest.exists()
    client().fetch_blob(ref, desc, dest)
    assert sha256_file(dest) == layer.digest


def test_descriptor_digest_must_match_content(registry: RunningRegistry, tmp_path: Path) -> None:
    # Asking for blob A but declaring it with B's size is caught too.
    layer = registry.images["busybox"].manifest.layers[0]
    with pytest.raises(DigestMismatch):
        client().fetch_blob(parse(f"{registry.address}/busybox"),
                            Descriptor(layer.media_type, layer.digest, layer.size - 1), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- resume ---------------------------------------------------------------------------------

def _busybox_layer(registry: RunningRegistry) -> tuple[Descriptor, bytes]:
    image = registry.images["busybox"]
    layer = image.manifest.layers[0]
    return Descriptor(layer.media_type, layer.digest, layer.size), image.blob(layer.digest).read_bytes()


def test_resume_fetches_only_the_rest(registry: RunningRegistry, tmp_path: Path) -> None:
    desc, data = _busybox_layer(registry)
    half = len(data) // 2
    dest = tmp_path / "partial"
    dest.write_bytes(data[:half])
    progress = Counter()
    client().fetch_blob(parse(f"{registry.address}/busybox"), desc, dest, progress)
    assert progress.total == len(data) - half
    assert dest.read_bytes() == data


def test_complete_file_is_not_downloaded_again(registry: RunningRegistry, tmp_path: Path) -> None:
    desc, data = _busybox_layer(registry)
    dest = tmp_path / "done"
    dest.write_bytes(data)
    progress = Counter()
    client().fetch_blob(parse("127.0.0.1:1/nothing-listens-here"), desc, dest, progress)
    assert progress.total == 0 and dest.read_bytes() == data


def test_corrupt_partial_is_restarted_once(registry: RunningRegistry, tmp_path: Path) -> None:
    desc, data = _busybox_layer(registry)
    half = len(data) // 2
    dest = tmp_path / "partial"
    dest.write_bytes(b"\0" * half)
    progress = Counter()
    client().fetch_blob(parse(f"{registry.address}/busybox"), desc, dest, progress)
    assert progress.total == (len(data) - half) + len(data)
    assert dest.read_bytes() == data
    # An oversized partial is discarded.
    dest.write_bytes(data + b"junk")
    progress = Counter()
    client().fetch_blob(parse(f"{registry.address}/busybox"), desc, dest, progress)
    assert progress.total == len(data) and dest.read_bytes() == data


# --- compression & concurrency --------------------------------------------------------------

@pytest.mark.parametrize(("name", "media_type"), [("layers", LAYER_GZIP), ("layers-zstd", LAYER_ZSTD)])
def test_gzip_and_zstd_layers(registry: RunningRegistry, tmp_path: Path, name: str, media_type: str) -> None:
    if shutil.which("zstd") is None:
        pytest.skip("host tool missing: zstd")
    image = registry.images[name]
    c = client()
    resolved = c.resolve(parse(f"{registry.address}/{name}"))
    assert [l.media_type for l in resolved.layers] == [media_type] * 3
    per_blob: dict[str, int] = {}
    lock = threading.Lock()

    def progress(desc: Descriptor, n: int) -> None:
        with lock:
            per_blob[desc.digest] = per_blob.get(desc.digest, 0) + n

    items = [(d, tmp_path / d.digest[7:]) for d in (resolved.config, *resolved.layers)]
    c.fetch_blobs(resolved.reference, items, progress)
    for (desc, dest), info in zip(items[1:], image.manifest.layers):
        assert sha256_file(dest) == desc.digest and per_blob[desc.digest] == desc.size
        tool = ["zstd", "-d", "-c", "-q"] if media_type == LAYER_ZSTD else ["gzip", "-d", "-c"]
        raw = subprocess.run([*tool, str(dest)], capture_output=True, check=True).stdout
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == info.diff_id


def test_fetch_blobs_raises_first_failure(registry: RunningRegistry, tmp_path: Path) -> None:
    desc, _ = _busybox_layer(registry)
    bogus = Descriptor(desc.media_type, "sha256:" + "0" * 64, 10)
    with pytest.raises(NotFound, match="0000"):
        client().fetch_blobs(parse(f"{registry.address}/busybox"),
                             [(desc, tmp_path / "a"), (bogus, tmp_path / "b")])


# --- mirrors --------------------------------------------------------------------------------

def test_docker_hub_reference_served_by_mirror(registry: RunningRegistry, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    image = registry.images["library/busybox"]
    c = client(mirrors={"docker.io": (registry.url,)})
    with only_loopback(monkeypatch) as dialled:
        resolved = c.resolve(parse("busybox"), "linux/amd64")
        c.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "layer")
    assert resolved.digest == image.digest
    assert str(resolved.reference) == f"docker.io/library/busybox:latest@{image.digest}"
    assert sha256_file(tmp_path / "layer") == resolved.layers[0].digest
    assert dialled and set(dialled) == {"127.0.0.1"}


def test_mirror_miss_falls_back_to_registry(registry: RunningRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    c = client(retries=0, mirrors={"docker.io": (registry.url,)})
    with only_loopback(monkeypatch) as dialled:
        with pytest.raises(TransportError, match="registry-1.docker.io"):
            c.resolve(parse("not-on-the-mirror"))
    # The mirror was asked first, then the real registry (whose dial the guard refused).
    assert dialled[0] == "127.0.0.1" and dialled[-1] == "registry-1.docker.io"
    strict = client(retries=0, mirrors={"docker.io": (registry.url,)}, fall_back_to_registry=False)
    with only_loopback(monkeypatch) as dialled:
        with pytest.raises(NotFound):
            strict.resolve(parse("not-on-the-mirror"))
    assert set(dialled) == {"127.0.0.1"}


def test_dead_mirror_is_skipped(registry: RunningRegistry) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    c = client(retries=0, mirrors={registry.address: (dead,)})
    assert c.endpoints(parse(f"{registry.address}/busybox")) == [dead, registry.url]
    assert c.resolve(parse(f"{registry.address}/busybox")).digest == registry.images["busybox"].digest


def test_endpoint_schemes() -> None:
    c = RegistryClient(RegistryConfig(insecure=frozenset({"reg.internal:5000"})))
    assert c.endpoints(parse("busybox")) == ["https://registry-1.docker.io"]
    assert c.endpoints(parse("reg.internal:5000/x")) == ["http://reg.internal:5000"]
    assert c.endpoints(parse("ghcr.io/x/y")) == ["https://ghcr.io"]
    assert c.endpoints(parse("localhost:5000/x")) == ["http://localhost:5000"]


# --- token auth -----------------------------------------------------------------------------

def test_token_flow_anonymous(token_registry: RunningRegistry, tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    before = len(reg.token_server.requests)
    c = client()
    resolved = c.resolve(parse(f"{reg.address}/busybox"), "linux/amd64")
    assert resolved.digest == reg.images["busybox"].digest
    c.fetch_blob(resolved.reference, resolved.config, tmp_path / "config")
    c.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "layer")
    assert sha256_file(tmp_path / "layer") == resolved.layers[0].digest
    issued = reg.token_server.requests[before:]
    assert len(issued) == 1, issued  # one token, cached for the manifest and both blobs
    assert issued[0]["basic"] is False
    assert issued[0]["query"]["scope"] == ["repository:busybox:pull"]  # type: ignore[index]
    assert issued[0]["query"]["service"] == [reg.token_server.service]  # type: ignore[index]


def test_token_flow_private_needs_credentials(token_registry: RunningRegistry) -> None:
    reg = token_registry
    ref = parse(f"{reg.address}/private/busybox")
    with pytest.raises(AuthError, match="pull access denied for 127.0.0.1:[0-9]+/private/busybox"):
        client().resolve(ref)
    assert reg.username and reg.password
    good = client(auths={reg.address: (reg.username, reg.password)})
    assert good.resolve(ref).digest == reg.images["private/busybox"].digest
    assert reg.token_server.requests[-1]["basic"] is True  # type: ignore[union-attr]
    bad = client(auths={reg.address: (reg.username, "wrong")})
    with pytest.raises(AuthError, match="credentials rejected"):
        bad.resolve(ref)


def test_token_registry_rejects_unauthenticated_blob(token_registry: RunningRegistry, tmp_path: Path) -> None:
    # The registry really verifies tokens: a forged one is refused.
    import urllib.error
    import urllib.request
    layer = token_registry.images["busybox"].manifest.layers[0]
    req = urllib.request.Request(f"{token_registry.url}/v2/busybox/blobs/{layer.digest}",
                                 headers={"Authorization": "Bearer not.a.token"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 401


def test_token_multiarch(token_registry: RunningRegistry) -> None:
    resolved = client().resolve(parse(f"{token_registry.address}/multiarch"), "linux/arm64")
    assert resolved.digest == token_registry.images["multiarch"].for_platform("linux/arm64/v8").digest


# --- faults injected by a real proxy --------------------------------------------------------

class FaultProxy:
    """An HTTP/1.0 reverse proxy on 127.0.0.1 in front of ``upstream``. ``plan`` decides, per
    request, to pass it through, answer 503, cut the body after N bytes, or redirect blob GETs
    to ``storage`` (another loopback server)."""

    def __init__(self, upstream: str, plan: Callable[[int, str], str], storage: str | None = None) -> None:
        self.upstream, self.plan, self.storage = upstream, plan, storage
        self.seen: list[tuple[str, dict[str, str]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                import http.client
                n = len(proxy.seen)
                proxy.seen.append((self.path, dict(self.headers)))
                action = proxy.plan(n, self.path)
                if action == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if action == "redirect" and "/blobs/" in self.path:
                    self.send_response(307)
                    self.send_header("Location", f"{proxy.storage}/storage{self.path}?sig=abc")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                host, port = proxy.upstream.rsplit(":", 1)
                conn = http.client.HTTPConnection(host, int(port), timeout=10)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "date", "server") and not (
                            action == "nodigest" and k.lower() in ("docker-content-digest", "content-length")):
                        self.send_header(k, v)
                self.end_headers()
                if action == "nodigest":
                    body = body.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')
                if action.startswith("cut:"):
                    self.wfile.write(body[: int(action[4:])])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_dropped_connection_is_resumed(registry: RunningRegistry, tmp_path: Path) -> None:
    desc, data = _busybox_layer(registry)
    plan = lambda n, path: "cut:300000" if "/blobs/" in path and n < 2 else "pass"  # noqa: E731
    with FaultProxy(registry.address, plan) as proxy:
        c = client(mirrors={registry.address: (proxy.url,)}, fall_back_to_registry=False)
        progress = Counter()
        c.fetch_blob(parse(f"{registry.address}/busybox"), desc, tmp_path / "layer", progress)
    assert (tmp_path / "layer").read_bytes() == data
    assert progress.total == len(data)  # nothing was downloaded twice
    ranges = [h.get("Range") for path, h in proxy.seen if "/blobs/" in path]
    assert ranges == [None, "bytes=300000-", "bytes=600000-"]


def test_server_errors_are_retried_then_reported(registry: RunningRegistry) -> None:
    with FaultProxy(registry.address, lambda n, path: "503" if n < 2 else "pass") as proxy:
        c = client(retries=2, mirrors={registry.address: (proxy.url,)}, fall_back_to_registry=False)
        assert c.resolve(parse(f"{registry.address}/busybox")).digest == registry.images["busybox"].digest
    assert len(proxy.seen) == 3
    with FaultProxy(registry.address, lambda n, path: "503") as proxy:
        c = client(retries=2, mirrors={registry.address: (proxy.url,)}, fall_back_to_registry=False)
        with pytest.raises(TransportError, match="failed after 3 attempts"):
            c.resolve(parse(f"{registry.address}/busybox"))
    assert len(proxy.seen) == 3


def test_blob_redirect_drops_credentials(token_registry: RunningRegistry, tmp_path: Path) -> None:
    """Registries redirect blobs to storage on another host; the bearer token must not follow."""
    image = token_registry.images["busybox"]
    storage_seen: list[dict[str, str]] = []

    class Storage(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            storage_seen.append(dict(self.headers))
            digest = self.path.split("/blobs/")[1].split("?")[0]
            data = image.blob(digest).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    storage = ThreadingHTTPServer(("127.0.0.1", 0), Storage)
    threading.Thread(target=storage.serve_forever, daemon=True).start()
    try:
        with FaultProxy(token_registry.address, lambda n, p: "redirect",
                        storage=f"http://127.0.0.1:{storage.server_address[1]}") as proxy:
            c = client(mirrors={token_registry.address: (proxy.url,)}, fall_back_to_registry=False)
            resolved = c.resolve(parse(f"{token_registry.address}/busybox"))
            c.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "layer")
    finally:
        storage.shutdown()
        storage.server_close()
    assert sha256_file(tmp_path / "layer") == resolved.layers[0].digest
    blob_requests = [h for path, h in proxy.seen if "/blobs/" in path]
    assert blob_requests and all(h.get("Authorization", "").startswith("Bearer ") for h in blob_requests)
    assert storage_seen and not any("Authorization" in h for h in storage_seen)


def test_platform_helpers() -> None:
    assert Platform.of("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.of(("linux", "x86_64")) == Platform("linux", "amd64", None)
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform("linux", "arm64", "v8").matches(Platform("linux", "arm64", None))
    assert not Platform("linux", "arm", "v7").matches(Platform("linux", "arm", "v6"))
    with pytest.raises(ValueError, match="os/arch"):
        Platform.of("linux")
