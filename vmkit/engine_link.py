"""The host side of the engine's own virtio-serial port: every Docker API connection on the
host becomes a stream to the engine's socket in the guest.

The wire (frames, per-stream windows, the handshake) is defined once, in
agent/engine_port.py, whose relay is the other end. Here:

- one thread reads the port and hands each stream its frames;
- per connection, one thread reads the client and sends DATA within the stream's window, and
  a second thread writes what the guest sent to the client and acknowledges it once written
  (a client that stops reading blocks only its own writer). Both come from a pool of
  waiting threads (agent/workers.py): ``Thread.start`` waits until the new thread runs, and
  with QEMU's vCPU threads busy on the host's cores that wait cost milliseconds;
- when the link fails (QEMU gone, the two sides out of step) every stream is closed and the
  link is made again, with a fresh handshake;
- up to ``SPARE_STREAMS`` streams are opened ahead of the clients that will take them, so a
  new client connection costs what a request on a kept-alive one costs. Most Docker clients
  open a connection for most requests (docker-py keeps one pool per URL: a `run` opens six),
  and in the emulated guest the relay's connect and the engine's accept and handler set-up
  added ~8-11 ms to each. Spares are opened only once no client has connected for
  ``SPARE_QUIET`` (in a `run`, while crun works), so the engine sets them up when it has
  nothing else to do; opened as each was taken, they only moved that cost onto the next
  request (a `run` was no faster). Spares are kept only after a client was answered on this
  link, and a spare the guest ends before a client came (the engine restarted) is dropped and
  stops the keeping until the next answer: an engine that is down costs no stream churn.

``EngineLink`` is a context manager: ``close()`` ends the reader, the spare keeper and every
stream.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.engine_port import ACK, ACK_EVERY, MAX_FRAME, WINDOW, Kind, OutOfStep, frame, hello_line, parse, ready_line
from agent.workers import Workers
from vmkit.errors import AgentError
from vmkit.spec import Endpoint
from vmkit.transport import connect_endpoint

log = logging.getLogger("pydesk.engine_link")

HELLO_EVERY = 1.0  # resend the hello until the relay answers (it may not have the port open yet)
RELINK_PAUSE = 0.2
SPARE_STREAMS = 6  # streams opened ahead of the clients that take them (above): a docker-py `run`'s worth
SPARE_QUIET = 0.05  # ... once no client has connected for this long


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    LINKED = "linked"
    CLOSED = "closed"


class _EOF:
    pass


class _Closed:
    pass


EOF, CLOSED = _EOF(), _Closed()


class _Stream:
    def __init__(self, sid: int, conn: Any) -> None:
        self.sid = sid
        self.conn = conn  # None: a spare no client has taken yet
        self.inbox: queue.SimpleQueue[bytes | _EOF | _Closed] = queue.SimpleQueue()
        self.cond = threading.Condition()
        self.credit = WINDOW
        self.closed = False  # by either side, or the link
        self.eof_in = False  # the guest's EOF was passed on to the client
        self.eof_out = False  # we sent the client's EOF
        self.answered = False  # the guest sent something: a refusal can no longer be an HTTP error


class EngineLink:
    """Streams to the guest engine over its port (``endpoint``: QEMU's chardev socket)."""

    def __init__(self, endpoint: Endpoint, *, connect: Callable[[Endpoint], socket.socket] | None = None,
                 refused: Callable[[Any], None] | None = None) -> None:
        self.endpoint = endpoint
        self._connect = connect or (lambda ep: connect_endpoint(ep, timeout=5.0))
        self._refused = refused  # answers a client whose stream the guest refused before any reply
        self.state = LinkState.CONNECTING
        self.cond = threading.Condition()
        self.send_lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.streams: dict[int, _Stream] = {}
        self.spares: list[_Stream] = []  # opened, connected in the guest, no client yet
        self._keep_spares = False  # a client was answered since the link was made
        self._quiet_at = 0.0  # when no client will have come for SPARE_QUIET
        self._closing: list[int] = []  # spares the guest ended: CLOSE them with the next frames sent
        self.next_id = 1
        self.links = 0  # handshakes done (tests and logs)
        self.thread = threading.Thread(target=self._run, name="engine-link", daemon=True)
        self.spare_thread = threading.Thread(target=self._keep, name="engine-spares", daemon=True)
        self.workers = Workers()  # each client connection's two threads (the daemon's accept uses it)

    def start(self) -> EngineLink:
        self.thread.start()
        self.spare_thread.start()
        return self

    def __enter__(self) -> EngineLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self.cond:
            self.state = LinkState.CLOSED
            self.cond.notify_all()
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for t in (self.thread, self.spare_thread):
            if t.is_alive() and threading.current_thread() is not t:
                t.join(5)
        self._fail_streams()
        self._drop_spares()

    def wait_linked(self, timeout: float) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.state is not LinkState.CONNECTING, timeout)
            return self.state is LinkState.LINKED

    # --- the link -------------------------------------------------------------------
    def _run(self) -> None:
        while self.state is not LinkState.CLOSED:
            try:
                sock, rest = self._link()
            except OSError as exc:
                log.debug("engine port: %s", exc)
                time.sleep(RELINK_PAUSE)
                continue
            if sock is None:
                return
            try:
                self._read(sock, rest)
            except (OSError, OutOfStep) as exc:
                if self.state is not LinkState.CLOSED:
                    log.warning("engine port: link lost (%s); linking again", exc)
            finally:
                with self.cond:
                    if self.state is LinkState.LINKED:
                        self.state = LinkState.CONNECTING
                    self.sock = None
                with contextlib.suppress(OSError):
                    sock.close()
                self._fail_streams()
                self._drop_spares()  # the relay forgot them with the link
            time.sleep(RELINK_PAUSE)

    def _link(self) -> tuple[socket.socket | None, bytearray]:
        """Connect and handshake; (None, ...) once closed."""
        sock = self._connect(self.endpoint)
        with self.cond:
            if self.state is LinkState.CLOSED:
                sock.close()
                return None, bytearray()
            self.sock = sock
        buf = bytearray()
        sock.settimeout(HELLO_EVERY)
        try:
            while self.state is not LinkState.CLOSED:
                nonce = secrets.token_hex(8).encode()
                sock.sendall(hello_line(nonce))
                want = ready_line(nonce)
                deadline = time.monotonic() + HELLO_EVERY
                while time.monotonic() < deadline:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:
                        break
                    if not data:
                        raise ConnectionError("QEMU closed the engine port")
                    buf += data
                    at = buf.find(want)
                    if at >= 0:
                        sock.settimeout(None)
                        rest = buf[at + len(want):]
                        with self.cond:
                            if self.state is LinkState.CLOSED:
                                break
                            self.state = LinkState.LINKED
                            self.links += 1
                            self.cond.notify_all()
                        log.info("engine port: linked")
                        return sock, rest
                    del buf[:max(0, len(buf) - len(want))]
        except BaseException:
            with self.cond:
                self.sock = None
            sock.close()
            raise
        sock.close()
        return None, bytearray()

    def _read(self, sock: socket.socket, buf: bytearray) -> None:
        while True:
            for kind, sid, payload in parse(buf):
                self._frame(kind, sid, payload)
            data = sock.recv(1 << 18)
            if not data:
                raise ConnectionError("QEMU closed the engine port")
            buf += data

    def _frame(self, kind: Kind, sid: int, payload: bytes) -> None:
        with self.cond:
            s = self.streams.get(sid)
            if s is not None and s.conn is None and kind is not Kind.ACK:
                # a spare the guest ended before any client came (the engine restarted): dropped;
                # unless the relay dropped it first, it hears so with the next frames we send
                self.streams.pop(sid, None)
                self.spares.remove(s)
                self._keep_spares = False  # until a client is answered again
                if kind is not Kind.CLOSE:
                    self._closing.append(sid)
                log.debug("engine port: spare stream %d ended (%s)", sid, kind.name)
                return
        if s is None:
            return
        if kind is Kind.DATA:
            s.answered = True
            s.inbox.put(payload)
        elif kind is Kind.EOF:
            s.answered = True
            s.inbox.put(EOF)
        elif kind is Kind.ACK:
            with s.cond:
                s.credit += ACK.unpack(payload)[0]
                s.cond.notify_all()
        elif kind is Kind.CLOSE:
            self._close_stream(s)
        else:
            raise OutOfStep(f"the guest sent {kind.name}")

    def _send(self, data: bytes) -> None:
        with self.send_lock:
            sock = self.sock
            if sock is None:
                raise ConnectionError("the engine port is not linked")
            sock.sendall(data)

    def _fail_streams(self) -> None:
        with self.cond:
            streams = list(self.streams.values())
        for s in streams:
            self._close_stream(s)

    def _drop_spares(self) -> None:
        with self.cond:
            for s in self.spares:
                self.streams.pop(s.sid, None)
            self.spares.clear()
            self._closing.clear()
            self._keep_spares = False

    def _keep(self) -> None:
        """The spare keeper: tops the spares up once no client has come for ``SPARE_QUIET``."""
        with self.cond:
            while self.state is not LinkState.CLOSED:
                wanted = self.state is LinkState.LINKED and self._keep_spares and len(self.spares) < SPARE_STREAMS
                delay = self._quiet_at - time.monotonic()
                if not wanted:
                    self.cond.wait()
                elif delay > 0:
                    self.cond.wait(delay)
                else:
                    self.cond.release()
                    try:
                        self._top_up()
                    finally:
                        self.cond.acquire()

    def _new_stream(self, conn: Any) -> _Stream:
        """A stream with a fresh id, registered (with ``self.cond`` held)."""
        sid = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
        s = self.streams[sid] = _Stream(sid, conn)
        return s

    def _top_up(self) -> None:
        """Open spare streams up to ``SPARE_STREAMS`` (and send the CLOSEs owed for dead ones)."""
        with self.cond:
            if self.state is not LinkState.LINKED:
                return
            new = [self._new_stream(None) for _ in range(SPARE_STREAMS - len(self.spares))]
            self.spares += new
            closing, self._closing = self._closing, []
        if not new and not closing:
            return
        data = b"".join(frame(Kind.CLOSE, sid) for sid in closing) + b"".join(frame(Kind.OPEN, s.sid) for s in new)
        with contextlib.suppress(OSError):  # a link that failed drops its spares
            self._send(data)

    def _close_stream(self, s: _Stream) -> None:
        with s.cond:
            if s.closed:
                return
            s.closed = True
            s.cond.notify_all()
        s.inbox.put(CLOSED)

    # --- streams --------------------------------------------------------------------
    def forward(self, conn: Any, wait: float) -> None:
        """Carry one client connection to the engine until both ends are done; closes
        ``conn``. Raises AgentError when the link is not up within ``wait`` seconds."""
        if not self.wait_linked(wait):
            raise AgentError("the engine port in the VM is not answering")
        with self.cond:
            spare = self.spares.pop(0) if self.spares else None
            if spare is not None:
                spare.conn = conn
            s = spare or self._new_stream(conn)
            self._quiet_at = time.monotonic() + SPARE_QUIET
            self.cond.notify_all()  # the keeper waits for the quiet moment from now
        sid = s.sid
        if spare is None:
            try:
                self._send(frame(Kind.OPEN, sid))
            except OSError as exc:
                with self.cond:
                    self.streams.pop(sid, None)
                raise AgentError(f"the engine port failed: {exc}") from exc
        writer = self.workers.spawn(self._deliver, s, name=f"engine-stream-{sid}")
        try:
            self._pump_client(s)
        finally:
            writer.join()
            with self.cond:
                self.streams.pop(sid, None)
            with contextlib.suppress(OSError):
                conn.close()

    def _pump_client(self, s: _Stream) -> None:
        """The client's bytes to the guest, within the window; EOF when the client is done."""
        while True:
            with s.cond:
                s.cond.wait_for(lambda: s.credit > 0 or s.closed)
                if s.closed:
                    return
                want = min(s.credit, MAX_FRAME)
            try:
                data = s.conn.recv(want)
            except OSError:
                data = None
            try:
                if data:
                    with s.cond:
                        s.credit -= len(data)
                    self._send(frame(Kind.DATA, s.sid, data))
                    continue
                if s.closed:
                    return
                if data is None:
                    self._send(frame(Kind.CLOSE, s.sid))
                    self._close_stream(s)
                    return
                self._send(frame(Kind.EOF, s.sid))
                with s.cond:
                    s.eof_out = True
                    done = s.eof_in
                if done:  # both ways ended: the relay drops the stream too
                    self._close_stream(s)
            except OSError:
                self._close_stream(s)
            return

    def _deliver(self, s: _Stream) -> None:
        """The guest's bytes to the client, acknowledged ``ACK_EVERY`` bytes at a time once
        written (agent/engine_port.py says why not each write)."""
        unacked = 0
        while True:
            item = s.inbox.get()
            if isinstance(item, bytes):
                try:
                    s.conn.sendall(item)
                except OSError:
                    with contextlib.suppress(OSError):
                        self._send(frame(Kind.CLOSE, s.sid))
                    self._close_stream(s)
                    self._unblock(s.conn)
                    return
                unacked += len(item)
                if not self._keep_spares:  # the engine answers: spares can be kept
                    with self.cond:
                        self._keep_spares = True
                        self.cond.notify_all()
                if unacked >= ACK_EVERY:
                    with contextlib.suppress(OSError):
                        self._send(frame(Kind.ACK, s.sid, ACK.pack(unacked)))
                    unacked = 0
            elif item is EOF:
                _shutdown_write(s.conn)
                with s.cond:
                    s.eof_in = True
                    if not s.eof_out and not s.closed:
                        continue  # the client may still be sending: its reader ends the stream
                self._close_stream(s)
                return
            else:  # CLOSED: refused, reset, or the link went down
                if not s.answered and self._refused is not None:
                    self._refused(s.conn)
                self._unblock(s.conn)
                return

    @staticmethod
    def _unblock(conn: Any) -> None:
        """Wake the thread reading the client (a socket's recv returns; a pipe is closed)."""
        with contextlib.suppress(OSError):
            if isinstance(conn, socket.socket):
                conn.shutdown(socket.SHUT_RDWR)
            else:
                conn.close()


def _shutdown_write(conn: Any) -> None:
    with contextlib.suppress(OSError, EOFError, AttributeError):
        if isinstance(conn, socket.socket):
            conn.shutdown(socket.SHUT_WR)
        else:
            conn.shutdown_write()
