"""Build the pydesk guest image from Debian packages.

Output (in the cache, under ``<arch>-<recipe hash>/``):

- ``vmlinuz``          the Debian kernel
- ``initrd.img``       the whole root file system as a zstd initramfs (layout "initramfs")
- ``boot.img`` + ``root.erofs``  a tiny initramfs that mounts a read-only erofs root
  (layout "erofs")
- ``manifest.json``    release, arch, sizes, kernel release

Both layouts come from the same tree; the VM uses the one the benchmark found faster
(docs/benchmarks.md). The build needs root (or unprivileged user namespaces) for
mmdebstrap, plus cpio, zstd, mkfs.erofs and depmod.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from guest.recipe import Recipe
from vmkit.errors import ImageError, ToolNotFound, VMKitError
from vmkit.run import run, which
from vmkit.spec import Arch, BootLayout, GuestImage

log = logging.getLogger(__name__)

FILES = Path(__file__).resolve().parent / "files"
AGENT = Path(__file__).resolve().parent.parent / "agent"
EPOCH = 1700000000  # fixed timestamps make the packed images reproducible

BOOT_INIT = """#!/bin/busybox sh
# pydesk boot initramfs: load the few modules needed to reach the erofs root, then switch.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.order); do /bin/busybox insmod "/$m"; done
root=
for _ in $(/bin/busybox seq 50); do
  for b in /sys/block/vd*; do
    [ "$(/bin/busybox cat "$b/serial" 2>/dev/null)" = pydesk-root ] && root=/dev/${b##*/}
  done
  [ -n "$root" ] && break
  /bin/busybox usleep 20000
done
/bin/busybox mount -t erofs -o ro "$root" /newroot || { echo "pydesk-boot: no root disk"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
"""


def cache_root() -> Path:
    from vmkit.paths import cache_dir

    return cache_dir() / "guest"


def image_dir(recipe: Recipe) -> Path:
    return cache_root() / f"{recipe.arch}-{recipe.digest()}"


def load_image(recipe: Recipe, layout: BootLayout | None = None) -> GuestImage:
    """The built image for ``recipe``, or ImageError saying how to build it."""
    d = image_dir(recipe)
    if not (d / "manifest.json").is_file():
        raise ImageError(f"guest image for {recipe.arch} ({recipe.release()}) is not built",
                         hint="build it with `pydesk guest build` (or `make image`)")
    return load_image_dir(d, layout)


def load_image_dir(d: Path, layout: BootLayout | None = None) -> GuestImage:
    """The image built in directory ``d``."""
    manifest = d / "manifest.json"
    hint = "rebuild it with `pydesk guest build --force`"
    try:
        meta = json.loads(manifest.read_text())
        layout = BootLayout(layout or meta["default_layout"])
    except (OSError, ValueError, KeyError) as exc:
        raise ImageError(f"guest image manifest {manifest} is damaged", hint=hint) from exc
    return image_from_dir(d, Arch(meta["arch"]), meta["release"], layout)


def image_from_dir(d: Path, arch: Arch, release: str, layout: BootLayout) -> GuestImage:
    kernel = d / "vmlinuz"
    if layout is BootLayout.EROFS:
        img = GuestImage(arch, release, kernel, d / "boot.img", d / "root.erofs")
    else:
        img = GuestImage(arch, release, kernel, d / "initrd.img")
    for p in (img.kernel, img.initrd, img.root_disk):
        if p is not None and (not Path(p).is_file() or Path(p).stat().st_size == 0):
            raise ImageError(f"guest image file {p} is missing or empty", hint="rebuild it with `pydesk guest build --force`")
    return img


def _check_tools() -> None:
    missing = []
    for tool in ("mmdebstrap", "cpio", "zstd", "mkfs.erofs", "depmod"):
        try:
            which(tool)
        except ToolNotFound as exc:
            missing.append(f"{tool} ({exc.hint})")
    if missing:
        raise ImageError("cannot build the guest image: missing " + ", ".join(missing))


def _mmdebstrap(recipe: Recipe, packages: tuple[str, ...], target: Path) -> None:
    run(["mmdebstrap", "--variant=extract", f"--architectures={recipe.arch.debian}",
         "--include=" + ",".join(packages), "--quiet", recipe.suite, target], capture=True)


def _prune(root: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for p in root.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def _modules_closure(moddir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to moddir) for ``wanted`` and everything they depend on,
    dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for d in deps.get(path, []):
            visit(d)
        order.append(path)

    for name in wanted:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            log.debug("module %s is built in or absent", name)
            continue
        visit(path)
    return order


def _install_kernel(recipe: Recipe, work: Path, rootfs: Path, out: Path) -> str:
    kdir = work / "kernel"
    _mmdebstrap(recipe, (recipe.kernel_package,), kdir)
    releases = sorted(p.name for p in (kdir / "lib/modules").iterdir())
    if not releases:
        raise ImageError(f"{recipe.kernel_package} unpacked no modules")
    kver = releases[-1]
    run(["depmod", "-b", kdir, kver])  # the package leaves modules.dep to its postinst
    shutil.copy2(kdir / "boot" / f"vmlinuz-{kver}", out / "vmlinuz")
    src = kdir / "lib/modules" / kver
    dst = rootfs / "lib/modules" / kver
    for rel in _modules_closure(src, recipe.modules):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)
    run(["depmod", "-b", rootfs, kver])
    # The boot initramfs of the erofs layout: static busybox + the modules to reach root.
    boot = work / "boot"
    for d in ("bin", "proc", "sys", "dev", "newroot"):
        (boot / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(rootfs / "bin/busybox", boot / "bin/busybox")
    order = _modules_closure(src, recipe.boot_modules)
    for rel in order:
        (boot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, boot / rel)
    (boot / "modules.order").write_text("\n".join(order) + "\n")
    (boot / "init").write_text(BOOT_INIT)
    (boot / "init").chmod(0o755)
    shutil.rmtree(kdir)
    return kver


def _busybox_links(rootfs: Path, arch: Arch) -> None:
    """Create the applet links busybox's own installer would (only where no file exists)."""
    import platform

    native = Arch.from_machine(platform.machine()) == arch
    bb = [str(rootfs / "bin/busybox")] if native else ["busybox"]
    try:
        applets = run([*bb, "--list-full"]).stdout.decode().split()
    except VMKitError as exc:
        raise ImageError("cannot list busybox applets", hint="install busybox-static on the build host") from exc
    for applet in applets:
        link = rootfs / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _overlay(recipe: Recipe, rootfs: Path) -> None:
    for src in sorted(FILES.rglob("*")):
        dst = rootfs / src.relative_to(FILES)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        shutil.copy2(src, dst)
    os.chmod(rootfs / "etc/shadow", 0o600)
    if not (rootfs / "bin/sh").exists():
        (rootfs / "bin/sh").symlink_to("dash")
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "var/lib/pydesk", "mnt", "etc/ssh"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/resolv.conf").symlink_to("/run/resolv.conf")
    (rootfs / "etc/hostname").write_text("pydesk\n")
    (rootfs / "etc/pydesk-release").write_text(
        json.dumps({"release": recipe.release(), "arch": str(recipe.arch), "suite": recipe.suite}) + "\n")
    # The in-guest agent, importable as `agent`.
    dst = rootfs / "usr/lib/pydesk/agent"
    shutil.copytree(AGENT, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    sbin_init = rootfs / "sbin/init"
    sbin_init.unlink(missing_ok=True)
    sbin_init.symlink_to("/bin/busybox")


HELLO_MESSAGE = (
    "\nHello from pydesk!\n"
    "This message shows that your installation appears to be working correctly:\n"
    "the pydesk VM booted, its engine unpacked this image and crun ran it in a container.\n\n"
)


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _builtin_images(rootfs: Path, arch: Arch) -> None:
    """A tiny busybox-based ``hello`` image inside the guest, so the first `pydesk run
    --rm hello` works offline. Written as a docker-archive the engine loads at start."""
    busybox = (rootfs / "bin/busybox").read_bytes()
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    d = tarfile.TarInfo("bin")
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    entries.append((d, None))
    f = tarfile.TarInfo("bin/busybox")
    f.size, f.mode = len(busybox), 0o755
    entries.append((f, busybox))
    for name in ("sh", "echo", "printf", "cat", "ls", "sleep"):
        ln = tarfile.TarInfo(f"bin/{name}")
        ln.type, ln.linkname = tarfile.SYMTYPE, "busybox"
        entries.append((ln, None))
    layer = _tar_bytes(entries)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": arch.debian, "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/printf", HELLO_MESSAGE]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "pydesk guest build: busybox-static"}],
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["hello:latest"], "Layers": ["layer.tar"]}]).encode()
    files = [("manifest.json", manifest), (config_name, config), ("layer.tar", layer)]
    archive = []
    for name, data in files:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        archive.append((info, data))
    out = rootfs / "usr/lib/pydesk/images"
    out.mkdir(parents=True, exist_ok=True)
    (out / "hello.tar").write_bytes(_tar_bytes(archive))


def _compile_python(rootfs: Path, arch: Arch) -> None:
    """Byte-compile the stdlib and agent so the guest does not at every start."""
    import platform

    if Arch.from_machine(platform.machine()) != arch or os.geteuid() != 0:
        log.info("not byte-compiling Python for a foreign architecture")
        return
    run(["chroot", rootfs, "/usr/bin/python3", "-m", "compileall", "-q", "-j0",
         "--invalidation-mode=unchecked-hash", "/usr/lib/python3.11", "/usr/lib/pydesk"], check=False)


def _set_times(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)


def _pack_cpio(tree: Path, out: Path, level: int = 6) -> None:
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    listing = ("\n".join(["."] + names) + "\n").encode()
    cpio = run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"], input=listing, cwd=tree).stdout
    out.write_bytes(run(["zstd", f"-{level}", "-q", "-c", "-T0"], input=cpio).stdout)


def build(recipe: Recipe, *, force: bool = False) -> Path:
    """Build the image for ``recipe`` unless it is cached; returns its directory."""
    final = image_dir(recipe)
    if (final / "manifest.json").is_file() and not force:
        log.info("guest image %s is cached at %s", recipe.release(), final)
        return final
    _check_tools()
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{recipe.arch}-", dir=final.parent) as tmp:
        work = Path(tmp)
        out = work / "out"
        out.mkdir()
        rootfs = work / "rootfs"
        log.info("unpacking %d packages for %s", len(recipe.packages), recipe.arch)
        _mmdebstrap(recipe, recipe.packages, rootfs)
        log.info("unpacking the kernel (%s)", recipe.kernel_package)
        kver = _install_kernel(recipe, work, rootfs, out)
        _prune(rootfs, recipe.prune)
        _busybox_links(rootfs, recipe.arch)
        _overlay(recipe, rootfs)
        _builtin_images(rootfs, recipe.arch)
        _compile_python(rootfs, recipe.arch)
        _set_times(rootfs)
        _set_times(work / "boot")
        log.info("packing the initramfs and erofs layouts")
        init = rootfs / "init"
        init.symlink_to("/sbin/init")
        _pack_cpio(rootfs, out / "initrd.img")
        init.unlink()
        _pack_cpio(work / "boot", out / "boot.img")
        run(["mkfs.erofs", "-zlz4hc", f"-T{EPOCH}", "--all-root", "-Enoinline_data", out / "root.erofs", rootfs])
        manifest = {
            "release": recipe.release(),
            "arch": str(recipe.arch),
            "kernel_release": kver,
            "default_layout": str(BootLayout.EROFS),
            "built_seconds": round(time.monotonic() - started, 1),
            "sizes": {p.name: p.stat().st_size for p in out.iterdir()},
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for p in out.iterdir():
            p.chmod(p.stat().st_mode | stat.S_IRGRP | stat.S_IROTH)
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    log.info("built guest image %s in %.0fs", recipe.release(), time.monotonic() - started)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guest.build", description="Build the pydesk guest image.")
    p.add_argument("--arch", type=Arch, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--print-dir", action="store_true", help="print the image directory and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import platform

    arch = args.arch or Arch.from_machine(platform.machine())
    recipe = Recipe(arch)
    if args.print_dir:
        print(image_dir(recipe))
        return 0
    try:
        print(build(recipe, force=args.force))
    except VMKitError as exc:
        print(f"error: {exc}" + (f" ({exc.hint})" if exc.hint else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
