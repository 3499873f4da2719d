"""`python3 -m agent.engine_port`: the engine's own virtio-serial port, ``org.pydesk.engine``.

Every Docker API connection on the host (vmkit/engine_link.py) becomes a *stream* on this one
port, and the relay here connects each stream to the engine's unix socket. No sshd and no
encryption on the way: under TCG the guest's sshd cost more CPU than the engine itself during
a `docker run` loop, and a new SSH channel was a round trip through it per connection. The
port is reachable only through QEMU's chardev socket in the user's private runtime directory,
as the agent port is.

The wire, after a handshake (below), is frames: a 9-byte header ``kind, stream, length``
(``>BII``) and ``length`` bytes of payload.

- ``OPEN``  host -> guest: a new stream (ids are the host's); the relay connects it.
- ``DATA``  bytes for the stream's other end.
- ``EOF``   the sender's end will send no more; the receiver half-closes its socket.
- ``CLOSE`` the stream is gone (a refused connect, a reset); the receiver drops it.
- ``ACK``   payload ``>I``: that many bytes of this stream were written to their socket.

Flow control is per stream: a side sends at most ``WINDOW`` bytes not yet acknowledged, so a
client that stops reading (`logs -f | less`) holds up its own stream and nothing else, and
what waits in the relay is bounded. A receiver acknowledges once ``ACK_EVERY`` bytes (a
quarter of the window) have been written out since its last ACK, not after every write: an
API request and its answer are far smaller, and an ACK each way per request was two more
wake-ups of the emulated guest for nothing. This cannot stall a sender: one that has used up
its window has more than ``WINDOW - ACK_EVERY`` bytes queued at the receiver or on the way,
and writing them out crosses the threshold. A stream ends when both sides have sent EOF and
everything received was written out.

Handshake and recovery: a port keeps what an earlier session left in it. The host sends
``PYDESK-ENGINE <nonce>\\n`` (again every second until answered); the relay skips everything
up to such a line and answers ``PYDESK-ENGINE-READY <nonce>\\n``; the host skips up to its
own nonce. A frame of an unknown kind or an impossible length means the two sides are out of
step (a relay restarted, a second hello): the relay drops its streams and goes back to
looking for a hello line, in the bytes it already has; the host reconnects. A relay that
starts writes ``PYDESK-ENGINE-RESET\\n`` first, which a host still linked with its predecessor
reads as such a frame. When the host disconnects, reads return end-of-file: the relay drops
every stream and waits.

One thread and a selector: every socket is non-blocking, and nothing here waits for anything
but the selector (the guest is emulated; threads and context switches are what cost).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import re
import selectors
import socket
import struct
import sys
import time

log = logging.getLogger("pydesk.engine_port")

PORT_NAME = "org.pydesk.engine"
ENGINE_SOCKET = "/run/pydesk/engine.sock"
HEADER = struct.Struct(">BII")
ACK = struct.Struct(">I")
WINDOW = 256 * 1024  # unacknowledged bytes per stream and direction
ACK_EVERY = WINDOW // 4  # written bytes a receiver acknowledges at once (see above)
MAX_FRAME = 64 * 1024  # the largest DATA payload a side sends
MAX_LENGTH = WINDOW  # what a receiver accepts before calling the link out of step
HELLO = re.compile(rb"PYDESK-ENGINE ([0-9a-f]{8,64})\n")
#: What a starting relay writes first: to a host still linked with the relay before it, this
#: is a frame of an unknown kind, so the host links again instead of waiting on dead streams.
RESET_LINE = b"PYDESK-ENGINE-RESET\n"
CONNECT_WAIT = 60.0  # an OPEN while the engine is (re)starting waits this long for its socket
CONNECT_RETRY = 0.1


class Kind(enum.IntEnum):
    OPEN = 1
    DATA = 2
    EOF = 3
    CLOSE = 4
    ACK = 5


def frame(kind: Kind, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, len(payload)) + payload


def ready_line(nonce: bytes) -> bytes:
    return b"PYDESK-ENGINE-READY " + nonce + b"\n"


def hello_line(nonce: bytes) -> bytes:
    return b"PYDESK-ENGINE " + nonce + b"\n"


class OutOfStep(Exception):
    """The bytes on the link are not frames (a stale session, a restarted peer)."""


def parse(buf: bytearray) -> list[tuple[Kind, int, bytes]]:
    """Take the complete frames off the front of ``buf``."""
    out = []
    while len(buf) >= HEADER.size:
        kind, stream, length = HEADER.unpack_from(buf)
        if kind not in Kind._value2member_map_ or length > MAX_LENGTH:
            raise OutOfStep(f"kind {kind}, length {length}")
        if len(buf) < HEADER.size + length:
            break
        out.append((Kind(kind), stream, bytes(buf[HEADER.size:HEADER.size + length])))
        del buf[:HEADER.size + length]
    return out


class Stream:
    """One connection to the engine."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.sock: socket.socket | None = None  # None while connecting
        self.out = bytearray()  # from the host, not yet written to the socket
        self.credit = WINDOW  # what we may still send the host
        self.unacked = 0  # written to the socket, not yet acknowledged to the host
        self.eof_in = False  # the host sent EOF
        self.eof_out = False  # we sent EOF
        self.shut = False  # our socket's write side is closed
        self.deadline = time.monotonic() + CONNECT_WAIT
        self.events = 0


class Relay:
    """The guest side of the engine link, on an open port (any fd: tests use a socketpair)."""

    def __init__(self, port_fd: int, engine_socket: str = ENGINE_SOCKET) -> None:
        self.fd = port_fd
        self.engine_socket = engine_socket
        os.set_blocking(port_fd, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(port_fd, selectors.EVENT_READ, None)
        self.port_events = selectors.EVENT_READ
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.linked = False  # past the handshake
        self.streams: dict[int, Stream] = {}
        self.connecting: list[Stream] = []
        self.host_gone_at = 0.0
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self.wake_r, selectors.EVENT_READ, self)

    # --- the loop -------------------------------------------------------------------
    def run(self) -> None:
        """Serve until ``stop()``."""
        self._send(RESET_LINE)
        self._flush_port()
        while not self.stopping:
            timeout = None
            if self.connecting:
                timeout = CONNECT_RETRY
            if self.host_gone_at:
                timeout = 0.2  # no host: the port reads end-of-file until one connects
            for key, mask in self.sel.select(timeout):
                if key.data is None:
                    if mask & selectors.EVENT_WRITE:
                        self._flush_port()
                    if mask & selectors.EVENT_READ:
                        self._read_port()
                elif key.data is self:
                    os.read(self.wake_r, 64)
                else:
                    self._socket_ready(key.data, mask)
            if self.connecting:
                self._retry_connects()
            if self.host_gone_at and time.monotonic() - self.host_gone_at >= 0.2:
                self.host_gone_at = 0.0
                self._set_port_events(selectors.EVENT_READ)
            self._flush_port()
        self._reset()
        self.sel.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def stop(self) -> None:
        """End ``run()`` (from another thread); every stream is closed."""
        self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    # --- the port -------------------------------------------------------------------
    def _set_port_events(self, events: int) -> None:
        """Watch the port for ``events`` (0: not at all, while no host is connected)."""
        if events == self.port_events:
            return
        if not events:
            self.sel.unregister(self.fd)
        elif not self.port_events:
            self.sel.register(self.fd, events, None)
        else:
            self.sel.modify(self.fd, events, None)
        self.port_events = events

    def _send(self, data: bytes) -> None:
        self.outbuf += data

    def _flush_port(self) -> None:
        while self.outbuf:
            try:
                n = os.write(self.fd, self.outbuf)
            except BlockingIOError:
                break
            except OSError as exc:
                if self.linked:  # else: no host connected to take it (the reset line at start)
                    log.warning("engine port: write failed: %s", exc)
                self._reset()
                return
            del self.outbuf[:n]
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        if not self.host_gone_at:
            self._set_port_events(want)

    def _read_port(self) -> None:
        try:
            data = os.read(self.fd, 1 << 18)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            log.warning("engine port: read failed: %s", exc)
        if not data:  # no host connected: wait a little before looking again
            if self.linked:
                log.info("engine port: the host disconnected")
            self._reset()
            self.host_gone_at = time.monotonic()
            self._set_port_events(0)
            return
        self.inbuf += data
        self._process()

    def _process(self) -> None:
        while True:
            if not self.linked:
                m = HELLO.search(self.inbuf)
                if m is None:
                    del self.inbuf[:max(0, len(self.inbuf) - 80)]  # keep a partial line
                    return
                nonce = bytes(m.group(1))  # before the buffer under the match changes
                del self.inbuf[:m.end()]
                self.outbuf.clear()
                self._send(ready_line(nonce))
                self.linked = True
                log.info("engine port: linked")
            try:
                frames = parse(self.inbuf)
            except OutOfStep as exc:
                log.warning("engine port: out of step (%s): looking for a new hello", exc)
                self._reset(keep_input=True)
                continue
            for kind, sid, payload in frames:
                self._frame(kind, sid, payload)
            return

    def _reset(self, keep_input: bool = False) -> None:
        for s in list(self.streams.values()):
            self._drop(s)
        self.connecting.clear()
        self.linked = False
        self.outbuf.clear()
        if not keep_input:
            self.inbuf.clear()

    # --- frames ---------------------------------------------------------------------
    def _frame(self, kind: Kind, sid: int, payload: bytes) -> None:
        if kind is Kind.OPEN:
            if sid in self.streams:
                self._drop(self.streams[sid])
            s = self.streams[sid] = Stream(sid)
            if not self._connect(s):
                self.connecting.append(s)
            return
        s = self.streams.get(sid)
        if s is None:
            return  # a stream we dropped (its CLOSE crossed this frame)
        if kind is Kind.DATA:
            s.out += payload
            self._write_out(s)
        elif kind is Kind.EOF:
            s.eof_in = True
            self._write_out(s)
        elif kind is Kind.ACK:
            s.credit += ACK.unpack(payload)[0]
            self._update(s)
        elif kind is Kind.CLOSE:
            self._drop(s)

    # --- streams --------------------------------------------------------------------
    def _connect(self, s: Stream) -> bool:
        """Connect a stream's socket; False while the engine's socket is not there yet."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.engine_socket)
        except OSError as exc:
            sock.close()
            starting = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
            if starting and time.monotonic() < s.deadline:
                return False
            log.warning("engine port: the engine is not answering: %s", exc)
            self._send(frame(Kind.CLOSE, s.sid))
            self.streams.pop(s.sid, None)
            return True
        sock.setblocking(False)
        s.sock = sock
        self._write_out(s)
        return True

    def _retry_connects(self) -> None:
        waiting, self.connecting = self.connecting, []
        for s in waiting:
            if self.streams.get(s.sid) is s and not self._connect(s):
                self.connecting.append(s)

    def _update(self, s: Stream) -> None:
        if s.sock is None:
            return
        events = 0
        if s.credit > 0 and not s.eof_out:
            events |= selectors.EVENT_READ
        if s.out:
            events |= selectors.EVENT_WRITE
        if events == s.events:
            return
        if s.events == 0:
            self.sel.register(s.sock, events, s)
        elif events == 0:
            self.sel.unregister(s.sock)
        else:
            self.sel.modify(s.sock, events, s)
        s.events = events

    def _socket_ready(self, s: Stream, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._write_out(s)
        if mask & selectors.EVENT_READ and self.streams.get(s.sid) is s:
            self._read_in(s)

    def _read_in(self, s: Stream) -> None:
        assert s.sock is not None
        try:
            data = s.sock.recv(min(s.credit, MAX_FRAME))
        except BlockingIOError:
            return
        except OSError:
            self._send(frame(Kind.CLOSE, s.sid))
            self._drop(s)
            return
        if data:
            s.credit -= len(data)
            self._send(frame(Kind.DATA, s.sid, data))
        else:
            s.eof_out = True
            self._send(frame(Kind.EOF, s.sid))
        self._update(s)
        self._maybe_done(s)

    def _write_out(self, s: Stream) -> None:
        if s.sock is None:
            return
        written = 0
        while s.out:
            try:
                n = s.sock.send(s.out)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("engine port: stream %d: %s", s.sid, exc)
                self._send(frame(Kind.CLOSE, s.sid))
                self._drop(s)
                return
            del s.out[:n]
            written += n
        s.unacked += written
        if s.unacked >= ACK_EVERY:
            self._send(frame(Kind.ACK, s.sid, ACK.pack(s.unacked)))
            s.unacked = 0
        if s.eof_in and not s.out and not s.shut:
            s.shut = True
            with contextlib.suppress(OSError):
                s.sock.shutdown(socket.SHUT_WR)
        self._update(s)
        self._maybe_done(s)

    def _maybe_done(self, s: Stream) -> None:
        if s.eof_in and s.eof_out and not s.out:
            self._drop(s)

    def _drop(self, s: Stream) -> None:
        if self.streams.get(s.sid) is s:
            del self.streams[s.sid]
        if s.sock is not None:
            if s.events:
                self.sel.unregister(s.sock)
                s.events = 0
            s.sock.close()
            s.sock = None


def main() -> int:
    from agent.shareport import ShareError, find_port  # POSIX-only imports: the host imports this module

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        fd = os.open(find_port(PORT_NAME), os.O_RDWR | os.O_CLOEXEC)
    except (ShareError, OSError) as exc:
        log.error("%s", exc)
        time.sleep(5)  # init respawns us; do not spin
        return 1
    Relay(fd).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
