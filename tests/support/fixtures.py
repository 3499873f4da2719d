"""Registry fixtures: real registries on 127.0.0.1 serving images built here from Debian packages."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.images import BuiltImage, build_all, push_all
from tests.support.registry import (
    REGISTRY_BIN, RunningRegistry, missing_tools, push_layout, run_registry, run_token_registry,
)

REQUIRED_TOOLS = (REGISTRY_BIN, "skopeo", "zstd", "/bin/busybox", "/usr/sbin/nginx", "ldd", "/usr/bin/git")


def _require_tools() -> None:
    missing = missing_tools(*REQUIRED_TOOLS)
    if missing:
        pytest.skip(f"host tools missing: {', '.join(missing)} "
                    "(apt-get install docker-registry skopeo zstd busybox-static nginx-light git)")


@pytest.fixture(scope="session")
def test_images() -> dict[str, BuiltImage]:
    """Every test image as a cached OCI layout: key -> BuiltImage (see tests/support/images.py)."""
    _require_tools()
    return build_all()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, test_images: dict[str, BuiltImage]) -> Iterator[RunningRegistry]:
    """An anonymous docker-registry on 127.0.0.1 with every test image pushed (``registry.images``:
    repository name -> BuiltImage; ``registry.address`` is ``127.0.0.1:PORT``)."""
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        push_all(reg, test_images)
        yield reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory,
                   test_images: dict[str, BuiltImage]) -> Iterator[RunningRegistry]:
    """A registry behind a Docker-Hub-style token server. ``busybox`` and ``multiarch`` are
    pullable anonymously; ``private/busybox`` needs ``registry.username`` / ``registry.password``."""
    with run_token_registry(tmp_path_factory.mktemp("token-registry")) as reg:
        for key, name in (("busybox", "busybox"), ("busybox", "private/busybox"), ("multiarch", "multiarch")):
            push_layout(reg, test_images[key].layout, "latest", name)
            reg.images[name] = test_images[key]
        yield reg
