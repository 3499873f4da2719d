"""The host daemon: one per VM. It owns QEMU, the QMP connection and the agent channel,
and serves its clients (the CLI, the tray) on a user-only local socket.

Started by the CLI with a pipe on stdout: it writes JSON-lines progress there until the VM
is ready (or failed), then lets go of the pipe and keeps serving. The control protocol is
a JSON request line and JSON reply lines; the ``ssh`` request turns the connection into a
byte stream to a fresh ``sshd -i`` in the guest.

If the daemon dies, QEMU (in its own session) keeps running; ``--adopt`` makes a new
daemon take it over through the pidfile and the QMP and agent sockets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import filelock
import psutil

from vmkit import accel, standby
from vmkit.engine_endpoint import EngineListener, engine_listener
from vmkit.engine_link import EngineLink
from vmkit.errors import AlreadyRunning, DaemonError, NotRunning, VMKitError
from vmkit.host import detect
from vmkit.paths import VMPaths, cache_dir
from vmkit.settings import load as load_settings
from vmkit.spec import BootLayout
from vmkit.status import read_status, write_status
from vmkit.transport import Listener, pump, use_unix_sockets
from vmkit.vm import VM, build_spec, guest_config

log = logging.getLogger("vmkit.daemon")

ENGINE_WAIT = 60.0  # how long a client may wait for the engine after a boot
ENDPOINT_WAIT = 5.0  # Windows: how long an exiting standby may still hold the engine pipe's name


def _http_error(conn: Any, status: int, message: str, *, read_request: bool = True) -> None:
    """Answer an Engine API client in Docker's error shape, so it prints our message."""
    body = json.dumps({"message": message}).encode()
    with contextlib.suppress(OSError):
        if read_request:
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                conn.recv(65536)
        conn.sendall(f"HTTP/1.1 {status} Service Unavailable\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        conn.close()


def _engine_refused(conn: Any) -> None:
    """The relay in the guest gave up on a stream before the engine answered (its socket
    never appeared): the request was already read, so answer and close."""
    _http_error(conn, 503, "the pydesk engine in the VM is not answering (see `pydesk vm logs`)",
                read_request=False)


class Progress:
    """JSON-lines progress to the starting CLI; silent once it has let go."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        log.info("%s %s", event, fields.get("message", ""))
        if self.stream is None:
            return
        try:
            self.stream.write(json.dumps({"event": event, **fields}) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.stream = None

    def step(self, message: str) -> None:
        self.emit("progress", message=message)

    def detach(self) -> None:
        """Close the pipe to the CLI (it sees EOF) and point fd 1 at /dev/null."""
        if self.stream is None:
            return
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        self.stream = None


class Daemon:
    def __init__(self, name: str) -> None:
        self.name = name
        self.paths = VMPaths(name).ensure()
        self.vm: VM | None = None
        self.listener: Listener | None = None
        self.engine_listener: EngineListener | None = None
        self.engine_link: EngineLink | None = None
        self.stopping = threading.Event()
        self.done = threading.Event()
        self.lock = filelock.FileLock(str(self.paths.lock), thread_local=False)
        self.exit_reason: dict[str, Any] = {"reason": "stopped"}
        # keep answering on engine.sock once the VM is down, but only for a VM that ran: a start
        # that fails leaves nothing behind (its caller may be gone before a standby would appear)
        self.leave_standby = False

    # --- start --------------------------------------------------------------------
    def start(self, progress: Progress, adopt: bool, image_dir: Path | None = None) -> None:
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            raise AlreadyRunning(f"pydesk VM {self.name!r} is already running") from None
        standby.stop(self.paths)  # the engine socket is ours again
        self.paths.ensure()
        settings = load_settings()
        from guest.build import load_image, load_image_dir
        from guest.recipe import Recipe

        host = detect()
        pid = self._running_qemu_pid()
        if pid is not None and not adopt:
            adopt = True
        if adopt and pid is None:
            raise NotRunning(f"no running QEMU for VM {self.name!r} to reattach to")
        layout = None if settings.layout == "auto" else BootLayout(settings.layout)
        if adopt:  # the image the running QEMU was started with
            recorded = read_status(self.paths).get("image_dir")
            image_dir = Path(recorded) if recorded else image_dir
        image = load_image_dir(image_dir, layout) if image_dir else load_image(Recipe(host.arch), layout)
        progress.step("checking the accelerator")
        choice = accel.choose(host, image.arch, str(image.kernel), cache_file=cache_dir() / "accel-probe.json",
                              requested=settings.requested_accel)
        progress.emit("accel", accel=str(choice.accel), message=choice.reason)
        spec = build_spec(self.name, settings, image, choice, self.paths, host.os)
        self.vm = VM(spec, host, self.paths, choice, guest_config(settings, spec.shares, choice.accel))
        self.listener = Listener(self.paths.control)
        if adopt:
            assert pid is not None
            self.vm.adopt(pid, progress.step)
        else:
            self.vm.start(progress.step)
        if not use_unix_sockets():
            # a pipe's name cannot be taken over like a socket path: a standby that the previous
            # daemon spawned after our first stop() must go before we can listen
            standby.stop(self.paths)
        self.engine_listener = engine_listener(self.paths, wait=ENDPOINT_WAIT)
        assert self.vm.spec.files.engine_port is not None
        self.engine_link = EngineLink(self.vm.spec.files.engine_port, refused=_engine_refused).start()
        threading.Thread(target=self._serve_engine, name="engine-accept", daemon=True).start()
        self.leave_standby = True
        write_status(self.paths, {"state": "running", "daemon_pid": os.getpid(),
                                  "image_dir": str(Path(image.kernel).parent), **self.vm.status()})
        threading.Thread(target=self._watch_qemu, name="qemu-watch", daemon=True).start()

    # --- the engine socket ------------------------------------------------------------
    def _serve_engine(self) -> None:
        """Docker Engine API clients on the host (the unix socket, or the named pipe on
        Windows): each connection becomes a stream to the engine's unix socket in the guest,
        carried over the engine's own virtio-serial port (vmkit/engine_link.py)."""
        assert self.engine_listener is not None and self.engine_link is not None
        while not self.done.is_set():
            try:
                conn = self.engine_listener.accept()
            except OSError as exc:
                if not self.stopping.is_set() and not self.done.is_set():
                    log.error("the engine endpoint stopped accepting: %s", exc)
                return
            # on a waiting thread of the link's pool (vmkit/engine_link.py says why)
            self.engine_link.workers.spawn(self._forward_engine, conn, name="engine-client")

    def _forward_engine(self, conn: Any) -> None:
        assert self.engine_link is not None
        try:
            self.engine_link.forward(conn, wait=ENGINE_WAIT)
        except VMKitError as exc:
            log.warning("engine connection failed: %s", exc)
            _http_error(conn, 503, f"the pydesk engine in the VM is not answering: {exc}")

    def _running_qemu_pid(self) -> int | None:
        try:
            pid = int(self.paths.pidfile.read_text().strip())
            proc = psutil.Process(pid)
            if any(str(self.paths.pidfile) in arg for arg in proc.cmdline()):
                return pid
        except (OSError, ValueError, psutil.Error):
            pass
        return None

    def _watch_qemu(self) -> None:
        assert self.vm is not None
        self.vm.qemu.wait()
        if not self.stopping.is_set():
            detail = self.vm.qemu.describe_exit()
            log.error("VM crashed: %s", detail)
            self.exit_reason = {"reason": "crashed", "detail": detail, "at": time.time()}
            self.shutdown()

    # --- serve --------------------------------------------------------------------
    def serve(self) -> None:
        assert self.listener is not None
        while not self.done.is_set():
            try:
                conn = self.listener.accept()
            except OSError:
                break
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self.done.wait()

    def _handle(self, conn: socket.socket) -> None:
        f = conn.makefile("rwb", buffering=0)
        keep_open = False
        try:
            line = f.readline(65536)
            if not line:
                return
            req = json.loads(line)
            op = req.get("op")
            if op == "status":
                self._reply(f, ok=True, status=self.vm.status() if self.vm else {})
            elif op == "stop":
                self.leave_standby = bool(req.get("standby", True))
                how = self.stop()
                self._reply(f, ok=True, how=how)
            elif op == "ssh":
                if self.vm is None or self.vm.agent is None:
                    raise DaemonError("the VM is not ready")
                chan = self.vm.agent.open_inner_sshd()
                self._reply(f, ok=True)
                keep_open = True
                threading.Thread(target=pump, args=(chan, conn), daemon=True).start()
                pump(conn, chan)
            else:
                raise DaemonError(f"unknown request {op!r}")
        except VMKitError as exc:
            self._reply(f, ok=False, error=exc.to_dict())
        except (ValueError, KeyError) as exc:
            self._reply(f, ok=False, error=DaemonError(f"bad request: {exc}").to_dict())
        except OSError:
            pass
        finally:
            if not keep_open:
                with contextlib.suppress(OSError):
                    conn.close()

    @staticmethod
    def _reply(f: Any, **fields: Any) -> None:
        with contextlib.suppress(OSError):
            f.write((json.dumps(fields) + "\n").encode())

    # --- stop ---------------------------------------------------------------------
    def stop(self) -> str:
        if self.stopping.is_set():
            self.done.wait(120)
            return "already stopping"
        self.stopping.set()
        how = self.vm.stop() if self.vm else "not started"
        self.exit_reason = {"reason": "stopped", "how": how, "at": time.time()}
        self.shutdown()
        return how

    def shutdown(self) -> None:
        """Release everything this daemon holds; safe to call more than once."""
        if self.done.is_set():
            return
        # QEMU is gone by now: record why before the sockets go, since a client that finds
        # no daemon socket reads this file
        write_status(self.paths, {"state": "stopped", "last_exit": self.exit_reason})
        if self.listener is not None:
            self.listener.close()
        if self.engine_listener is not None:
            self.engine_listener.close()
        if self.engine_link is not None:
            self.engine_link.close()
        if self.vm is not None:
            self.vm.close()
        if self.lock.is_locked:
            with contextlib.suppress(OSError):
                self.paths.lock.unlink()
            self.lock.release(force=True)
        with contextlib.suppress(OSError):
            self.paths.run.rmdir()
        if self.leave_standby:
            standby.start(self.name)
        self.done.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pydesk-daemon")
    p.add_argument("--name", default="default")
    p.add_argument("--adopt", action="store_true", help="take over a running QEMU")
    p.add_argument("--image", type=Path, help="the guest image directory to boot")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    paths = VMPaths(args.name).ensure()
    if paths.daemon_log.exists() and paths.daemon_log.stat().st_size > 1 << 20:
        os.replace(paths.daemon_log, paths.daemon_log.with_suffix(".log.1"))
    logging.basicConfig(filename=paths.daemon_log, level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    # paramiko logs every failed handshake with a traceback; reconnects are expected.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if args.debug else logging.CRITICAL)
    progress = Progress(sys.stdout)
    daemon = Daemon(args.name)

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: stopping the VM", signum)
        threading.Thread(target=daemon.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the CLI's Ctrl-C is not ours
    try:
        daemon.start(progress, args.adopt, args.image)
    except VMKitError as exc:
        log.error("start failed: %s", exc)
        progress.emit("error", error=exc.to_dict())
        if not isinstance(exc, AlreadyRunning):
            if daemon.vm is not None:
                daemon.vm.qemu.kill()
                daemon.vm.qemu.wait(5)
            daemon.exit_reason = {"reason": "failed", "detail": str(exc), "at": time.time()}
            daemon.shutdown()
        return 1
    except Exception as exc:
        log.exception("start failed")
        progress.emit("error", error=DaemonError(f"internal error: {exc}").to_dict())
        if daemon.vm is not None:
            daemon.vm.qemu.kill()
        daemon.exit_reason = {"reason": "failed", "detail": repr(exc), "at": time.time()}
        daemon.shutdown()
        return 1
    assert daemon.vm is not None
    progress.emit("ready", status=daemon.vm.status())
    progress.detach()
    daemon.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
