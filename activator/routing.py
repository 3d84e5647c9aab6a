"""Pure parts of the proxy: which model a Host header names, which headers travel, which
pods are ready and where they listen, and round robin over them. No I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from modelyard.contract import SCHEME_ANNOTATION

# The runtime's port when its container names none ``http`` (the runtime image's default).
DEFAULT_PORT = 8080


@dataclass(frozen=True, order=True)
class ModelRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class Endpoint:
    ip: str
    port: int
    scheme: str = "http"  # "https" for a model serving TLS only (spec.tls)

    @property
    def url(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.scheme}://{host}:{self.port}"


_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def parse_host(host: str | None, cluster_domain: str = "cluster.local") -> ModelRef | None:
    """The model a Host header names, or None when it names no Service.

    ``NAME.NAMESPACE``, ``NAME.NAMESPACE.svc`` and ``NAME.NAMESPACE.svc.<cluster domain>``,
    case-insensitive, with or without a port or a final dot. IP addresses name nothing.
    """
    if not host:
        return None
    value = host.strip().lower()
    if value.startswith("["):  # an IPv6 literal
        return None
    name_part, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    labels = name_part.rstrip(".").split(".")
    domain = cluster_domain.lower().strip(".").split(".")
    suffixes: tuple[list[str], ...] = ([], ["svc"], ["svc", *domain])
    if labels[2:] not in suffixes:
        return None
    if len(labels) < 2 or not all(_LABEL.fullmatch(label) for label in labels[:2]):
        return None
    name, namespace = labels[0], labels[1]
    if name.isdigit() and namespace.isdigit():  # the first half of an IPv4 address
        return None
    return ModelRef(namespace=namespace, name=name)


# RFC 9110 7.6.1: these describe one connection, not the message; a proxy drops them.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


def forward_headers(headers: Iterable[tuple[str, str]],
                    drop: Iterable[str] = ()) -> list[tuple[str, str]]:
    """End-to-end headers only: hop-by-hop ones, those the Connection header names, and
    ``drop`` (lower-case names) removed; order and repeated headers kept."""
    pairs = list(headers)
    named = {token.strip().lower() for key, value in pairs if key.lower() == "connection"
             for token in value.split(",")}
    gone = HOP_BY_HOP | named | set(drop)
    return [(key, value) for key, value in pairs if key.lower() not in gone]


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _http_port(pod: Mapping[str, Any]) -> int:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == "http" and port.get("containerPort"):
                return int(port["containerPort"])
    return DEFAULT_PORT


def _scheme(pod: Mapping[str, Any]) -> str:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return "https" if annotations.get(SCHEME_ANNOTATION) == "https" else "http"


def ready_endpoints(pods: Iterable[Mapping[str, Any]]) -> list[Endpoint]:
    """Where the ready runtime pods among ``pods`` (API JSON) listen, sorted.

    Ready (the runtime's own readiness probe passed: a loading model is not Ready), not
    being deleted, and with an IP; the port is the container port named ``http``."""
    found = {Endpoint(str(pod["status"]["podIP"]), _http_port(pod), _scheme(pod)) for pod in pods
             if _is_ready(pod) and not (pod.get("metadata") or {}).get("deletionTimestamp")
             and (pod.get("status") or {}).get("podIP")}
    return sorted(found)


def choose(endpoints: Sequence[Endpoint], turn: int,
           exclude: Iterable[Endpoint] = ()) -> Endpoint | None:
    """Round robin over ``endpoints`` less ``exclude``; None when nothing is left."""
    skipped = set(exclude)
    candidates = [e for e in endpoints if e not in skipped]
    if not candidates:
        return None
    return candidates[turn % len(candidates)]
