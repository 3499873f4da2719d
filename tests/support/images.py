"""Test images built from this machine's Debian packages, written as OCI image layouts by hand.

No Docker Hub: every layer is a tar made here from host files (busybox-static, nginx, python3).
Layouts are cached under ``${PYDESK_CACHE:-~/.cache/pydesk}/test-images/<recipe hash>/`` (one
layout per image, tag ``latest``, plus ``pydesk-image.json`` describing it), so only the first run
pays for building.

    images = build_all()                  # {"busybox": BuiltImage, ...}
    push_all(registry, images)            # skopeo copy each into a RunningRegistry
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .registry import RunningRegistry, push_layout

BUILDER_VERSION = "5"
MTIME = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HELLO_TEXT = "Hello from pydesk!"
NGINX_INDEX_HTML = "<!doctype html>\n<title>pydesk</title>\n<h1>Welcome to nginx on pydesk!</h1>\n"

_HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def cache_root() -> Path:
    return Path(os.environ.get("PYDESK_CACHE") or Path.home() / ".cache" / "pydesk") / "test-images"


# --- recipes ----------------------------------------------------------------------------------

# An entry: ("dir", path, mode) | ("file", path, bytes | host Path, mode)
#         | ("symlink", path, target) | ("hardlink", path, target path in the tar)
Entry = tuple


@dataclass(frozen=True)
class LayerSpec:
    entries: tuple[Entry, ...]
    compression: str = "gzip"          # "gzip" | "zstd"
    comment: str = ""


@dataclass(frozen=True)
class ImageSpec:
    layers: tuple[LayerSpec, ...]
    config: dict
    architecture: str = _HOST_ARCH
    variant: str | None = None
    os: str = "linux"
    annotations: dict = field(default_factory=dict)


@dataclass(frozen=True)
class IndexSpec:
    manifests: tuple[ImageSpec, ...]
    attestation: bool = False          # add a BuildKit-style unknown/unknown attestation entry


# --- results ----------------------------------------------------------------------------------

@dataclass
class LayerInfo:
    digest: str
    size: int
    media_type: str
    diff_id: str


@dataclass
class ManifestInfo:
    digest: str
    size: int
    platform: str                      # "linux/amd64", "linux/arm64/v8"
    config_digest: str
    config_size: int
    layers: list[LayerInfo]


@dataclass
class BuiltImage:
    """One cached OCI layout (tag ``latest``)."""

    key: str                           # e.g. "busybox"
    layout: Path
    digest: str                        # top-level digest (the index's, for multi-arch images)
    media_type: str
    size: int
    manifests: list[ManifestInfo]
    tag: str = "latest"

    @property
    def manifest(self) -> ManifestInfo:
        """The (first) platform manifest."""
        return self.manifests[0]

    def for_platform(self, plat: str) -> ManifestInfo:
        return next(m for m in self.manifests if m.platform == plat)

    def blob(self, digest: str) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.layout / "blobs" / algorithm / hexpart


# --- host files -------------------------------------------------------------------------------

def _ldd(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            path = line.split("=>", 1)[1].split("(")[0].strip()
        else:
            path = line.split("(")[0].strip()
        if path.startswith("/"):
            libs.append(path)
    return libs


def _with_libs(binaries: Iterable[str]) -> list[Entry]:
    seen: dict[str, None] = {}
    for b in binaries:
        for lib in _ldd(b):
            seen.setdefault(lib, None)
    return [("file", lib.lstrip("/"), Path(os.path.realpath(lib)), 0o755) for lib in seen]


def _etc_files(users: str = "") -> list[Entry]:
    passwd = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n" + users
    group = "root:x:0:\nnogroup:x:65534:\n" + "".join(
        f"{line.split(':')[0]}:x:{line.split(':')[3]}:\n" for line in users.splitlines() if line)
    return [("dir", "etc", 0o755), ("file", "etc/passwd", passwd.encode(), 0o644),
            ("file", "etc/group", group.encode(), 0o644),
            ("dir", "tmp", 0o1777), ("dir", "root", 0o700), ("dir", "proc", 0o555), ("dir", "sys", 0o555),
            ("dir", "dev", 0o755)]


def busybox_layer(compression: str = "gzip") -> LayerSpec:
    applets = subprocess.run(["/bin/busybox", "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    entries: list[Entry] = [*_etc_files(), ("file", "bin/busybox", Path("/bin/busybox"), 0o755)]
    entries += [("symlink", a, "/bin/busybox") for a in sorted(set(applets)) if a != "bin/busybox"]
    return LayerSpec(tuple(entries), compression, "busybox-static")


def _config(cmd: list[str], **extra: object) -> dict:
    cfg: dict = {"Env": [DEFAULT_PATH], "Cmd": cmd, "WorkingDir": "/",
                 "Labels": {"org.opencontainers.image.vendor": "pydesk tests"}}
    cfg.update(extra)
    return cfg


def recipes() -> dict[str, ImageSpec | IndexSpec]:
    base = busybox_layer()
    hello_layer = LayerSpec((("file", "usr/local/bin/hello", f'#!/bin/sh\necho "{HELLO_TEXT}"\n'.encode(), 0o755),),
                            comment="hello script")
    nginx_conf = (
        "user www-data;\nworker_processes 1;\npid /run/nginx.pid;\nerror_log stderr notice;\n"
        "events { worker_connections 64; }\n"
        "http {\n  types { text/html html htm; text/plain txt; }\n  default_type application/octet-stream;\n"
        "  access_log /dev/stdout;\n"
        "  server {\n    listen 80 default_server;\n    root /usr/share/nginx/html;\n    index index.html;\n"
        "    location / { try_files $uri $uri/ =404; }\n  }\n}\n")
    nginx_layer = LayerSpec((
        ("file", "usr/sbin/nginx", Path("/usr/sbin/nginx"), 0o755),
        *_with_libs(["/usr/sbin/nginx"]),
        *_etc_files("www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\n"),
        ("file", "etc/nginx/nginx.conf", nginx_conf.encode(), 0o644),
        ("file", "usr/share/nginx/html/index.html", NGINX_INDEX_HTML.encode(), 0o644),
        ("dir", "var/log/nginx", 0o755), ("dir", "var/lib/nginx", 0o755), ("dir", "run", 0o755),
    ), comment="nginx")
    py_entries = _python_entries()
    python_layer = LayerSpec(tuple(py_entries), comment="python3")

    def fs_layers(compression: str) -> tuple[LayerSpec, ...]:
        two = LayerSpec((
            ("dir", "data", 0o755),
            ("file", "data/file", b"hello hardlink\n", 0o644),
            ("hardlink", "data/hardlink", "data/file"),
            ("symlink", "data/rel", "file"),
            ("file", "data/gone", b"to be deleted\n", 0o644),
            ("file", "data/gonedir/x", b"x\n", 0o644),
            ("file", "opaque/a", b"a\n", 0o644),
            ("file", "opaque/b", b"b\n", 0o644),
            ("file", "usr/share/zoneinfo/UTC", Path(os.path.realpath("/usr/share/zoneinfo/UTC")), 0o644),
            ("symlink", "etc/localtime", "/usr/share/zoneinfo/UTC"),
        ), compression, "files, hardlink, symlinks")
        three = LayerSpec((
            ("file", "data/.wh.gone", b"", 0o644),
            ("file", "data/.wh.gonedir", b"", 0o644),
            ("file", "opaque/.wh..wh..opq", b"", 0o644),
            ("file", "opaque/c", b"c\n", 0o644),
            ("file", "data/added", b"added in layer 3\n", 0o644),
        ), compression, "whiteouts and an opaque dir")
        return (busybox_layer(compression), two, three)

    git_layer = LayerSpec((("file", "usr/bin/git", Path(os.path.realpath("/usr/bin/git")), 0o755),
                           *_with_libs(["/usr/bin/git"])), comment="git")
    seed_layer = LayerSpec((("dir", "data", 0o750), ("file", "data/seed.txt", b"from the image\n", 0o640),
                            ("dir", "data/sub", 0o755), ("file", "data/sub/deep", b"deep\n", 0o644)),
                           comment="content a new volume is filled from")
    # one layer with its own busybox (sh, cut): it shares no blob with nginx, whose pull it is
    # compared with, so removing nginx between runs removes every blob of it
    skopeo_layer = LayerSpec((
        *base.entries,
        ("file", "usr/bin/skopeo", Path(os.path.realpath("/usr/bin/skopeo")), 0o755),
        *_with_libs(["/usr/bin/skopeo"]),
        ("file", "etc/containers/policy.json", b'{"default": [{"type": "insecureAcceptAnything"}]}\n', 0o644),
        ("dir", "var/tmp", 0o1777),
    ), comment="skopeo") if os.path.exists("/usr/bin/skopeo") else None
    arch_amd64 = LayerSpec((("file", "etc/pydesk-arch", b"amd64\n", 0o644),), comment="arch marker")
    arch_arm64 = LayerSpec((("file", "etc/pydesk-arch", b"arm64\n", 0o644),), comment="arch marker")
    return {
        "busybox": ImageSpec((base,), _config(["sh"])),
        "hello": ImageSpec((base, hello_layer), _config(["/usr/local/bin/hello"])),
        "nginx": ImageSpec((base, nginx_layer), _config(
            ["nginx", "-g", "daemon off;"], ExposedPorts={"80/tcp": {}}, StopSignal="SIGQUIT")),
        "python": ImageSpec((base, python_layer), _config(["python3"], Env=[DEFAULT_PATH, "LANG=C.UTF-8"])),
        "entrypoint": ImageSpec((base,), _config(["hello", "world"], Entrypoint=["/bin/echo"], WorkingDir="/tmp",
                                                 User="nobody", Env=[DEFAULT_PATH, "GREETING=hi there"])),
        "layers": ImageSpec(fs_layers("gzip"), _config(["sh"])),
        "layers-zstd": ImageSpec(fs_layers("zstd"), _config(["sh"])),
        "multiarch": IndexSpec((
            ImageSpec((base, arch_amd64), _config(["cat", "/etc/pydesk-arch"]), architecture="amd64"),
            ImageSpec((arch_arm64,), _config(["cat", "/etc/pydesk-arch"]), architecture="arm64", variant="v8"),
        ), attestation=True),
        "git": ImageSpec((base, git_layer), _config(["git", "--version"], Env=[DEFAULT_PATH, "HOME=/root"])),
        "volume": ImageSpec((base, seed_layer), _config(["sh"], Volumes={"/data": {}})),
        **({"skopeo": ImageSpec((skopeo_layer,), _config(["skopeo", "--version"]))} if skopeo_layer else {}),
        "tamper": ImageSpec((LayerSpec((("file", "tamper.bin", bytes(range(256)) * 4096, 0o644),),
                                       comment="a blob tests corrupt"),), _config(["sh"])),
    }


#: What the "layers" image's rootfs must look like after applying its layers in order
#: (path -> "file:<content>" | "link:<target>" | "dir"); paths listed under ABSENT must not exist.
LAYERS_EXPECTED = {
    "data/file": "file:hello hardlink\n",
    "data/hardlink": "file:hello hardlink\n",   # and the same inode as data/file
    "data/rel": "link:file",
    "data/added": "file:added in layer 3\n",
    "opaque/c": "file:c\n",
    "etc/localtime": "link:/usr/share/zoneinfo/UTC",
    "bin/sh": "link:/bin/busybox",
}
LAYERS_ABSENT = ("data/gone", "data/gonedir", "opaque/a", "opaque/b", "data/.wh.gone", "opaque/.wh..wh..opq")


def _python_entries() -> list[Entry]:
    exe = os.path.realpath("/usr/bin/python3")
    version = ".".join(platform.python_version_tuple()[:2])
    stdlib = Path(f"/usr/lib/python{version}")
    skip_dirs = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
                 "__pycache__", "dist-packages", "site-packages", "distutils", "unittest"}
    skip_ext = ("_test", "xxlimited", "_xx", "_curses", "readline", "nis.", "ossaudiodev", "_dbm", "audioop")
    entries: list[Entry] = [("file", f"usr/bin/python{version}", Path(exe), 0o755),
                            ("symlink", "usr/bin/python3", f"python{version}")]
    dynload: list[str] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs and not d.startswith("config-"))
        for name in sorted(filenames):
            src = Path(dirpath) / name
            rel = str(src).lstrip("/")
            if src.is_symlink():
                entries.append(("symlink", rel, os.readlink(src)))
                continue
            if name.endswith(".so"):
                if any(name.startswith(p) for p in skip_ext):
                    continue
                dynload.append(str(src))
            elif not name.endswith(".py"):
                continue
            entries.append(("file", rel, src, 0o755 if name.endswith(".so") else 0o644))
    for target in ("/etc/python3.11/sitecustomize.py",):
        if os.path.exists(target):
            entries.append(("file", target.lstrip("/"), Path(target), 0o644))
    entries += _with_libs([exe, *dynload])
    return entries


# --- building ---------------------------------------------------------------------------------

def _entry_fingerprint(entry: Entry) -> list:
    out = []
    for part in entry:
        if isinstance(part, Path):
            st = part.stat()
            out.append(f"{part}:{st.st_size}:{st.st_mtime_ns}")
        elif isinstance(part, bytes):
            out.append(hashlib.sha256(part).hexdigest())
        else:
            out.append(part)
    return out


def recipe_hash(key: str, spec: ImageSpec | IndexSpec) -> str:
    def image(s: ImageSpec) -> dict:
        return {"layers": [{"c": l.compression, "e": [_entry_fingerprint(e) for e in l.entries]} for l in s.layers],
                "config": s.config, "arch": s.architecture, "variant": s.variant, "os": s.os}
    doc = {"v": BUILDER_VERSION, "key": key,
           "spec": {"index": [image(m) for m in spec.manifests], "att": spec.attestation}
           if isinstance(spec, IndexSpec) else image(spec)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _tar(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    made_dirs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = kind, mode, MTIME, 0, 0, "root", "root"
            return ti

        def parents(path: str) -> None:
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in made_dirs:
                    made_dirs.add(d)
                    tar.addfile(info(d, tarfile.DIRTYPE, 0o755))

        for entry in entries:
            kind, path = entry[0], entry[1]
            parents(path)
            if kind == "dir":
                if path not in made_dirs:
                    made_dirs.add(path)
                    tar.addfile(info(path, tarfile.DIRTYPE, entry[2]))
            elif kind == "file":
                data = entry[2].read_bytes() if isinstance(entry[2], Path) else entry[2]
                ti = info(path, tarfile.REGTYPE, entry[3])
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            elif kind in ("symlink", "hardlink"):
                ti = info(path, tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, 0o777)
                ti.linkname = entry[2]
                tar.addfile(ti)
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
    return buf.getvalue()


def _compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        out = io.BytesIO()
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
            gz.write(data)
        return out.getvalue()
    if compression == "zstd":
        return subprocess.run(["zstd", "-q", "-c", "-3", "-T1"], input=data, capture_output=True,
                              check=True).stdout
    raise ValueError(f"unknown compression {compression!r}")


class _Layout:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def put(self, data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / "sha256" / digest[7:]
        if not path.exists():
            path.write_bytes(data)
        return digest, len(data)

    def layer(self, spec: LayerSpec) -> LayerInfo:
        raw = _tar(spec.entries)
        blob = _compress(raw, spec.compression)
        digest, size = self.put(blob)
        media = LAYER_GZIP if spec.compression == "gzip" else LAYER_ZSTD
        return LayerInfo(digest, size, media, "sha256:" + hashlib.sha256(raw).hexdigest())

    def image(self, spec: ImageSpec) -> tuple[ManifestInfo, dict]:
        layers = [self.layer(l) for l in spec.layers]
        config = {"created": CREATED, "architecture": spec.architecture, "os": spec.os,
                  **({"variant": spec.variant} if spec.variant else {}),
                  "config": spec.config,
                  "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
                  "history": [{"created": CREATED, "created_by": f"pydesk test builder: {l.comment or 'layer'}"}
                              for l in spec.layers]}
        cdigest, csize = self.put(json.dumps(config, indent=2, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
                    "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size} for l in layers]}
        if spec.annotations:
            manifest["annotations"] = spec.annotations
        mdigest, msize = self.put(json.dumps(manifest, indent=2).encode())
        plat = {"architecture": spec.architecture, "os": spec.os, **({"variant": spec.variant} if spec.variant else {})}
        info = ManifestInfo(mdigest, msize, "/".join(filter(None, (spec.os, spec.architecture, spec.variant))),
                            cdigest, csize, layers)
        return info, {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize, "platform": plat}

    def attestation(self, subject: str) -> dict:
        statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "subject": []}).encode()
        ldigest, lsize = self.put(statement)
        cdigest, csize = self.put(b'{"architecture":"unknown","os":"unknown","config":{},'
                                  b'"rootfs":{"type":"layers","diff_ids":["' + ldigest.encode() + b'"]}}')
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
                    "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": ldigest, "size": lsize,
                                "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}]}
        mdigest, msize = self.put(json.dumps(manifest).encode())
        return {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": msize,
                "platform": {"architecture": "unknown", "os": "unknown"},
                "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                "vnd.docker.reference.digest": subject}}

    def tag(self, descriptor: dict, tag: str) -> None:
        entry = dict(descriptor, annotations={**descriptor.get("annotations", {}),
                                              "org.opencontainers.image.ref.name": tag})
        entry.pop("platform", None)
        (self.root / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}, indent=2))


def build(key: str, spec: ImageSpec | IndexSpec, root: Path | None = None) -> BuiltImage:
    """Build (or load from the cache) one image as an OCI layout tagged ``latest``."""
    root = root or cache_root()
    dest = root / recipe_hash(key, spec)
    meta = dest / "pydesk-image.json"
    if meta.exists():
        return _load(meta)
    tmp = root / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layout = _Layout(tmp)
    if isinstance(spec, IndexSpec):
        infos, descs = zip(*(layout.image(m) for m in spec.manifests))
        manifests = list(descs)
        if spec.attestation:
            manifests.append(layout.attestation(manifests[0]["digest"]))
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        digest, size = layout.put(json.dumps(index, indent=2).encode())
        top = {"mediaType": OCI_INDEX, "digest": digest, "size": size}
        built = BuiltImage(key, dest, digest, OCI_INDEX, size, list(infos))
    else:
        info, top = layout.image(spec)
        built = BuiltImage(key, dest, info.digest, OCI_MANIFEST, info.size, [info])
    layout.tag(top, "latest")
    doc = asdict(built)
    doc["layout"] = ""
    (tmp / "pydesk-image.json").write_text(json.dumps(doc, indent=2))
    try:
        tmp.rename(dest)
    except OSError:  # built concurrently by another process: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return _load(meta)


def _load(meta: Path) -> BuiltImage:
    doc = json.loads(meta.read_text())
    manifests = [ManifestInfo(**{**m, "layers": [LayerInfo(**l) for l in m["layers"]]}) for m in doc["manifests"]]
    return BuiltImage(doc["key"], meta.parent, doc["digest"], doc["media_type"], doc["size"], manifests, doc["tag"])


#: Images built only when asked for by name (the benchmark's in-guest skopeo peer).
ON_DEMAND = frozenset({"skopeo"})


def build_all(keys: Iterable[str] | None = None, root: Path | None = None) -> dict[str, BuiltImage]:
    specs = recipes()
    return {k: build(k, specs[k], root) for k in (keys or [k for k in specs if k not in ON_DEMAND])}


#: Repository names each image is pushed under by ``push_all``.
PUSH_NAMES = {
    "busybox": ("busybox", "library/busybox"),
    "hello": ("hello",),
    "nginx": ("nginx", "library/nginx"),
    "python": ("python", "library/python"),
    "entrypoint": ("entrypoint",),
    "layers": ("layers",),
    "layers-zstd": ("layers-zstd",),
    "multiarch": ("multiarch",),
    "tamper": ("tamper",),
    "git": ("git", "library/git"),
    "volume": ("volume", "library/volume"),
    "skopeo": ("skopeo", "library/skopeo"),
}


def push_all(reg: RunningRegistry, images: dict[str, BuiltImage],
             names: dict[str, tuple[str, ...]] | None = None) -> None:
    """Push every image under its names (tag ``latest``); records them in ``reg.images``
    (repository name -> BuiltImage)."""
    for key, image in images.items():
        for name in (names or PUSH_NAMES).get(key, (key,)):
            push_layout(reg, image.layout, image.tag, name)
            reg.images[name] = image
