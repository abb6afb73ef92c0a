"""A loopback TCP proxy that can hold back a client's command, for fault injection.

It sits between the connector and a real server (Dovecot) and forwards bytes both ways, watching
the client's side.  When the client sends a line that starts with ``hold_command`` (``b"QUIT"``),
the proxy stops forwarding that direction and sets ``held``: the client now waits for an answer that
will never come, at a known instant, and a test can kill it there.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class HoldingProxy:
    def __init__(self, upstream: tuple[str, int], hold_command: bytes | None = None) -> None:
        self.upstream = upstream
        self.hold_command = hold_command
        self.held = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> HoldingProxy:
        self._accept_thread.start()
        return self

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._socks += [client, server]
            for src, dst, watch in ((client, server, True), (server, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, watch), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if watch and self.hold_command is not None:
                    pending = (pending + data)[-4096:]
                    idx = _line_start_index(pending, self.hold_command)
                    if idx is not None:
                        # Forward what came before the held command, then go silent.
                        before = len(data) - (len(pending) - idx)
                        if before > 0:
                            dst.sendall(data[:before])
                        self.held.set()
                        return
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=5)


def _line_start_index(buf: bytes, command: bytes) -> int | None:
    """Index of ``command`` at the start of a line in ``buf`` (case-insensitive), or None."""
    upper = buf.upper()
    if upper.startswith(command):
        return 0
    idx = upper.find(b"\n" + command)
    return None if idx < 0 else idx + 1
