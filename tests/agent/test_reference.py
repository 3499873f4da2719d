"""Image reference parsing and normalisation, checked against Docker's rules."""

from __future__ import annotations

import pytest

from agent.reference import Reference, parse

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("user/app:1", "docker.io", "user/app", "1", None),
    ("docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/user/app", "docker.io", "user/app", "latest", None),
    (f"127.0.0.1:5000/x/y@{DIGEST}", "127.0.0.1:5000", "x/y", None, DIGEST),
    (f"busybox:1@{DIGEST}", "docker.io", "library/busybox", "1", DIGEST),
    ("localhost/x", "localhost", "x", "latest", None),
    ("localhost:5000/x:t", "localhost:5000", "x", "t", None),
    ("ghcr.io/org/team/tool:v1.2.3-rc_1", "ghcr.io", "org/team/tool", "v1.2.3-rc_1", None),
    ("quay.io/a__b/c.d-e", "quay.io", "a__b/c.d-e", "latest", None),
    ("myhost:5000/app", "myhost:5000", "app", "latest", None),
    ("Upper/app", "Upper", "app", "latest", None),      # uppercase first component = a host (Docker)
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", None),
])
def test_parse_normalises(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)
    assert parse(str(ref)) == ref  # the canonical form round-trips


@pytest.mark.parametrize(("text", "full", "familiar"), [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("user/app:1", "docker.io/user/app:1", "user/app:1"),
    ("127.0.0.1:5000/x:tag", "127.0.0.1:5000/x:tag", "127.0.0.1:5000/x:tag"),
    (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}", f"busybox@{DIGEST}"),
    ("docker.io/library/a/b", "docker.io/library/a/b:latest", "library/a/b:latest"),
])
def test_str_and_familiar(text: str, full: str, familiar: str) -> None:
    ref = parse(text)
    assert str(ref) == full
    assert ref.familiar == familiar


@pytest.mark.parametrize("text", [
    "", " busybox", "Busybox", "user/App", "busybox:", "busybox:bad tag", "busybox:-bad", "busybox:" + "a" * 129,
    "busybox@sha256:abc", "busybox@sha256:" + "AB" * 32, "busybox@", "bad//name", "name/", "/name", "a" * 64,
    "localhost:5000/UP:tag", "-bad", "bad-/x", "x" * 256,
])
def test_invalid_references(text: str) -> None:
    with pytest.raises(ValueError, match="^invalid reference format: "):
        parse(text)


def test_uppercase_repository_message() -> None:
    with pytest.raises(ValueError, match="repository name must be lowercase"):
        parse("docker.io/User/app")


def test_api_host_and_helpers() -> None:
    ref = parse("busybox")
    assert ref.api_host == "registry-1.docker.io"
    assert parse("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"
    pinned = ref.with_digest(DIGEST)
    assert str(pinned) == f"docker.io/library/busybox:latest@{DIGEST}"
    assert pinned.pin == DIGEST and ref.pin == "latest"
    assert str(pinned.with_tag("1.36")) == "docker.io/library/busybox:1.36"
    assert ref.name == "docker.io/library/busybox" and ref.familiar_name == "busybox"
    with pytest.raises(ValueError, match="invalid reference format"):
        ref.with_tag("no spaces")
    with pytest.raises(ValueError, match="invalid reference format"):
        ref.with_digest("sha256:short")


def test_reference_is_frozen_and_hashable() -> None:
    ref = parse("busybox")
    assert {ref: 1}[Reference("docker.io", "library/busybox", "latest")] == 1
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]
