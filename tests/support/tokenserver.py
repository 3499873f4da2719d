"""A Docker-Hub-style token service for tests: issues RS256 JWTs the real registry verifies.

The registry is configured with ``auth: token: {realm, service, issuer, rootcertbundle}``; the
token carries the signing certificate in its ``x5c`` header and the registry checks it against
``rootcertbundle`` (a self-signed certificate generated here).

Policy: repositories under ``private/`` need the configured username/password; everything else
can be pulled anonymously; ``push`` needs the credentials. A wrong password at the endpoint
gives 401 (like auth.docker.io).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

SERVICE = "pydesk-test-registry"
ISSUER = "pydesk-test-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """A running token server; ``realm`` is the URL to put in the registry config."""

    port: int
    cert_path: Path
    username: str | None
    password: str | None
    requests: list[dict[str, object]] = field(default_factory=list)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    service = SERVICE
    issuer = ISSUER


class _Signer:
    def __init__(self, workdir: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pydesk test token signer")])
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = workdir / "token-signer.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()

    def token(self, subject: str, access: list[dict[str, object]], ttl: int = 300) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + ttl, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _grant(scopes: list[str], authenticated: bool) -> list[dict[str, object]]:
    access = []
    for scope in scopes:
        for one in scope.split(" "):
            parts = one.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name, actions = ":".join(parts[1:-1]), parts[-1].split(",")
            allowed = [a for a in actions if a in ("pull", "push", "*") and
                       (authenticated or (a == "pull" and not name.startswith("private/")))]
            if allowed:
                access.append({"type": "repository", "name": name, "actions": allowed})
    return access


@contextmanager
def run_token_server(workdir: Path, username: str | None = None,
                     password: str | None = None) -> Iterator[TokenServer]:
    """Serve ``/token`` on 127.0.0.1 (free port) until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    signer = _Signer(workdir)
    state = TokenServer(0, signer.cert_path, username, password)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: dict[str, object], extra: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            user: str | None = None
            header = self.headers.get("Authorization", "")
            record = {"path": url.path, "query": query, "basic": header.startswith("Basic ")}
            state.requests.append(record)
            if url.path != "/token":
                self._reply(404, {"details": "not found"})
                return
            if header.startswith("Basic "):
                try:
                    user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                except ValueError:
                    user, pw = None, None
                if state.username is None or (user, pw) != (state.username, state.password):
                    record["result"] = "denied"
                    self._reply(401, {"details": "incorrect username or password"},
                                {"WWW-Authenticate": 'Basic realm="pydesk-test"'})
                    return
            if query.get("service", [SERVICE])[0] != SERVICE:
                self._reply(400, {"details": "unknown service"})
                return
            access = _grant(query.get("scope", []), authenticated=user is not None)
            record["result"] = access
            token = signer.token(user or "", access)
            self._reply(200, {"token": token, "access_token": token, "expires_in": 300,
                              "issued_at": dt.datetime.now(dt.timezone.utc).isoformat()})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="token-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
