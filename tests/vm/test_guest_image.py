"""The guest image recipe, built for real from Debian packages."""

from __future__ import annotations

import json
from pathlib import Path


from guest.build import build, image_dir, load_image
from guest.recipe import Recipe
from vmkit.spec import Arch, BootLayout


def test_recipe_hash_is_stable_and_changes_with_the_recipe() -> None:
    a = Recipe(Arch.X86_64)
    assert a.digest() == Recipe(Arch.X86_64).digest()
    assert a.digest() != Recipe(Arch.AARCH64).digest()
    assert a.digest() != Recipe(Arch.X86_64, packages=a.packages + ("less",)).digest()
    assert image_dir(a).name == f"x86_64-{a.digest()}"


def test_aarch64_image_builds() -> None:
    """The arm64 variant: Debian's arm64 kernel and packages, unpacked without emulation."""
    recipe = Recipe(Arch.AARCH64)
    d = build(recipe)
    meta = json.loads((d / "manifest.json").read_text())
    assert meta["arch"] == "aarch64" and meta["release"] == recipe.release()
    img = load_image(recipe, BootLayout.EROFS)
    # An arm64 Linux Image (uncompressed, or the EFI zboot wrapper): its magic is "ARM\x64" at 0x38.
    head = Path(img.kernel).read_bytes()[:0x40]
    assert head[0x38:0x3C] == b"ARM\x64" or head[:2] == b"MZ"
    assert Path(img.root_disk).stat().st_size > 10 << 20  # type: ignore[arg-type]


def test_host_image_has_what_the_guest_needs(guest_image) -> None:  # type: ignore[no-untyped-def]
    d = Path(guest_image.kernel).parent
    meta = json.loads((d / "manifest.json").read_text())
    assert meta["default_layout"] == "erofs"
    assert {"vmlinuz", "boot.img", "root.erofs", "initrd.img"} <= set(meta["sizes"])
