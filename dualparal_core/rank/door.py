"""Rank 0's door: the listening socket, the handshakes (at most MAX_HANDSHAKES at once, each bounded by the connect
timeout), and the parents that authenticated and wait to be served.

A waiting parent hears rank 0's heartbeats, the first one (with their interval) as soon as its handshake ends. So a
parent that attaches to a torchrun group while rank 0 loads its start-up model, or serves another parent, can tell
a frozen rank 0 (silence) from a long load (beats), before the group is ready and says its settings.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError

from .. import logger
from ..channel import KEY_ENV, authenticate, dumps

MAX_HANDSHAKES = 8
"""Connections authenticating at once; more are closed at once (a flood cannot pile up threads)."""


class Door:
    """``greeting()`` -> the heartbeat a parent gets when its handshake ends; ``send_lock`` is rank 0's one lock
    for sending (heartbeats come from their own thread)."""

    def __init__(self, serve: str, key: bytes, connect_s: float, send_lock: threading.Lock,
                 greeting: Callable[[], dict]):
        self.serve, self.key, self.connect_s, self.send_lock, self.greeting = serve, key, connect_s, send_lock, greeting
        self.handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.incoming: queue.Queue = queue.Queue()
        self.waiting: list = []  # authenticated, not served yet (under send_lock)

    def listen(self) -> None:
        host, _, port = self.serve.rpartition(":")
        host = (host or "127.0.0.1").strip("[]")
        try:
            self.server = socket.create_server((host, int(port)), backlog=16)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot listen on --serve {self.serve} ({exc}): the port is in use or the address "
                               f"is not on this host; pick another --serve address.") from None
        self.address = self.server.getsockname()[:2]
        self.wake_r, self.wake_w = os.pipe()
        threading.Thread(target=self._accept, name="dualparal-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.server.accept()
            except OSError:
                return
            if not self.handshakes.acquire(blocking=False):
                sock.close()
                logger.warning("refused a connection from %s: %d others are still authenticating", addr[0],
                               MAX_HANDSHAKES)
                continue
            threading.Thread(target=self._handshake, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _handshake(self, sock: socket.socket, who: str) -> None:
        try:
            conn = authenticate(sock, self.key, server=True, timeout=self.connect_s)
        except AuthenticationError:
            logger.warning("refused a connection from %s: it has another %s", who, KEY_ENV)
            return
        except (OSError, EOFError):
            logger.info("a connection from %s did not complete the handshake", who)
            return
        finally:
            self.handshakes.release()
        with self.send_lock:
            self.waiting.append(conn)
            self._send(conn, self.greeting())
        self.incoming.put((conn, who))
        os.write(self.wake_w, b"!")

    def next(self):
        """The next waiting parent ``(conn, who)``, no longer beaten to; queue.Empty when there is none."""
        conn, who = self.incoming.get_nowait()
        with self.send_lock:
            if conn in self.waiting:
                self.waiting.remove(conn)
        return conn, who

    def tell_waiting(self, msg: dict) -> None:
        """A heartbeat to every waiting parent (from the heartbeat thread)."""
        with self.send_lock:
            for conn in list(self.waiting):
                self._send(conn, msg)

    def _send(self, conn, msg: dict) -> None:
        try:
            conn.send_bytes(dumps(msg))
        except OSError:  # it left; the main thread finds its EOF when it dequeues it
            self.waiting.remove(conn)
