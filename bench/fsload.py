"""One file-system workload, run the same way on the host (natively) and in a container on a
bind mount of a shared folder: `python3 fsload.py DIR` prints one JSON line of seconds.

Stdlib only (it runs in the test `python` image too).

- seq_write: 256 MiB in 1 MiB blocks, then fsync;
- seq_read: reading it back (a new open);
- untar: extracting a generated source-like tree (2,000 files of 1–4 KiB in 100 folders;
  FSLOAD_FILES and FSLOAD_SEQ_MIB change the sizes);
- walk_stat: `find` + `stat` of that tree (os.walk and lstat of every entry).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import time

SEQ_MIB = int(os.environ.get("FSLOAD_SEQ_MIB", "256"))
FILES = int(os.environ.get("FSLOAD_FILES", "2000"))
DIRS = 100


def source_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in range(DIRS):
            ti = tarfile.TarInfo(f"src/pkg{d:03d}")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(ti)
        for i in range(FILES):
            data = (f"# file {i}\n" + "x = 1\n" * (170 + (i * 37) % 500)).encode()
            ti = tarfile.TarInfo(f"src/pkg{i % DIRS:03d}/mod{i:04d}.py")
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def main(target: str) -> dict[str, float]:
    work = os.path.join(target, f"fsload-{os.getpid()}")
    os.makedirs(work)
    out: dict[str, float] = {}
    try:
        block = os.urandom(1 << 20)
        path = os.path.join(work, "seq.bin")
        t = time.monotonic()
        with open(path, "wb", buffering=0) as f:
            for _ in range(SEQ_MIB):
                f.write(block)
            os.fsync(f.fileno())
        out["seq_write"] = time.monotonic() - t
        t = time.monotonic()
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
        out["seq_read"] = time.monotonic() - t
        os.unlink(path)
        data = source_tar()
        t = time.monotonic()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(work)
        out["untar"] = time.monotonic() - t
        t = time.monotonic()
        n = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(work, "src")):
            for name in dirnames + filenames:
                os.lstat(os.path.join(dirpath, name))
                n += 1
        out["walk_stat"] = time.monotonic() - t
        assert n == FILES + DIRS, n
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
