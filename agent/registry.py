"""A Docker Registry HTTP API v2 / OCI distribution client (pull side only).

- endpoints: configured mirrors first, then the registry itself (``https``, or plain ``http`` for
  registries listed as insecure and for loopback addresses);
- auth: ``Bearer`` token flow (anonymous or with Basic credentials at the token endpoint, tokens
  cached per endpoint and scope) and plain ``Basic``;
- ``resolve`` fetches a manifest, follows an index / manifest list to the requested platform and
  verifies every digest it is given;
- ``fetch_blob`` streams a blob to disk while hashing, resumes partial files with ``Range``,
  follows redirects (dropping credentials when the host changes), retries transient failures
  with bounded backoff and removes the file on a size or digest mismatch.

Standard library only: this module runs inside the guest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import platform as _platform
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from . import digest as digest_impl
from . import workers as worker_pool
from .reference import Reference, validate_digest

log = logging.getLogger(__name__)
_T = TypeVar("_T")

__all__ = [
    "AuthError", "BlobStream", "Descriptor", "DigestMismatch", "ManifestError", "NotFound", "Platform",
    "RegistryClient", "RegistryConfig", "RegistryError", "Resolved", "TransportError",
    "MEDIA_TYPES", "MANIFEST_ACCEPT",
]

# --- media types ------------------------------------------------------------------------------

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")
MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MEDIA_TYPES = MANIFEST_TYPES | INDEX_TYPES
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))

_MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_CHUNK = 1024 * 1024
_MAX_REDIRECTS = 10


# --- errors -----------------------------------------------------------------------------------

class RegistryError(Exception):
    """Root of every error this module raises; the message is one line for the user."""


class AuthError(RegistryError):
    """The registry (or its token service) refused our credentials or anonymous access."""


class NotFound(RegistryError):
    """The repository, tag, manifest or blob does not exist."""


class DigestMismatch(RegistryError):
    """Content does not match the digest or size it was asked for."""


class ManifestError(RegistryError):
    """A manifest that is malformed, unsupported, or has no entry for the wanted platform."""


class TransportError(RegistryError):
    """Network failures or server errors that persisted through every retry."""


# --- data -------------------------------------------------------------------------------------

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}
_DEFAULT_VARIANTS = {"arm64": "v8"}


@dataclass(frozen=True)
class Platform:
    """An OCI platform; ``variant`` None means "any" when matching."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def of(cls, value: Platform | tuple[str, ...] | str | None) -> Platform:
        """Accept ``Platform``, ``("linux", "arm64", "v8")``, ``"linux/arm64/v8"`` or None (this host)."""
        if value is None:
            return cls.host()
        if isinstance(value, Platform):
            return value
        parts = tuple(value.split("/")) if isinstance(value, str) else tuple(value)
        if not 2 <= len(parts) <= 3 or not all(parts[:2]):
            raise ValueError(f"invalid platform {value!r}: expected os/arch[/variant]")
        arch = _ARCH_ALIASES.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 and parts[2] else None
        return cls(parts[0], arch, variant)

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine().lower()
        return cls("linux", _ARCH_ALIASES.get(machine, machine), None)

    def matches(self, other: Platform) -> bool:
        """True if ``other`` (an index entry's platform) satisfies this wanted platform."""
        if (self.os, self.architecture) != (other.os, _ARCH_ALIASES.get(other.architecture, other.architecture)):
            return False
        if self.variant is None:
            return True
        default = _DEFAULT_VARIANTS.get(self.architecture)
        return (other.variant or default) == (self.variant or default)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestError(f"malformed {what}: not an object")
        digest, size, media_type = obj.get("digest"), obj.get("size"), obj.get("mediaType", "")
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"malformed {what}: needs a digest and a non-negative size")
        try:
            validate_digest(digest)
        except ValueError as exc:
            raise ManifestError(f"malformed {what}: {exc}") from None
        if not isinstance(media_type, str):
            raise ManifestError(f"malformed {what}: bad mediaType")
        plat = obj.get("platform")
        platform = None
        if isinstance(plat, dict):
            platform = Platform(str(plat.get("os", "")), str(plat.get("architecture", "")),
                                str(plat["variant"]) if plat.get("variant") else None)
        annotations = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else {}
        urls = tuple(u for u in obj.get("urls") or () if isinstance(u, str))
        return cls(media_type, digest, size, platform, urls, dict(annotations or {}))


@dataclass(frozen=True)
class Resolved:
    """A manifest resolved for one platform."""

    reference: Reference          # the input reference, pinned to ``digest``
    digest: str                   # digest of ``manifest`` (the platform manifest)
    media_type: str
    manifest: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    index_digest: str | None = None   # digest of the index / list we followed, if any
    platform: Platform | None = None  # the index entry's platform, if any

    @property
    def total_size(self) -> int:
        return self.config.size + sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class RegistryConfig:
    """How to reach registries. Keys are registry names as in references (``docker.io``,
    ``127.0.0.1:5000``); ``auths`` may also be keyed by a mirror's ``host:port``."""

    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    insecure: frozenset[str] = frozenset()
    auths: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 8.0
    fall_back_to_registry: bool = True
    user_agent: str = "pydesk-agent/0.1"


# --- helpers ----------------------------------------------------------------------------------

def _is_loopback(hostport: str) -> bool:
    host = urllib.parse.urlsplit(f"//{hostport}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hasher(digest: str) -> hashlib._Hash:
    algorithm = digest.partition(":")[0]
    if algorithm not in ("sha256", "sha384", "sha512"):
        raise DigestMismatch(f"unsupported digest algorithm {algorithm!r} in {digest}")
    return digest_impl.new(algorithm)


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _error_detail(body: bytes) -> str:
    """The first message of a registry JSON error body, if any."""
    try:
        errors = json.loads(body)["errors"]
        first = errors[0]
        return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return body[:200].decode("utf-8", "replace").strip().replace("\n", " ")


class _Retryable(Exception):
    """Internal: a transient failure worth retrying on the same endpoint."""


class _Response:
    """An open HTTP response plus its connection (closed together)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse, url: str) -> None:
        self.conn, self.resp, self.url = conn, resp, url

    @property
    def status(self) -> int:
        return self.resp.status

    def header(self, name: str) -> str | None:
        return self.resp.getheader(name)

    def read(self, limit: int | None = None) -> bytes:
        return self.resp.read() if limit is None else self.resp.read(limit)

    def close(self) -> None:
        try:
            self.resp.close()
        finally:
            self.conn.close()

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the client -------------------------------------------------------------------------------

class RegistryClient:
    """Pulls manifests and blobs. Thread-safe; share one per pull (or per process)."""

    def __init__(self, config: RegistryConfig | None = None) -> None:
        self.config = config or RegistryConfig()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic_hosts: set[str] = set()
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context()

    # endpoints -----------------------------------------------------------------------------

    def endpoints(self, ref: Reference) -> list[str]:
        """Base URLs to try for ``ref``, in order: mirrors, then the registry itself."""
        out = [m.rstrip("/") for m in self.config.mirrors.get(ref.registry, ())]
        if self.config.fall_back_to_registry or not out:
            host = ref.api_host
            plain = ref.registry in self.config.insecure or host in self.config.insecure or _is_loopback(host)
            out.append(f"{'http' if plain else 'https'}://{host}")
        return out

    # low-level HTTP ------------------------------------------------------------------------

    def _open(self, method: str, url: str, headers: Mapping[str, str]) -> _Response:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryError(f"unsupported URL {url!r}")
        timeout = self.config.connect_timeout
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.config.read_timeout)
            conn.request(method, path, headers={"User-Agent": self.config.user_agent, **headers})
            resp = conn.getresponse()
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise RegistryError(f"TLS certificate of {parts.netloc} not trusted: {exc.verify_message}") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _Retryable(f"{parts.netloc}: {exc or type(exc).__name__}") from None
        return _Response(conn, resp, url)

    def _open_following(self, method: str, url: str, headers: dict[str, str]) -> _Response:
        """Open ``url`` following redirects; credentials are dropped when the host changes."""
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(_MAX_REDIRECTS):
            resp = self._open(method, url, headers)
            if resp.status not in (301, 302, 303, 307, 308):
                return resp
            location = resp.header("Location")
            resp.close()
            if not location:
                raise RegistryError(f"redirect without Location from {url}")
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).netloc != origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            log.debug("redirected to %s", url)
        raise RegistryError(f"too many redirects fetching {url}")

    # auth ----------------------------------------------------------------------------------

    def _credentials(self, ref: Reference, base: str) -> tuple[str, str] | None:
        netloc = urllib.parse.urlsplit(base).netloc
        auths = self.config.auths
        if base.rstrip("/") in (m.rstrip("/") for m in self.config.mirrors.get(ref.registry, ())):
            return auths.get(netloc)
        return auths.get(netloc) or auths.get(ref.registry) or auths.get(ref.api_host)

    def _auth_header(self, ref: Reference, base: str, scope: str) -> dict[str, str]:
        netloc = urllib.parse.urlsplit(base).netloc
        with self._lock:
            token = self._tokens.get((netloc, scope))
            basic = netloc in self._basic_hosts
        if token and token[1] > time.monotonic():
            return {"Authorization": f"Bearer {token[0]}"}
        creds = self._credentials(ref, base)
        if basic and creds:
            return {"Authorization": "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()}
        return {}

    def _authenticate(self, ref: Reference, base: str, scope: str, challenge: str) -> None:
        """Answer a 401 challenge: fetch and cache a token, or switch to Basic credentials."""
        netloc = urllib.parse.urlsplit(base).netloc
        scheme, params = parse_challenge(challenge)
        creds = self._credentials(ref, base)
        if scheme == "basic":
            if not creds:
                raise AuthError(f"{ref.familiar_name}: {netloc} requires a username and password")
            with self._lock:
                if netloc in self._basic_hosts:
                    raise AuthError(f"{ref.familiar_name}: {netloc} rejected the username or password")
                self._basic_hosts.add(netloc)
            return
        if scheme != "bearer" or not params.get("realm"):
            raise AuthError(f"{ref.familiar_name}: {netloc} asked for unsupported authentication {challenge!r}")
        query = [("scope", scope)]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if creds:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        body = self._retrying(lambda: self._token_request(url, headers, ref))
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            expires_in = int(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{ref.familiar_name}: token service {realm} returned no token")
        with self._lock:
            # Renew 10% early so a token never expires between use and arrival.
            self._tokens[(netloc, scope)] = (token, time.monotonic() + max(expires_in, 10) * 0.9)
        log.debug("token for %s %s from %s", netloc, scope, realm)

    def _token_request(self, url: str, headers: dict[str, str], ref: Reference) -> bytes:
        with self._open_following("GET", url, headers) as resp:
            body = resp.read(1024 * 1024)
            if resp.status in (401, 403):
                who = "credentials rejected" if "Authorization" in headers else "anonymous access denied"
                raise AuthError(f"{ref.familiar_name}: token service {urllib.parse.urlsplit(url).netloc}: "
                                f"{who} ({resp.status} {_error_detail(body)})")
            if resp.status >= 500 or resp.status == 429:
                raise _Retryable(f"token service answered {resp.status}")
            if resp.status != 200:
                raise AuthError(f"{ref.familiar_name}: token service answered {resp.status}: {_error_detail(body)}")
            return body

    def login(self, ref: Reference) -> None:
        """Check the configured credentials for ``ref.registry`` the way `docker login` does:
        ``GET /v2/``, answering a Basic or Bearer challenge (a token request without a scope).
        Raises AuthError if the registry refuses them, RegistryError if it cannot be reached."""
        base = self.endpoints(ref)[-1]
        creds = self._credentials(ref, base)
        url = base + "/v2/"
        with self._retrying(lambda: self._open_following("GET", url, {}), f"GET {url}") as resp:
            status, challenge = resp.status, resp.header("WWW-Authenticate") or ""
        if status == 200:
            return
        if status != 401 or not challenge:
            raise RegistryError(f"login attempt to {url} failed with status: {status}")
        if not creds:
            raise AuthError(f"login attempt to {url} failed: no username and password given")
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            with self._retrying(lambda: self._open_following("GET", url, {"Authorization": basic}), url) as resp:
                if resp.status != 200:
                    raise AuthError(f"login attempt to {url} failed with status: {resp.status} "
                                    f"({_error_detail(resp.read(64 * 1024))})")
            return
        if scheme != "bearer" or not params.get("realm"):
            raise AuthError(f"login attempt to {url}: unsupported authentication {challenge!r}")
        query = [(k, v) for k, v in (("service", params.get("service")), ("account", creds[0])) if v]
        realm = params["realm"]
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        body = self._retrying(lambda: self._token_request(token_url, {"Authorization": basic}, ref), token_url)
        try:
            ok = bool(json.loads(body).get("token") or json.loads(body).get("access_token"))
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise AuthError(f"login attempt to {url}: the token service {realm} returned no token")

    # requests with retries, auth and endpoint fallback --------------------------------------

    def _retrying(self, attempt: Callable[[], _T], what: str = "") -> _T:
        delay = self.config.backoff
        for n in range(self.config.retries + 1):
            try:
                return attempt()
            except _Retryable as exc:
                if n == self.config.retries:
                    raise TransportError(f"{what or 'request'} failed after {n + 1} attempts: {exc}") from None
                log.info("retrying %s in %.1fs: %s", what or "request", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, self.config.max_backoff)
        raise AssertionError("unreachable")

    def _request(self, ref: Reference, base: str, path: str, headers: Mapping[str, str]) -> _Response:
        """GET ``base + path`` with auth (one challenge round) and retries; returns any
        non-401/5xx response for the caller to interpret."""
        scope = f"repository:{ref.repository}:pull"
        url = base + path

        def attempt() -> _Response:
            for _ in range(2):
                resp = self._open_following("GET", url, {**headers, **self._auth_header(ref, base, scope)})
                if resp.status == 401:
                    challenge = resp.header("WWW-Authenticate") or ""
                    body = resp.read(64 * 1024)
                    resp.close()
                    if not challenge:
                        raise AuthError(f"{ref.familiar_name}: unauthorized ({_error_detail(body)})")
                    if self._auth_header(ref, base, scope):
                        # We already sent credentials and the registry still refused them.
                        raise AuthError(f"pull access denied for {ref.familiar_name}, repository does not "
                                        f"exist or may require authorization ({_error_detail(body)})")
                    self._authenticate(ref, base, scope, challenge)
                    continue
                if resp.status >= 500 or resp.status == 429:
                    detail = _error_detail(resp.read(64 * 1024))
                    resp.close()
                    raise _Retryable(f"{urllib.parse.urlsplit(url).netloc} answered {resp.status}: {detail}")
                return resp
            raise AuthError(f"pull access denied for {ref.familiar_name}: {base} keeps asking for authentication")

        return self._retrying(attempt, f"GET {url}")

    def _get(self, ref: Reference, path: str, headers: Mapping[str, str], what: str,
             ok: tuple[int, ...] = (200,)) -> _Response:
        """Try each endpoint in turn; returns a response whose status is in ``ok``.
        Mirrors that fail (unreachable, 404, auth, ...) are skipped."""
        endpoints = self.endpoints(ref)
        last: RegistryError | None = None
        for i, base in enumerate(endpoints):
            is_last = i == len(endpoints) - 1
            try:
                resp = self._request(ref, base, path, headers)
            except (TransportError, AuthError) as exc:
                if is_last:
                    raise
                log.warning("mirror %s failed for %s, trying the next endpoint: %s", base, what, exc)
                last = exc
                continue
            if resp.status in ok:
                return resp
            body = resp.read(64 * 1024)
            resp.close()
            if resp.status == 404:
                err: RegistryError = NotFound(f"{what} not found: {ref.familiar} ({_error_detail(body)})")
            elif resp.status == 403:
                err = AuthError(f"access to {ref.familiar} denied by {base} ({_error_detail(body)})")
            else:
                err = RegistryError(f"{what} for {ref.familiar}: {base} answered {resp.status} "
                                    f"({_error_detail(body)})")
            if is_last:
                raise err
            log.warning("mirror %s: %s; trying the next endpoint", base, err)
            last = err
        raise last or RegistryError(f"no endpoint for {ref.registry}")

    # manifests -----------------------------------------------------------------------------

    def fetch_manifest(self, ref: Reference, pin: str | None = None,
                       expect: Descriptor | None = None) -> tuple[bytes, str, str]:
        """GET one manifest (by tag or digest); returns (body, media type, digest), all verified."""
        pin = pin or ref.pin
        path = f"/v2/{ref.repository}/manifests/{pin}"
        with self._get(ref, path, {"Accept": MANIFEST_ACCEPT}, f"manifest {pin}") as resp:
            length = resp.header("Content-Length")
            if length and length.isdigit() and int(length) > _MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest for {ref.familiar} is too large ({length} bytes)")
            body = resp.read(_MAX_MANIFEST_BYTES + 1)
            if len(body) > _MAX_MANIFEST_BYTES:
                raise ManifestError(f"manifest for {ref.familiar} is too large")
            content_type = (resp.header("Content-Type") or "").split(";")[0].strip()
            header_digest = resp.header("Docker-Content-Digest")
        wanted = [d for d in (pin if ":" in pin else None, expect.digest if expect else None) if d]
        algorithm = wanted[0].partition(":")[0] if wanted else "sha256"
        hasher = _hasher(f"{algorithm}:")
        hasher.update(body)
        digest = f"{algorithm}:{hasher.hexdigest()}"
        for want in wanted:
            if want != digest:
                raise DigestMismatch(f"manifest for {ref.familiar_name}@{want} has digest {digest}")
        if header_digest and header_digest.startswith(f"{algorithm}:") and header_digest != digest:
            raise DigestMismatch(f"manifest for {ref.familiar} has digest {digest}, "
                                 f"registry announced {header_digest}")
        if expect is not None and expect.size != len(body):
            raise DigestMismatch(f"manifest {digest} is {len(body)} bytes, expected {expect.size}")
        return body, content_type, digest

    def resolve(self, ref: Reference, platform: Platform | tuple[str, ...] | str | None = None) -> Resolved:
        """Resolve ``ref`` to the image manifest for ``platform`` (default: this machine)."""
        want = Platform.of(platform)
        body, content_type, digest = self.fetch_manifest(ref)
        doc, media_type = _load_manifest(body, content_type, ref)
        index_digest: str | None = None
        chosen: Platform | None = None
        if media_type in INDEX_TYPES:
            index_digest = digest
            entry = _select_platform(doc, want, ref)
            chosen = entry.platform
            body, content_type, digest = self.fetch_manifest(ref, entry.digest, expect=entry)
            doc, media_type = _load_manifest(body, content_type or entry.media_type, ref)
            if media_type in INDEX_TYPES:
                raise ManifestError(f"{ref.familiar}: nested image indexes are not supported")
        config = Descriptor.from_json(doc.get("config"), "config descriptor")
        layers_json = doc.get("layers")
        if not isinstance(layers_json, list):
            raise ManifestError(f"{ref.familiar}: manifest has no layers list")
        layers = tuple(Descriptor.from_json(layer, f"layer {i}") for i, layer in enumerate(layers_json))
        pinned = ref.with_digest(index_digest or digest)
        log.info("resolved %s to %s (%d layers, %s)", ref.familiar, digest, len(layers), chosen or media_type)
        return Resolved(pinned, digest, media_type, body, config, layers, index_digest, chosen)

    # blobs ---------------------------------------------------------------------------------

    def fetch_blob(self, ref: Reference, descriptor: Descriptor, dest: Path,
                   progress: Callable[[int], None] | None = None) -> None:
        """Download ``descriptor`` to ``dest``, resuming a partial file already there.

        ``progress`` is called with the number of bytes just written (a delta), so the sum of
        its calls is the number of bytes actually transferred. On a size or digest mismatch
        the file is deleted and DigestMismatch is raised."""
        dest = Path(dest)
        hasher = _hasher(descriptor.digest)
        restarted = False
        delay = self.config.backoff
        failures = 0
        while True:
            offset, hasher = _prepare_partial(dest, descriptor)
            if offset == descriptor.size:
                if f"{descriptor.digest.partition(':')[0]}:{hasher.hexdigest()}" == descriptor.digest:
                    return
                if restarted:
                    dest.unlink(missing_ok=True)
                    raise DigestMismatch(f"blob {descriptor.digest} of {ref.familiar_name}: content has "
                                         f"digest {descriptor.digest.partition(':')[0]}:{hasher.hexdigest()}")
                # A stale or corrupt partial: start over once rather than fail forever.
                log.warning("partial %s does not match %s; downloading again", dest, descriptor.digest)
                dest.unlink(missing_ok=True)
                restarted = True
                continue
            try:
                self._download(ref, descriptor, dest, offset, hasher, progress)
                return
            except _Retryable as exc:
                failures += 1
                if failures > self.config.retries:
                    raise TransportError(f"blob {descriptor.digest} of {ref.familiar_name}: "
                                         f"failed after {failures} attempts: {exc}") from None
                log.info("blob %s interrupted (%s); resuming in %.1fs", descriptor.digest[:19], exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.config.max_backoff)
            except DigestMismatch:
                dest.unlink(missing_ok=True)
                if offset > 0 and not restarted:
                    restarted = True
                    continue
                raise

    def _download(self, ref: Reference, descriptor: Descriptor, dest: Path, offset: int,
                  hasher: hashlib._Hash, progress: Callable[[int], None] | None) -> None:
        headers = {"Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        path = f"/v2/{ref.repository}/blobs/{descriptor.digest}"
        resp = self._get(ref, path, headers, f"blob {descriptor.digest}", ok=(200, 206, 416))
        with resp:
            if resp.status == 416:
                log.info("registry refused to resume %s; starting over", descriptor.digest)
                dest.unlink(missing_ok=True)
                raise _Retryable("range not satisfiable")
            if offset and resp.status == 200:
                log.info("registry ignored Range for %s; downloading from the start", descriptor.digest)
                offset, hasher = 0, _hasher(descriptor.digest)
                mode = "wb"
            elif offset or resp.status == 206:
                start = _content_range_start(resp.header("Content-Range"))
                if start != offset:
                    dest.unlink(missing_ok=True)
                    raise _Retryable(f"server resumed at {start}, not {offset}")
                mode = "ab"
            else:
                mode = "wb"
            received = offset
            length = resp.header("Content-Length")
            # Where the server says the body ends; a clean EOF there with too few bytes is a size
            # mismatch, anything shorter is a dropped connection (http.client does not raise).
            announced = offset + int(length) if length and length.isdigit() else None
            with open(dest, mode) as out:
                while True:
                    try:
                        chunk = resp.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        out.flush()
                        raise _Retryable(f"connection lost after {received} bytes: {exc or type(exc).__name__}") \
                            from None
                    if not chunk:
                        break
                    received += len(chunk)
                    if received > descriptor.size:
                        raise DigestMismatch(f"blob {descriptor.digest} of {ref.familiar_name} is larger than "
                                             f"its declared size {descriptor.size}")
                    out.write(chunk)
                    hasher.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
        if received < descriptor.size:
            if announced is not None and received >= announced:
                dest.unlink(missing_ok=True)
                raise DigestMismatch(f"blob {descriptor.digest} of {ref.familiar_name} is {received} bytes, "
                                     f"expected {descriptor.size}")
            raise _Retryable(f"connection closed after {received} of {descriptor.size} bytes")
        actual = f"{descriptor.digest.partition(':')[0]}:{hasher.hexdigest()}"
        if received != descriptor.size or actual != descriptor.digest:
            raise DigestMismatch(f"blob {descriptor.digest} of {ref.familiar_name}: content has digest {actual}")

    @contextlib.contextmanager
    def open_blob(self, ref: Reference, descriptor: Descriptor) -> Iterator[BlobStream]:
        """GET ``descriptor`` and read its body as it arrives (to unpack a layer while it
        downloads). The stream checks the size; the digest is for the reader to verify, over
        exactly the bytes it read. Errors opening are retried and go through the endpoints as
        for ``fetch_blob``; a failure mid-body raises TransportError with no retry (the caller
        resumes with ``fetch_blob`` from what it has written)."""
        path = f"/v2/{ref.repository}/blobs/{descriptor.digest}"
        resp = self._get(ref, path, {"Accept": "*/*"}, f"blob {descriptor.digest}")
        try:
            yield BlobStream(resp, descriptor, ref)
        finally:
            resp.close()

    def fetch_blobs(self, ref: Reference, items: Iterable[tuple[Descriptor, Path]],
                    progress: Callable[[Descriptor, int], None] | None = None, max_workers: int = 3) -> None:
        """Download several blobs concurrently (at most ``max_workers`` at a time). The first
        failure cancels the blobs not yet started and is raised after the running ones end."""
        def one(item: tuple[Descriptor, Path]) -> None:
            desc, dest = item
            self.fetch_blob(ref, desc, dest, (lambda n: progress(desc, n)) if progress else None)

        run_all(one, list(items), max(1, min(max_workers, 3)), "blob")


def run_all(fn: Callable[[_T], None], items: list[_T], workers: int = 3, name: str = "blob") -> None:
    """``fn`` on every item, ``workers`` at a time, on the engine's worker threads (a thread
    start costs ~6 ms of guest CPU under TCG; a pool's threads are usually waiting). The first
    failure cancels the items not yet started and is raised once the running ones end."""
    if not items:
        return
    todo = iter(items)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def drain() -> None:
        while True:
            with lock:
                if failures:
                    return
                item = next(todo, _END)
            if item is _END:
                return
            try:
                fn(item)  # type: ignore[arg-type]
            except BaseException as exc:  # raised to run_all's caller, not lost in the thread
                with lock:
                    failures.append(exc)
                return

    jobs = [worker_pool.spawn(drain, name=f"{name}_{i}") for i in range(max(1, min(workers, len(items))))]
    for job in jobs:
        job.join()
    if failures:
        raise failures[0]


_END = object()


class BlobStream:
    """The body of one blob GET; ``read`` never returns more than the descriptor's size, and
    an early end is an error rather than a short read."""

    def __init__(self, resp: _Response, descriptor: Descriptor, ref: Reference) -> None:
        self._resp, self.descriptor, self._ref = resp, descriptor, ref
        self.received = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        d = self.descriptor
        try:
            chunk = self._resp.read(min(size, _CHUNK))
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(f"blob {d.digest} of {self._ref.familiar_name}: connection lost after "
                                 f"{self.received} bytes: {exc or type(exc).__name__}") from None
        self.received += len(chunk)
        if self.received > d.size:
            raise DigestMismatch(f"blob {d.digest} of {self._ref.familiar_name} is larger than its "
                                 f"declared size {d.size}")
        if not chunk and size and self.received < d.size:
            raise TransportError(f"blob {d.digest} of {self._ref.familiar_name}: connection closed after "
                                 f"{self.received} of {d.size} bytes")
        return chunk


# --- module helpers ---------------------------------------------------------------------------

def _content_range_start(header: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", header or "")
    return int(m.group(1)) if m else None


def _prepare_partial(dest: Path, descriptor: Descriptor) -> tuple[int, hashlib._Hash]:
    """Hash what is already in ``dest``; returns (bytes present, hasher). Oversized partials
    are removed."""
    hasher = _hasher(descriptor.digest)
    try:
        size = dest.stat().st_size
    except FileNotFoundError:
        if descriptor.size == 0:
            dest.touch()
        return 0, hasher
    if size > descriptor.size:
        dest.unlink()
        return 0, hasher
    with open(dest, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return size, hasher


def _load_manifest(body: bytes, content_type: str, ref: Reference) -> tuple[dict, str]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise ManifestError(f"manifest for {ref.familiar} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest for {ref.familiar} is not a JSON object")
    media_type = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else ""
    if content_type in DOCKER_SCHEMA1 or media_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestError(f"{ref.familiar}: Docker image manifest schema 1 is not supported")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"manifest for {ref.familiar} has unsupported schemaVersion {doc.get('schemaVersion')!r}")
    if media_type not in MEDIA_TYPES:
        media_type = content_type if content_type in MEDIA_TYPES else ""
    if not media_type:
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "layers" in doc else ""
    if not media_type:
        raise ManifestError(f"manifest for {ref.familiar} has unknown media type {content_type!r}")
    return doc, media_type


def _select_platform(index: dict, want: Platform, ref: Reference) -> Descriptor:
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ManifestError(f"image index for {ref.familiar} has no manifests list")
    descriptors = [Descriptor.from_json(e, "index entry") for e in entries]
    usable = [d for d in descriptors if d.platform is not None and d.platform.os != "unknown"
              and d.annotations.get("vnd.docker.reference.type") != "attestation-manifest"]
    matches = [d for d in usable if want.matches(d.platform)]  # type: ignore[arg-type]
    if not matches:
        available = ", ".join(sorted({str(d.platform) for d in usable})) or "none"
        raise ManifestError(f"no matching manifest for {want} in the manifest list entries of "
                            f"{ref.familiar} (available: {available})")
    if want.variant is None and len(matches) > 1:
        # Prefer the default variant (arm64 -> v8 or none) over others (e.g. arm64/v9).
        default = _DEFAULT_VARIANTS.get(want.architecture)
        matches.sort(key=lambda d: (d.platform.variant or default) != default)  # type: ignore[union-attr]
    return matches[0]
