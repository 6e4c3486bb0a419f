"""The authenticated socket between a parent and rank 0 of a torchrun-started group (both ends use it).

multiprocessing's mutual HMAC challenge with the shared secret of DUALPARAL_AUTHKEY, on a plain socket so that the
connect and the handshake are bounded (a silent peer or a foreign service blocks no one), with TCP keep-alive so that
a peer whose host vanished is noticed. The channel then carries pickles: the key is as good as a login on the hosts.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

from .config import Timeouts
from .protocol import AttachError

KEY_ENV = "DUALPARAL_AUTHKEY"
CONNECT_S = Timeouts.connect
"""Default bound on the TCP connect and on the authentication handshake (``Timeouts.connect``)."""


def dumps(msg: dict) -> bytes:
    """A message for an authenticated connection (only ever unpickled after the peer proved it has the key)."""
    return pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> dict:
    return pickle.loads(data)


def parse_address(text: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` or ``HOST:PORT`` (``[v6]:PORT``) -> (host, port); ValueError naming the form."""
    raw = str(text).strip()
    s = raw[6:] if raw.lower().startswith("tcp://") else raw
    host, _, port = s.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise ValueError(f"{raw!r} is not a group address; write it as tcp://HOST:PORT (the --serve address of "
                         f"the torchrun-started group).")
    return host, int(port)


def load_key(authkey: bytes | str | None = None) -> bytes:
    """The shared secret: ``authkey``, else the DUALPARAL_AUTHKEY environment variable (required)."""
    key = authkey if authkey is not None else os.environ.get(KEY_ENV, "")
    key = key.encode() if isinstance(key, str) else bytes(key)
    if not key:
        raise AttachError(f"{KEY_ENV} is not set: put the secret the group was started with into this process's "
                          f"environment (e.g. `export {KEY_ENV}=...` before starting ComfyUI). Generate one with "
                          f"`python -c \"import secrets; print(secrets.token_hex(32))\"`.")
    return key


def keepalive(sock: socket.socket) -> None:
    """TCP keep-alive probes: a peer whose host vanished (no FIN) is noticed within about a minute."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def authenticate(sock: socket.socket, key: bytes, *, server: bool, timeout: float = CONNECT_S) -> Connection:
    """multiprocessing's mutual HMAC challenge on a connected socket, bounded by ``timeout`` (a silent peer cannot
    block the caller); returns the Connection. Raises AuthenticationError (wrong key), EOFError or OSError."""
    sock.settimeout(None)
    keepalive(sock)
    conn = Connection(os.dup(sock.fileno()))
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked on the dup'ed descriptor
        except OSError:
            pass

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    timer.start()
    try:
        if server:
            deliver_challenge(conn, key)
            answer_challenge(conn, key)
        else:
            answer_challenge(conn, key)
            deliver_challenge(conn, key)
        if fired.is_set():
            raise TimeoutError("handshake timed out")
    except BaseException:
        conn.close()
        raise
    finally:
        timer.cancel()
        sock.close()
    return conn
