"""Fixtures for the agent's image side. The real registries on 127.0.0.1 serving images built
here are shared with the VM tests, so they live in the root conftest (see
tests/support/fixtures.py); an empty store in a test's own folder is here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()
