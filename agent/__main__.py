"""`python3 -m agent`: the engine, serving the Docker Engine API in the guest."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
from pathlib import Path

from agent import guest_settings, runtime
from agent.api import serve
from agent.containers import RECORDS
from agent.engine import ENGINE_ROOT, Engine
from agent.hostchanges import HostChanges

SOCKET = "/run/pydesk/engine.sock"
log = logging.getLogger("agent")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pydesk-engine")
    p.add_argument("--root", type=Path, default=ENGINE_ROOT)
    p.add_argument("--socket", default=SOCKET)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    accel = guest_accel()
    runtime.use_fixed_addresses(accel == "tcg")
    log.info("accelerator %s: crun starts at %s addresses", accel or "unknown", "fixed" if accel == "tcg" else "random")
    engine = Engine(args.root)
    engine.startup()
    engine.ports.serve()
    engine.ports.serve_udp()
    changes = HostChanges(engine.running_binds)
    changes.follow(engine.events)
    changes.serve()
    # What start-up made (the store's and the containers' records, the modules) stays: the
    # collector need not walk it again on every request (each walk is slow under TCG).
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        serve(engine, args.socket)
    finally:
        # exited containers' clean-ups still waiting for a quiet moment: done now, so the
        # data disk has no rootfs of theirs mounted when the VM shuts down
        engine.housekeeper.expedite()
        RECORDS.flush(30)  # the containers' records still being written
        engine.launcher.close()  # the cruns waiting for containers that will not come
    return 0


def guest_accel(path: Path = guest_settings.GUEST_SETTINGS) -> str | None:
    """How the VM runs (the host's ``accel=`` line of the guest settings), if it says."""
    found = guest_settings.values("accel", path)
    return found[0].strip() if found else None


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
