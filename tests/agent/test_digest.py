"""agent.digest: whichever sha256 it picks gives hashlib's digests."""

from __future__ import annotations

import hashlib
import os

import pytest

from agent import digest


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 1 << 20])
def test_sha256_matches_hashlib(size: int) -> None:
    data = os.urandom(size)
    h = digest.sha256()
    h.update(data[: size // 3])
    h.update(data[size // 3:])
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_every_candidate_agrees_and_one_is_kept() -> None:
    builtin = digest._builtin()
    for factory in filter(None, (hashlib.sha256, builtin)):
        assert factory(b"abc").hexdigest() == hashlib.sha256(b"abc").hexdigest()
    chosen = digest._choose()
    assert chosen in (hashlib.sha256, builtin)
    assert type(digest.sha256()) is type(digest.sha256())


def test_other_algorithms_go_to_hashlib() -> None:
    for algorithm in ("sha384", "sha512"):
        h = digest.new(algorithm)
        h.update(b"x")
        assert h.hexdigest() == hashlib.new(algorithm, b"x").hexdigest()
    assert digest.new("sha256").hexdigest() == hashlib.sha256().hexdigest()
