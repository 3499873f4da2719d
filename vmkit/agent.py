"""The host end of the agent channel: SSH (paramiko) over the virtio-serial port.

In the guest, OpenSSH runs in inetd mode on the port and is restarted after every
disconnect. Here one ``AgentChannel`` holds the single SSH connection the port allows and
multiplexes everything over it. It reconnects by itself: when the transport dies (the
agent restarted, the guest rebooted, a previous daemon left mid-session) a watcher thread
reconnects with backoff, and every call waits for a live connection up to its deadline.

Lima's virtio-serial agent was "sometimes unreachable" after restarts (lima#2064): bytes
left over from a previous session can reach a fresh sshd and break its handshake. We treat
any handshake failure as retryable — closing our end makes the guest drop that sshd and
start a clean one — and the test suite proves it over many start/stop cycles.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paramiko

from vmkit.errors import AgentError, AgentTimeout, ChannelStuck
from vmkit.spec import Endpoint
from vmkit.transport import connect_endpoint

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0
HEALTH_INTERVAL = 15.0  # seconds between keepalives on an idle connection
HEALTH_TIMEOUT = 10.0
OPEN_TIMEOUT = 5.0  # one try at opening a channel
EXEC_TIMEOUT = 15.0  # for sshd to answer an exec request (it only forks)
RESEND_FIRST = 0.5  # seconds before the greeting is sent again, doubling up to RESEND_MAX
RESEND_MAX = 2.0
CLOSED_PAUSE = 1.0  # seconds without a connection after an unanswered greeting
#: AES-GCM first: one AEAD pass in OpenSSL instead of AES-CTR plus a separate HMAC (about
#: 15 % more through a nested `vm shell` under TCG here); encrypt-then-MAC otherwise. CBC is
#: left out: given bytes that are not SSH (a greeting meant for its successor), OpenSSH reads
#: on for up to 256 KiB before dropping a CBC session, holding the agent port all that time.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
INNER_SSHD = "exec /usr/sbin/sshd -i -f /etc/pydesk/sshd_config"


class PinnedHostKey(paramiko.MissingHostKeyPolicy):
    """Refuse every host key but ours."""

    def __init__(self, expected: paramiko.PKey) -> None:
        self.expected = expected

    def check(self, key: paramiko.PKey) -> None:
        if key.get_base64() != self.expected.get_base64():
            raise AgentError("the guest presented an unexpected SSH host key")


def load_public_key(path: Path) -> paramiko.PKey:
    kind, data = path.read_text().split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


class Transport(paramiko.Transport):
    """paramiko's Transport plus OpenSSH's ``direct-streamlocal@openssh.com`` channels (a
    connection to a unix socket on the server), which paramiko does not offer. open_channel
    writes no type-specific fields for unknown channel types, so we append the socket path
    to that one CHANNEL_OPEN message on its way out (marked per thread)."""

    _pending = threading.local()

    def _send_user_message(self, data: paramiko.Message) -> None:  # type: ignore[override]
        path = getattr(self._pending, "path", None)
        if path is not None:
            self._pending.path = None
            data.add_string(path)
            data.add_string("")  # reserved
            data.add_int(0)  # reserved
        super()._send_user_message(data)

    def open_streamlocal(self, path: str, timeout: float | None = None) -> paramiko.Channel:
        self._pending.path = path
        try:
            return self.open_channel("direct-streamlocal@openssh.com", timeout=timeout)
        finally:
            self._pending.path = None


def open_transport(sock: socket.socket, client_key: paramiko.PKey, host_key: paramiko.PKey,
                   timeout: float) -> Transport:
    """Run the SSH handshake on an already connected stream."""
    t = Transport(sock)
    options = t.get_security_options()
    options.ciphers = CIPHERS
    options.digests = MACS
    t.banner_timeout = timeout
    t.handshake_timeout = timeout
    t.auth_timeout = timeout
    try:
        t.start_client(timeout=timeout)
        PinnedHostKey(host_key).check(t.get_remote_server_key())
        t.auth_publickey("root", client_key)
    except BaseException:
        t.close()
        raise
    return t


class GreetingTimeout(TimeoutError):
    """No PYDESK-READY came back for any of our greetings."""


def greet(sock: socket.socket, timeout: float) -> None:
    """The guest starts a fresh sshd only after this handshake (see guest agent-port).

    We send ``PYDESK-HELLO <nonce>`` and skip everything until ``PYDESK-READY <nonce>``
    comes back, then send ``PYDESK-GO <nonce>``, after which the port belongs to sshd. No
    byte of an earlier session reaches the SSH handshake, in either direction.

    The HELLO is sent again, with a new nonce, until it is answered: the sshd of a previous
    connection may still be reading the port (a guest that was slow to see the old host end
    go away sees only the new one) and swallow it. That sshd quits on bytes that are not
    SSH (see ``CIPHERS``) and the next HELLO reaches the guest's loop. Only the
    newest nonce counts, and the guest starts sshd only on the GO for the HELLO it answered
    last, so a late READY never lets the two sides disagree about where SSH begins."""
    deadline = time.monotonic() + timeout
    interval = RESEND_FIRST
    sent = 0
    try:
        while (left := deadline - time.monotonic()) > 0:
            nonce = secrets.token_hex(8)
            sock.sendall(f"\nPYDESK-HELLO {nonce}\n".encode())
            sent += 1
            if _await_line(sock, f"PYDESK-READY {nonce}\n".encode(), time.monotonic() + min(interval, left)):
                sock.sendall(f"PYDESK-GO {nonce}\n".encode())
                log.debug("the guest answered greeting %d", sent)
                return
            interval = min(interval * 2, RESEND_MAX)
    finally:
        sock.settimeout(None)
    raise GreetingTimeout("the guest did not answer the greeting")


def _await_line(sock: socket.socket, want: bytes, until: float) -> bool:
    """Read byte by byte (what follows the line belongs to sshd) until ``want`` ends a
    line; False when ``until`` passes first."""
    line = b""
    while not line.endswith(want):
        left = until - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            b = sock.recv(1)
        except TimeoutError:
            return False
        if not b:
            raise EOFError("the agent port closed during the greeting")
        line = b"" if b == b"\n" and not (line + b).endswith(want) else line + b
        if len(line) > 65536:
            line = line[-len(want):]
    return True


@contextlib.contextmanager
def _watchdog(chan: paramiko.Channel, seconds: float, what: str,
              error: type[AgentTimeout] = AgentTimeout) -> Iterator[None]:
    """Close ``chan`` if the block still waits after ``seconds``, and raise ``error``.

    paramiko waits without a timeout for the answer to a channel request
    (``exec_command``) and for the exit status (``recv_exit_status``); ``settimeout`` covers
    only reads (paramiko#2599). A guest sshd that never answered an exec once held `vm start`
    for good. Closing the channel marks it closed, which wakes both waits."""
    fired = threading.Event()

    def fire() -> None:
        fired.set()
        try:
            chan.close()
        except (paramiko.SSHException, EOFError, OSError) as exc:  # the connection is gone too
            log.debug("closing a channel after %s: %s", what, exc)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except (paramiko.SSHException, EOFError, OSError) as exc:
        if fired.is_set():
            raise error(f"{what}: no answer from the guest in {seconds:g}s") from exc
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise error(f"{what}: no answer from the guest in {seconds:g}s")


def exec_command(chan: paramiko.Channel, command: str, timeout: float) -> None:
    """``chan.exec_command`` that gives up after ``timeout`` seconds with ChannelStuck: sshd
    only forks to answer, so no answer means the connection is stuck."""
    with _watchdog(chan, timeout, "starting a guest command", ChannelStuck):
        chan.exec_command(command)


def exit_status(chan: paramiko.Channel, timeout: float) -> int:
    """``chan.recv_exit_status`` that gives up after ``timeout`` seconds (AgentTimeout)."""
    with _watchdog(chan, timeout, "waiting for a guest command"):
        return chan.recv_exit_status()


class AgentChannel:
    """The daemon's one SSH connection to the guest."""

    def __init__(self, endpoint: Endpoint, client_key: Path, host_key_pub: Path, name: str = "default") -> None:
        self.endpoint = endpoint
        self.client_key = paramiko.Ed25519Key.from_private_key_file(str(client_key))
        self.host_key = load_public_key(host_key_pub)
        self.log = log.getChild(name)
        self._transport: Transport | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._watcher: threading.Thread | None = None
        self.connects = 0
        #: Called with the new transport after every (re)connect, before it is handed out.
        self.on_connect: list[Callable[[Transport], None]] = []

    # --- connection -----------------------------------------------------------------
    def _attempt(self, timeout: float) -> paramiko.Transport:
        sock = connect_endpoint(self.endpoint, timeout=min(timeout, 5))
        try:
            greet(sock, timeout)
            return open_transport(sock, self.client_key, self.host_key, timeout)
        except BaseException:
            sock.close()
            raise

    def connect(self, deadline: float, alive: Callable[[], bool] = lambda: True,
                attempt_timeout: float = ATTEMPT_TIMEOUT) -> None:
        """Connect (or reconnect) before ``deadline`` (time.monotonic()); gives up early
        when ``alive()`` says the VM is gone.

        Each attempt has its own, growing, timeout: a previous session's sshd that waits for
        the rest of a packet takes our greetings as that rest and never answers; dropping
        the attempt lets the guest see the port close, which ends that sshd."""
        delay = 0.05
        last: BaseException | None = None
        while not self._closed:
            if not alive():
                raise AgentError("the VM stopped while connecting to its agent")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentTimeout(f"the guest agent did not answer ({last or 'no reply'})",
                                   hint="see `pydesk vm logs`")
            try:
                t = self._attempt(min(remaining, attempt_timeout))
                try:
                    for hook in self.on_connect:
                        hook(t)
                except BaseException:
                    t.close()  # the port takes one connection: never leave a half-set-up one open
                    raise
            except (OSError, EOFError, paramiko.SSHException, AgentError) as exc:
                last = exc
                attempt_timeout *= 2
                # no port to connect to (QEMU starting or gone) is routine; the rest is news
                routine = isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
                self.log.log(logging.DEBUG if routine else logging.INFO,
                             "agent connect attempt failed: %s", str(exc) or type(exc).__name__)
                # After an unanswered greeting, stay away long enough for a slow guest to see
                # the port closed: that is what ends a previous session's sshd (see above).
                pause = max(delay, CLOSED_PAUSE) if isinstance(exc, GreetingTimeout) else delay
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.5)
                continue
            with self._lock:
                old, self._transport = self._transport, t
                self.connects += 1
                self._changed.notify_all()
            if old is not None:
                old.close()
            self.log.debug("agent connected (connection %d)", self.connects)
            self._start_watcher()
            return
        raise AgentError("agent channel closed")

    def _start_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="agent-watch", daemon=True)
            self._watcher.start()

    def _healthy(self, t: Transport, timeout: float = 0.0) -> bool:
        """A keepalive that must be answered. A transport can look alive yet be stuck: when
        the guest's sshd dies, the fresh one's banner lands inside our encrypted stream, and
        depending on the bytes paramiko may wait forever for the rest of a "packet"."""
        done = threading.Event()

        def ping() -> None:
            try:
                t.global_request("keepalive@openssh.com", wait=True)
            finally:
                done.set()

        threading.Thread(target=ping, name="agent-ping", daemon=True).start()
        return done.wait(timeout or HEALTH_TIMEOUT) and t.is_active()

    def _watch(self) -> None:
        """Reconnect as soon as the transport dies or stops answering, while we are open."""
        while not self._closed:
            t = self._transport
            if t is not None:
                # a Transport is a thread: it ends with the connection
                while t.is_alive() and not self._closed:
                    t.join(HEALTH_INTERVAL)
                    if t.is_alive() and not self._closed and not self._healthy(t):
                        self.log.warning("agent connection stopped answering; dropping it")
                        t.close()
            if self._closed:
                return
            self.log.info("agent connection lost; reconnecting")
            try:
                self.connect(time.monotonic() + 3600)
            except AgentError:
                return

    def transport(self, timeout: float = 30.0) -> paramiko.Transport:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._closed:
                t = self._transport
                if t is not None and t.is_active():
                    return t
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(min(remaining, 0.2))
        raise AgentTimeout("the guest agent is not reachable", hint="check `pydesk vm status` and `pydesk vm logs`")

    @property
    def connected(self) -> bool:
        t = self._transport
        return t is not None and t.is_active()

    # --- use -----------------------------------------------------------------------------
    def _open(self, opener: Callable[[Transport, float], paramiko.Channel], timeout: float) -> paramiko.Channel:
        """Open a channel, riding out a connection that turns out to be dead or stuck: each
        try has a short timeout; a connection that then fails a keepalive is dropped, and we
        wait for the watcher's reconnect, until ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            t = self.transport(max(0.1, deadline - time.monotonic()))
            try:
                return opener(t, max(0.1, min(OPEN_TIMEOUT, deadline - time.monotonic())))
            except paramiko.ChannelException as exc:
                # sshd answered and refused (e.g. nothing listens on the unix socket yet): the
                # connection is fine; the caller decides whether to wait for the target
                raise AgentError(f"the guest refused the channel: {exc}") from exc
            except (paramiko.SSHException, EOFError, OSError, ChannelStuck) as exc:
                if time.monotonic() >= deadline:
                    raise AgentError(f"cannot open a channel to the guest agent: {exc}") from exc
                self.log.info("channel open failed (%s); checking the connection", exc)
                if t.is_active() and not self._healthy(t, OPEN_TIMEOUT):
                    t.close()  # the watcher reconnects
                time.sleep(0.1)

    def exec(self, command: str, *, input: bytes | None = None, timeout: float = 60.0) -> tuple[int, bytes, bytes]:
        """Run ``command`` in the guest; returns (exit status, stdout, stderr)."""
        chan = self._open(lambda t, to: t.open_session(timeout=to), timeout)
        try:
            chan.settimeout(timeout)
            exec_command(chan, command, min(timeout, EXEC_TIMEOUT))
            if input:
                chan.sendall(input)
            chan.shutdown_write()
            err = bytearray()

            def drain_stderr() -> None:
                while data := chan.recv_stderr(65536):
                    err.extend(data)

            t = threading.Thread(target=drain_stderr, daemon=True)
            t.start()
            out = bytearray()
            while data := chan.recv(65536):
                out += data
            t.join(timeout)
            return exit_status(chan, timeout), bytes(out), bytes(err)
        except socket.timeout as exc:
            raise AgentTimeout(f"guest command timed out after {timeout:g}s: {command}") from exc
        finally:
            chan.close()

    def open_inner_sshd(self, timeout: float = 30.0) -> paramiko.Channel:
        """A channel running a fresh ``sshd -i``: a whole SSH server for one client (the
        CLI's `vm shell`), carried inside our connection."""
        def opener(t: Transport, to: float) -> paramiko.Channel:
            chan = t.open_session(timeout=to)
            try:
                exec_command(chan, INNER_SSHD, EXEC_TIMEOUT)
            except BaseException:
                chan.close()
                raise
            return chan

        return self._open(opener, timeout)

    def open_unix(self, path: str, timeout: float = 30.0) -> paramiko.Channel:
        """A stream to the unix socket ``path`` in the guest (sshd forwards it in-process)."""
        return self._open(lambda t, to: t.open_streamlocal(path, timeout=to), timeout)

    def release(self) -> dict:
        rc, out, err = self.exec("cat /etc/pydesk-release; uname -r", timeout=20)
        if rc != 0:
            raise AgentError(f"guest release query failed: {err.decode(errors='replace').strip()}")
        lines = out.decode().splitlines()
        info = json.loads(lines[0])
        info["kernel"] = lines[1] if len(lines) > 1 else ""
        return info

    def close(self) -> None:
        with self._lock:
            self._closed = True
            t, self._transport = self._transport, None
            self._changed.notify_all()
        if t is not None:
            t.close()
