"""An image's users while a removed container is still being deleted in the background.

`rm` answers before the container's tree is unmounted and deleted (Engine.remove: the
housekeeper does that at a quiet moment). An `rmi` right after it must neither refuse (the
client already saw the container go) nor delete layers under a rootfs that is still mounted:
it has the removal done first, and waits for an exit clean-up that another thread is doing."""

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
    engine.remove(c)
    assert c.id not in engine.containers and c.id in engine.removing
    assert not (tmp_path / "containers" / c.id).exists()  # moved to the trash at once
    assert engine.housekeeper.pending(c.id) == 1  # the tree is deleted at a quiet moment ...
    assert engine.image_users(IMAGE) == []  # ... or at once when an rmi needs the image free
    assert c.id not in engine.removing and not c.root.exists()
    assert list((tmp_path / "trash").iterdir()) == []
    assert engine.housekeeper.pending() == 0


def test_rmi_waits_for_an_exit_clean_up_in_progress(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    c = add_container(engine, 4)
    c.cleaned.clear()  # it exited; another thread is doing its exit clean-up (unmounting its rootfs)
    c.cleanup_lock.acquire()

    def cleaned_up() -> None:
        c.cleaned.set()
        c.cleanup_lock.release()

    engine.remove(c)
    finished = threading.Timer(0.5, cleaned_up)
    finished.start()
    t0 = time.monotonic()
    assert engine.image_users(IMAGE) == []  # waited for that clean-up, then deleted the tree
    assert time.monotonic() - t0 >= 0.4
    assert c.id not in engine.removing and not c.root.exists()


def test_a_live_user_is_named_without_waiting(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    c = add_container(engine, 2)
    other = add_container(engine, 3)
    engine.remove(other)
    t0 = time.monotonic()
    assert engine.image_users(IMAGE) == [c]
    assert engine.image_users("sha256:" + "c" * 64) == []
    assert time.monotonic() - t0 < 5
