"""Image references (``busybox``, ``user/app:1``, ``127.0.0.1:5000/x/y@sha256:...``).

Parsing and normalisation follow Docker's ``reference.ParseNormalizedNamed``: a first path
component is a registry host only if it contains ``.`` or ``:``, is ``localhost``, or has an
uppercase letter; otherwise the registry is ``docker.io`` and single-component names get the
``library/`` prefix. A reference without tag or digest gets the tag ``latest``.

Standard library only: this module runs inside the guest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

__all__ = ["DEFAULT_REGISTRY", "DEFAULT_TAG", "Reference", "parse"]

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
#: docker.io is the name users see; the API lives on this host.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_LEGACY_HUB_NAMES = frozenset({"index.docker.io", "registry.hub.docker.com"})
_MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HEX64_RE = re.compile(r"[a-f0-9]{64}")
_DIGEST_HEX_LENGTHS = {"sha256": 64, "sha384": 96, "sha512": 128}


def _invalid(text: str, why: str) -> ValueError:
    return ValueError(f"invalid reference format: {why}: {text!r}")


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed ``algorithm:hex`` digest, else raise ValueError."""
    if not _DIGEST_RE.fullmatch(digest):
        raise _invalid(digest, "bad digest")
    algorithm, _, hexpart = digest.partition(":")
    expected = _DIGEST_HEX_LENGTHS.get(algorithm)
    if expected is not None and (len(hexpart) != expected or hexpart != hexpart.lower()):
        raise _invalid(digest, f"bad {algorithm} digest")
    return digest


@dataclass(frozen=True)
class Reference:
    """A normalised image reference; ``str()`` gives the canonical form."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if not _DOMAIN_RE.fullmatch(self.registry):
            raise _invalid(self.registry, "bad registry")
        if not _REPOSITORY_RE.fullmatch(self.repository):
            why = "repository name must be lowercase" if self.repository.lower() != self.repository \
                else "bad repository name"
            raise _invalid(self.repository, why)
        if len(self.name) > _MAX_NAME_LENGTH:
            raise _invalid(self.name, f"repository name must not be more than {_MAX_NAME_LENGTH} characters")
        if self.tag is not None and not _TAG_RE.fullmatch(self.tag):
            raise _invalid(self.tag, "bad tag")
        if self.digest is not None:
            validate_digest(self.digest)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest, e.g. ``docker.io/library/busybox``."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar_name(self) -> str:
        """The short name Docker shows: ``busybox``, ``user/app``, ``127.0.0.1:5000/x``."""
        if self.registry == DEFAULT_REGISTRY:
            repo = self.repository
            if repo.startswith("library/") and repo.count("/") == 1:
                return repo[len("library/"):]
            return repo
        return self.name

    @property
    def familiar(self) -> str:
        """The short form with tag/digest: ``busybox:latest``, ``127.0.0.1:5000/x:tag``."""
        return self.familiar_name + self._suffix()

    @property
    def api_host(self) -> str:
        """The host the registry API is served on (``docker.io`` -> ``registry-1.docker.io``)."""
        return DOCKER_HUB_API_HOST if self.registry == DEFAULT_REGISTRY else self.registry

    @property
    def pin(self) -> str:
        """What to ask the registry for: the digest if any, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_tag(self, tag: str) -> Reference:
        return replace(self, tag=tag, digest=None)

    def with_digest(self, digest: str) -> Reference:
        """Keep the tag (for display) and pin the content by ``digest``."""
        return replace(self, digest=digest)

    def _suffix(self) -> str:
        out = ""
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def __str__(self) -> str:
        return self.name + self._suffix()


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if not sep or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, remainder = DEFAULT_REGISTRY, name
    else:
        domain, remainder = first, rest
    if domain in _LEGACY_HUB_NAMES:
        domain = DEFAULT_REGISTRY
    if domain == DEFAULT_REGISTRY and "/" not in remainder:
        remainder = f"library/{remainder}"
    return domain, remainder


def parse(text: str) -> Reference:
    """Parse and normalise ``text`` like ``docker pull`` does; raises ValueError on bad input."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise _invalid(str(text), "empty or padded reference")
    if _HEX64_RE.fullmatch(text):
        raise _invalid(text, "cannot specify 64-byte hexadecimal strings")
    rest, at, digest = text.partition("@")
    if at and not digest:
        raise _invalid(text, "empty digest")
    tag: str | None = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not tag:
            raise _invalid(text, "empty tag")
    if not rest:
        raise _invalid(text, "empty repository name")
    registry, repository = _split_domain(rest)
    if tag is None and not digest:
        tag = DEFAULT_TAG
    try:
        return Reference(registry, repository, tag, digest or None)
    except ValueError as exc:
        # Re-raise with the whole user input, which is what the user can act on.
        why = str(exc).split(": ", 2)[1] if str(exc).count(": ") >= 2 else "bad reference"
        raise _invalid(text, why) from None
