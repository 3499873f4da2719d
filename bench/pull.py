"""The pull figures of `make bench`: the engine pulling nginx from a local registry against
skopeo copying it from the same registry over the same path, in the same guest.

The target peer does the pull's whole job: `skopeo copy … containers-storage:` (what `podman
pull` runs) downloads the blobs, verifies them, decompresses them and unpacks them into an
overlay store, as the engine does. The peer that copies to an OCI layout downloads and verifies
only; it is kept as the download floor. The same three (the engine's pull code, skopeo into
containers-storage, skopeo to an OCI layout) and a private native dockerd's `docker pull` are
also timed natively on the host, where nothing is emulated, so the ratios can be read apart
from TCG.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SKOPEO = "skopeo --insecure-policy copy --quiet --src-tls-verify=false "
_NGINX = "docker://127.0.0.1:5000/library/nginx:latest "
#: Timed inside the skopeo container by the guest's clock (/proc/uptime: 10 ms steps; busybox
#: date has no sub-second format), so the container's start is not counted.
_TIMED = ("a=$(cut -d' ' -f1 /proc/uptime); {copy} || exit 1; "
          "b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\"")
#: The download floor: blobs fetched, verified and written, nothing decompressed or unpacked.
OCI_IN_GUEST = _TIMED.format(copy=_SKOPEO + _NGINX + "oci:/tmp/nginx:latest")
#: The same job as the engine's: into containers-storage (overlay driver) on a fresh volume.
#: The store is set up first by an untimed copy of the skopeo image (it shares no layer with
#: nginx): a new store's first use probes the kernel's overlay features (~0.6 s here), which
#: a podman user pays once, not per pull.
STORAGE_IN_GUEST = (_SKOPEO + "docker://127.0.0.1:5000/library/skopeo:latest containers-storage:skopeo:latest "
                    ">/dev/null || exit 1; " + _TIMED.format(copy=_SKOPEO + _NGINX + "containers-storage:nginx:latest"))
VOLUME = "pydesk-bench-storage"


def measure(client: Any, samples: int) -> dict[str, Any]:
    """Medians of ``samples`` engine pulls of nginx (docker-py from the host, each into a store
    holding none of its blobs) and as many skopeo copies of each kind in a container in the
    same guest (`--network host`: the same 127.0.0.1:5000 forward), interleaved, the order
    turning from round to round."""
    import docker

    client.images.pull("skopeo", tag="latest")  # one layer, sharing nothing with nginx
    for name in ("nginx", "busybox"):  # busybox's layer is nginx's base layer
        try:
            client.images.remove(name, force=True)
        except docker.errors.ImageNotFound:
            pass
    times: dict[str, list[float]] = {"pydesk": [], "storage": [], "oci": []}

    def engine_pull() -> None:
        t0 = time.monotonic()
        client.images.pull("nginx", tag="latest")
        times["pydesk"].append(time.monotonic() - t0)
        client.images.remove("nginx", force=True)

    def skopeo(kind: str, script: str, **options: Any) -> None:
        out = client.containers.run("skopeo", ["sh", "-c", script], network_mode="host", remove=True, **options)
        start, end = (float(x) for x in out.decode().split())
        times[kind].append(end - start)

    def into_storage() -> None:  # overlay mounts need privileges; the store lives on a volume (ext4)
        client.volumes.create(VOLUME)
        try:
            skopeo("storage", STORAGE_IN_GUEST, privileged=True,
                   volumes={VOLUME: {"bind": "/var/lib/containers", "mode": "rw"}})
        finally:
            client.volumes.get(VOLUME).remove(force=True)

    steps: list[Callable[[], None]] = [engine_pull, into_storage, lambda: skopeo("oci", OCI_IN_GUEST)]
    for i in range(samples):  # a change of this machine's speed hits all three alike
        for step in steps[i % 3:] + steps[:i % 3]:
            step()
    client.images.pull("busybox", tag="latest")  # for the docker CLI figures
    return {"pydesk_s": statistics.median(times["pydesk"]), "peer_s": statistics.median(times["storage"]),
            "oci_s": statistics.median(times["oci"]), "samples": samples,
            **{f"{k}_all": v for k, v in times.items()}}


@dataclass
class _HostEngine:
    """What `agent.pull.pull` uses of the engine: its store, its folder, its event stream."""
    root: Path
    store: Any = field(init=False)
    events: Any = field(init=False)

    def __post_init__(self) -> None:
        from agent.events import Events
        from agent.store import Store

        self.store = Store(self.root / "store")
        self.events = Events()


def _skopeo(src: str, dest: str) -> float:
    """Seconds for one native `skopeo copy`."""
    t0 = time.monotonic()
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", src, dest],
                   check=True, capture_output=True)
    return time.monotonic() - t0


def native(registry: str, work: Path, runs: int) -> dict[str, float]:
    """The same pulls natively on the host (needs root: the store and containers-storage make
    overlay lower dirs with their owners, and dockerd runs as root)."""
    from agent import pull

    if os.geteuid() != 0:
        print("no native pull figures: they need root", flush=True)
        return {}
    out: dict[str, list[float]] = {"native_pydesk_s": [], "native_storage_s": [], "native_oci_s": []}
    src = f"docker://{registry}/library/nginx:latest"
    for i in range(runs + 2):
        d = work / f"native-pull-{i}"
        engine = _HostEngine(d / "engine")
        try:
            t0 = time.monotonic()
            if not pull.pull(engine, f"{registry}/library/nginx:latest", None, None, lambda _: None):
                raise SystemExit("the engine's pull code failed natively (see its log)")
            out["native_pydesk_s"].append(time.monotonic() - t0)
        finally:
            engine.store.close()
        store = f"containers-storage:[overlay@{d}/storage+{d}/run]"
        _skopeo(f"docker://{registry}/library/skopeo:latest", store + "skopeo:latest")  # the store's first use
        out["native_storage_s"].append(_skopeo(src, store + "nginx:latest"))
        out["native_oci_s"].append(_skopeo(src, f"oci:{d}/oci:latest"))
        subprocess.run(["umount", "-R", f"{d}/storage/overlay"], check=False, capture_output=True)  # c/storage's bind mount
        shutil.rmtree(d, ignore_errors=True)
    result = {k: statistics.median(v) for k, v in out.items()}
    dockerd = _native_dockerd_pull(registry, work, runs + 2)
    if dockerd is not None:
        result["native_dockerd_s"] = dockerd
    return result


def _native_dockerd_pull(registry: str, work: Path, n: int) -> float | None:
    """`docker pull -q` of nginx by a private native dockerd (CLI included, ~25 ms here)."""
    from tests.support.native_dockerd import NativeDockerdError, missing, native_dockerd

    if missing():
        print(f"no native dockerd pull figure: needs {', '.join(missing())}", flush=True)
        return None
    name = f"{registry}/library/nginx:latest"
    times = []
    try:
        with native_dockerd(work / "dockerd-pull") as d:
            for _ in range(n):
                t0 = time.monotonic()
                d.cli.ok("pull", "-q", name)
                times.append(time.monotonic() - t0)
                d.cli.ok("rmi", name)
    except NativeDockerdError as exc:
        print(f"no native dockerd pull figure: {exc}", flush=True)
        return None
    return statistics.median(times)


def report_rows(r: dict[str, Any], ratio: Callable[[float, float], str]) -> list[str]:
    n = r["samples"]
    rows = [
        f"| pull of nginx from a local registry by the engine (Engine API from the host, medians of {n}) vs "
        f"`skopeo copy` of it into containers-storage (overlay, what `podman pull` does: download, verify, "
        f"decompress, unpack) in a container in the same guest, over the same path to the registry "
        f"| {r['pydesk_s']:.2f} s | {r['peer_s']:.2f} s | {ratio(r['pydesk_s'], r['peer_s'])} | ≤ 1.2× |",
    ]
    if "oci_s" in r:
        rows.append(f"| the same pull vs `skopeo copy` of it to an OCI layout there (the download floor: blobs "
                    f"verified and written, nothing decompressed or unpacked) | {r['pydesk_s']:.2f} s | "
                    f"{r['oci_s']:.2f} s | {ratio(r['pydesk_s'], r['oci_s'])} | reference |")
    if "native_pydesk_s" in r:
        ours = r["native_pydesk_s"]
        rows += [
            f"| natively on the host (no VM, no emulation): the engine's pull code vs `skopeo copy` into "
            f"containers-storage | {ours:.3f} s | {r['native_storage_s']:.3f} s | "
            f"{ratio(ours, r['native_storage_s'])} | reference |",
            f"| natively: the engine's pull code vs `skopeo copy` to an OCI layout (the download floor) "
            f"| {ours:.3f} s | {r['native_oci_s']:.3f} s | {ratio(ours, r['native_oci_s'])} | reference |",
            *([f"| natively: the engine's pull code vs `docker pull` by a private native dockerd (its CLI "
               f"included) | {ours:.3f} s | {r['native_dockerd_s']:.3f} s | "
               f"{ratio(ours, r['native_dockerd_s'])} | reference |"] if "native_dockerd_s" in r else []),
            f"| the engine's pull in the VM vs its pull code natively (what the VM and TCG cost) "
            f"| {r['pydesk_s']:.3f} s | {ours:.3f} s | {ratio(r['pydesk_s'], ours)} | reference |",
        ]
    return rows
