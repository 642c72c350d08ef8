"""A requests session whose requests in flight another thread can abort: what *Cancel* needs.

A worker thread waiting for the server's inference reply sits in a blocking ``recv`` that no flag can interrupt, and
the read timeout is minutes long (inference on a CPU server). :meth:`AbortableSession.abort` shuts down every socket
the session has opened: the blocked call fails at once with a connection error, the worker unwinds, and the server
sees the client disconnect. The sockets are recorded where urllib3 opens them (``HTTPConnection._new_conn``, present
in urllib3 1.26 and 2.x), through connection-pool classes private to the session.

The session is meant for one task: after :meth:`abort` every new request fails at once.
"""

from __future__ import annotations

import socket
import threading
import weakref

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = ["AbortableSession", "Aborted"]


class Aborted(requests.ConnectionError):
    """The request was aborted by :meth:`AbortableSession.abort` (the user cancelled)."""


def _pool_classes(register):
    """HTTP(S) pool classes whose connections report every socket they open to ``register``."""

    class Connection(HTTPConnection):
        def _new_conn(self):
            sock = super()._new_conn()
            register(sock)
            return sock

    class SecureConnection(HTTPSConnection):
        def _new_conn(self):
            sock = super()._new_conn()
            register(sock)
            return sock

    class Pool(HTTPConnectionPool):
        ConnectionCls = Connection

    class SecurePool(HTTPSConnectionPool):
        ConnectionCls = SecureConnection

    return {"http": Pool, "https": SecurePool}


class _TrackingAdapter(HTTPAdapter):
    def __init__(self, register, **kwargs):
        self._register = register
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._register)


class AbortableSession(requests.Session):
    """A ``requests.Session`` with :meth:`abort` (thread-safe; call it from the GUI thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._aborted = threading.Event()
        adapter = _TrackingAdapter(self._register)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    @property
    def aborted(self) -> bool:
        return self._aborted.is_set()

    def _register(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self._aborted.is_set():  # aborted while this connection was being opened
            self._shutdown(sock)

    @staticmethod
    def _shutdown(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed or never connected

    def request(self, *args, **kwargs):
        if self._aborted.is_set():
            raise Aborted("the request was cancelled")
        return super().request(*args, **kwargs)

    def abort(self) -> int:
        """Break every connection of the session now; returns how many sockets were shut down."""
        self._aborted.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._shutdown(sock)
        return len(sockets)
