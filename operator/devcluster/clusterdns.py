"""Cluster DNS for the pods of real nodes: ``<service>.<namespace>.svc.cluster.local``.

A real cluster runs CoreDNS; clients in pods rely on it (kopf logs in to
``https://kubernetes.default.svc``, users address ``http://<model>.<ns>.svc...``). This is
the smallest stand-in: a UDP server on the host's end of a node's link (the address the
kubelet gives pods as their nameserver) that answers A queries for Services with their
ClusterIP, looked up through the API, and NXDOMAIN for everything else. It forwards
nothing: no query leaves this machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socketserver
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

DOMAIN = "cluster.local"
_TTL_S = 5
_CACHE_S = 2.0
_A, _IN = 1, 1

Lookup = Callable[[str, str], str | None]  # (service, namespace) -> ClusterIP or None


class ClusterDns:
    """Serves until :meth:`stop`; ``lookup`` finds a Service's ClusterIP."""

    def __init__(self, address: str, lookup: Lookup, port: int = 53):
        self._lookup = lookup
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._guard = threading.Lock()
        dns = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                with contextlib.suppress(Exception):  # a malformed query gets no answer
                    sock.sendto(dns.answer(data), self.client_address)

        self._server = socketserver.ThreadingUDPServer((address, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=f"cluster-dns-{address}")
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, query: bytes) -> bytes:
        """The reply to one DNS query (one question, as stub resolvers send)."""
        ident, flags, count = struct.unpack("!HHH", query[:6])
        labels, offset = [], 12
        while query[offset]:
            length = query[offset]
            labels.append(query[offset + 1:offset + 1 + length].decode("ascii").lower())
            offset += 1 + length
        qtype, qclass = struct.unpack("!HH", query[offset + 1:offset + 5])
        question = query[12:offset + 5]
        address = self.resolve(labels) if count == 1 else None
        rcode = 0 if address is not None else 3  # NXDOMAIN
        answers = b""
        if address is not None and qtype == _A and qclass == _IN:
            answers = struct.pack("!HHHIH", 0xC00C, _A, _IN, _TTL_S, 4) + \
                ipaddress.IPv4Address(address).packed
        reply_flags = 0x8400 | (flags & 0x0100) | rcode  # response, authoritative, RD copied
        header = struct.pack("!HHHHHH", ident, reply_flags, 1, 1 if answers else 0, 0, 0)
        return header + question + answers

    def resolve(self, labels: list[str]) -> str | None:
        """``service.namespace.svc[.cluster.local]`` -> ClusterIP; None for anything else."""
        name = ".".join(labels)
        for suffix in (f".svc.{DOMAIN}", ".svc"):
            if name.endswith(suffix):
                parts = name.removesuffix(suffix).split(".")
                if len(parts) == 2:
                    return self._cached(parts[0], parts[1])
        return None

    def _cached(self, service: str, namespace: str) -> str | None:
        key = (service, namespace)
        now = time.monotonic()
        with self._guard:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < _CACHE_S:
            return hit[1]
        found = self._lookup(service, namespace)
        if found in ("", "None"):
            found = None
        with self._guard:
            self._cache[key] = (now, found)
        return found


__all__ = ["DOMAIN", "ClusterDns"]
