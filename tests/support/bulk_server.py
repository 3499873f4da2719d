"""A TCP server for transfer tests, run by the test `python` image inside a container.

Per connection, the first line is the command: ``GET N`` sends N bytes of the pattern
below and closes; ``PUT`` reads to EOF and answers with the SHA-256 of what it got;
``PING`` answers ``PONG``. Listens on port 7000 or argv[1]. Stdlib only, so it runs in the
minimal python image (and in the guest itself, for the benchmark's raw-forward peer).
"""
import hashlib
import socket
import sys
import threading

BLOCK = bytes(range(256)) * 4096  # 1 MiB, the same pattern the tests expect


def handle(conn):
    with conn:
        f = conn.makefile("rb")
        cmd = f.readline().split()
        if not cmd:
            return
        if cmd[0] == b"GET":
            left = int(cmd[1])
            while left > 0:
                n = min(left, len(BLOCK))
                conn.sendall(BLOCK[:n])
                left -= n
        elif cmd[0] == b"PUT":
            h = hashlib.sha256()
            total = 0
            while True:
                data = f.read1(1 << 20)
                if not data:
                    break
                h.update(data)
                total += len(data)
            conn.sendall(b"%d %s\n" % (total, h.hexdigest().encode()))
        elif cmd[0] == b"PING":
            conn.sendall(b"PONG\n")


def main():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 7000))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


main()
