"""An image's users while a removed container is still being deleted in the background.

`rm` answers before the container's tree is unmounted and deleted (Engine.remove). An `rmi`
right after it must neither refuse (the client already saw the container go) nor delete layers
under a rootfs that is still mounted: it waits for that removal to finish."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.containers import Container
from agent.engine import Engine

IMAGE = "sha256:" + "b" * 64


def add_container(engine: Engine, n: int) -> Container:
    cid = f"{n:x}" * 64
    root = engine.root / "containers" / cid[:64]
    root.mkdir()
    (root / "rootfs").mkdir()
    c = Container(root, {
        "Id": cid[:64], "Name": f"/c{n}", "Image": IMAGE, "State": {"Running": False, "Status": "exited"},
        "Config": {}, "HostConfig": {}, "NetworkSettings": {"Networks": {}},
    })
    c.save()
    engine.containers[c.id] = c
    return c


def test_an_image_is_free_once_its_removed_container_is_deleted(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    c = add_container(engine, 1)
    assert engine.image_users(IMAGE) == [c]
    c.cleaned.clear()  # its exit clean-up is still running: the removal must wait for it
    engine.remove(c)
    assert c.id not in engine.containers and c.id in engine.removing
    assert not (tmp_path / "containers" / c.id).exists()  # moved to the trash at once
    finished = threading.Timer(0.5, c.cleaned.set)
    finished.start()
    t0 = time.monotonic()
    assert engine.image_users(IMAGE) == []  # waited for the background removal ...
    assert time.monotonic() - t0 >= 0.4
    assert c.id not in engine.removing and not c.root.exists()  # ... which deleted the tree
    assert list((tmp_path / "trash").iterdir()) == []


def test_a_live_user_is_named_without_waiting(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    c = add_container(engine, 2)
    other = add_container(engine, 3)
    other.cleaned.clear()
    engine.remove(other)
    t0 = time.monotonic()
    other.cleaned.set()
    assert engine.image_users(IMAGE) == [c]
    assert engine.image_users("sha256:" + "c" * 64) == []
    assert time.monotonic() - t0 < 5
