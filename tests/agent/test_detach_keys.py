"""Detach key sequences (agent/detach_keys.py): Docker's spelling, and a scanner that finds
the sequence across reads and passes everything else on, in order."""

from __future__ import annotations

import random

import pytest

from agent.detach_keys import DEFAULT, DetachKeysError, Scanner, parse


def test_spelling() -> None:
    assert parse(None) == parse("") == parse(DEFAULT) == b"\x10\x11"
    assert parse("ctrl-a,x,ctrl-@,ctrl-_,ctrl-\\") == b"\x01x\x00\x1f\x1c"
    assert parse("q") == b"q"


@pytest.mark.parametrize("spec", ["ctrl-1", "ctrl-", "ab", "ctrl-p,", ",", "ctrl-P", "\t", "é"])
def test_bad_spelling_is_an_error(spec: str) -> None:
    with pytest.raises(DetachKeysError, match="invalid detach keys"):
        parse(spec)


def test_scanner_holds_a_beginning_back_until_it_knows() -> None:
    s = Scanner(b"\x10\x11")
    assert s.feed(b"ls\x10") == (b"ls", False)
    assert s.feed(b"x") == (b"\x10x", False)    # not the sequence after all: passed on, in order
    assert s.feed(b"\x10\x10") == (b"\x10", False)
    assert s.feed(b"\x11tail") == (b"", True)    # what follows the sequence is not passed on
    assert s.feed(b"\x10") == (b"", False)
    assert s.flush() == b"\x10"


def test_scanner_finds_an_overlapping_sequence() -> None:
    s = Scanner(b"aab")
    assert s.feed(b"aaab") == (b"a", True)
    s = Scanner(b"abab")
    assert s.feed(b"ababab") == (b"", True)
    s = Scanner(b"abac")
    assert s.feed(b"ababac") == (b"ab", True)


def test_scanner_against_a_plain_search() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        keys = bytes(rng.choice(b"abc") for _ in range(rng.randint(1, 4)))
        data = bytes(rng.choice(b"abcd") for _ in range(rng.randint(0, 24)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 4))))
        s, out, detached = Scanner(keys), b"", False
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            got, detached = s.feed(data[a:b])
            out += got
            if detached:
                break
        at = data.find(keys)
        if at >= 0:
            assert (out, detached) == (data[:at], True), (keys, data, cuts)
        else:
            assert (out + s.flush(), detached) == (data, False), (keys, data, cuts)
