"""The authenticated socket between a parent and a group's ranks (both ends use it), and where a parent may attach.

A mutual HMAC-SHA256 proof over both sides' nonces with the shared secret (DUALPARAL_AUTHKEY; a random one per
local pool), the connecting side checking the listener's proof before it gives its own: a port that a shared
workflow points us at learns nothing about the key. On a plain socket, so that the connect and the handshake are
bounded (a silent peer or a foreign service blocks no one), with TCP keep-alive so that a peer whose host vanished
is noticed. The channel then carries pickles: the key is as good as a login on the hosts. A parent attaches only to
addresses in DUALPARAL_ATTACH_ALLOW (loopback when unset): a workflow cannot make ComfyUI connect anywhere else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import pickle
import socket
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection

from .config import Timeouts
from .devices import parse_address  # noqa: F401 - the address grammar lives with the devices grammar
from .protocol import AttachError

KEY_ENV = "DUALPARAL_AUTHKEY"
CONNECT_S = Timeouts.connect
"""Default bound on the TCP connect and on the authentication handshake (``Timeouts.connect``)."""


def dumps(msg: dict) -> bytes:
    """A message for an authenticated connection (only ever unpickled after the peer proved it has the key)."""
    return pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> dict:
    return pickle.loads(data)


ALLOW_ENV = "DUALPARAL_ATTACH_ALLOW"


def _allowed_nets(text: str):
    nets = []
    for item in text.replace(";", ",").split(","):
        if item.strip():
            try:
                nets.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise AttachError(f"{ALLOW_ENV}={text!r}: {item.strip()!r} is not an address or network; write "
                                  f"e.g. 10.0.0.5,192.168.1.0/24 (loopback is always allowed).") from None
    return nets


def check_allowed(host: str, port: int, env=None) -> None:
    """Refuse (AttachError, before any connection) an address outside DUALPARAL_ATTACH_ALLOW; every address the
    name resolves to must be allowed. The error is the same whatever listens there."""
    env = os.environ if env is None else env
    nets = _allowed_nets(env.get(ALLOW_ENV, ""))
    try:
        addrs = {ipaddress.ip_address(a[4][0].split("%")[0]) for a in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError):
        addrs = set()
    if addrs and all(a.is_loopback or any(a in n for n in nets) for a in addrs):
        return
    raise AttachError(f"tcp://{host}:{port} is not an address this ComfyUI may attach to: only loopback, and what "
                      f"the server's owner lists in {ALLOW_ENV} (e.g. `export {ALLOW_ENV}=10.0.0.5` where ComfyUI "
                      f"runs), are allowed; nothing was contacted.")


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


NONCE = 32
_OK, _FAIL = b"#OK", b"#FAIL"


def _mac(key: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(key, b"dualparal/" + role + client_nonce + server_nonce, hashlib.sha256).digest()


def _prove_client(conn: Connection, key: bytes) -> None:
    """The connecting side: it sends its nonce, checks the server's proof over both nonces, and only then proves
    itself. A server that does not know the key (a port a shared workflow pointed us at) gets no MAC of anything."""
    nc = os.urandom(NONCE)
    conn.send_bytes(nc)
    reply = conn.recv_bytes(NONCE + 64)
    ns, proof = reply[:NONCE], reply[NONCE:]
    if len(ns) != NONCE or not hmac.compare_digest(proof, _mac(key, b"server", nc, ns)):
        raise AuthenticationError("the peer does not know the key")
    conn.send_bytes(_mac(key, b"client", nc, ns))
    if conn.recv_bytes(16) != _OK:
        raise AuthenticationError("the peer refused our proof")


def _prove_server(conn: Connection, key: bytes) -> None:
    """The listening side: its proof covers a nonce of its own, so a client cannot get a MAC of data it chose,
    and the roles are labelled, so no proof of one side serves as the other's."""
    nc = conn.recv_bytes(NONCE)
    if len(nc) != NONCE:
        raise AuthenticationError("not a DualParal hello")
    ns = os.urandom(NONCE)
    conn.send_bytes(ns + _mac(key, b"server", nc, ns))
    if not hmac.compare_digest(conn.recv_bytes(64), _mac(key, b"client", nc, ns)):
        conn.send_bytes(_FAIL)
        raise AuthenticationError("the peer does not know the key")
    conn.send_bytes(_OK)


def authenticate(sock: socket.socket, key: bytes, *, server: bool, timeout: float = CONNECT_S) -> Connection:
    """A mutual HMAC-SHA256 proof over both sides' nonces on a connected socket, bounded by ``timeout`` (a silent
    peer cannot block the caller); returns the Connection. Raises AuthenticationError (wrong key), EOFError or
    OSError (also for an oversized message: every read of the handshake is bounded)."""
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
        (_prove_server if server else _prove_client)(conn, key)
        if fired.is_set():
            raise TimeoutError("handshake timed out")
    except BaseException:
        conn.close()
        raise
    finally:
        timer.cancel()
        sock.close()
    return conn
