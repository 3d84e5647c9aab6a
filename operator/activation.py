"""The operator's side of scale-to-zero: where the activator is, and who waits in it.

The activator (:mod:`modelyard.activator`, its own package, run from the operator image)
runs behind its own Service, named by ``MODELYARD_ACTIVATOR_SERVICE=NAMESPACE/NAME``, with a
port named ``http`` (the proxy) and one named ``admin`` (``/metrics``).
:class:`ActivatorLink` reads that Service's EndpointSlices for the activator's ready
addresses, and their ``/metrics`` for
``modelyard_activator_waiting_requests{namespace,model_deployment}``:

* a reconcile pass of a model with ``minReplicas: 0`` and no ready replica points the
  model's stable Service at those addresses (a selector-less Service and an EndpointSlice
  the operator manages: see :func:`.render.render_activator_slice`), so the first request
  after scale-to-zero reaches the activator instead of nothing;
* the autoscaler reads the waiting count as the model's wake signal.

Both lookups are cached for ``ttl_s`` so a tick costs one read per activator, not one per
model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from modelyard import contract

from .kube import Writer
from .world import ActivatorEndpoints

log = logging.getLogger(__name__)

WAITING = contract.ACTIVATOR_WAITING


class ActivatorLink:
    def __init__(self, writer: Writer, namespace: str, service: str, *, ttl_s: float = 1.0):
        self.writer = writer
        self.namespace, self.service = namespace, service
        self.ttl_s = ttl_s
        self._endpoints: tuple[float, ActivatorEndpoints | None] | None = None
        self._waiting: tuple[float, dict[tuple[str, str], float]] | None = None

    @classmethod
    def from_env(cls, writer: Writer) -> ActivatorLink | None:
        named = os.environ.get("MODELYARD_ACTIVATOR_SERVICE", "")
        if not named:
            return None
        namespace, _, service = named.partition("/")
        if not namespace or not service:
            raise ValueError(f"MODELYARD_ACTIVATOR_SERVICE must be NAMESPACE/NAME, got {named!r}")
        return cls(writer, namespace, service)

    async def endpoints(self) -> ActivatorEndpoints | None:
        """The activator's ready addresses and ports; None when it has none."""
        now = time.monotonic()
        if self._endpoints is None or now - self._endpoints[0] > self.ttl_s:
            try:
                slices = await asyncio.to_thread(self.writer.endpoint_slices, self.namespace,
                                                 self.service)
                found = _endpoints(slices)
            except Exception as exc:
                log.warning("could not read the activator's endpoints: %s", exc)
                found = self._endpoints[1] if self._endpoints else None
            self._endpoints = (now, found)
        return self._endpoints[1]

    async def waiting(self, namespace: str, name: str) -> float:
        """Requests the activator holds for this model right now."""
        now = time.monotonic()
        if self._waiting is None or now - self._waiting[0] > self.ttl_s:
            self._waiting = (now, await self._scrape_waiting())
        return self._waiting[1].get((namespace, name), 0.0)

    async def _scrape_waiting(self) -> dict[tuple[str, str], float]:
        found = await self.endpoints()
        if found is None:
            return {}
        totals: dict[tuple[str, str], float] = {}
        async with httpx.AsyncClient(timeout=2.0) as client:
            for address in found.addresses:
                try:
                    response = await client.get(f"http://{address}:{found.admin_port}/metrics")
                except httpx.HTTPError as exc:
                    log.warning("could not read the activator at %s: %s", address, exc)
                    continue
                for family in text_string_to_metric_families(response.text):
                    for sample in family.samples:
                        if sample.name == WAITING:
                            key = (sample.labels.get("namespace", ""),
                                   sample.labels.get("model_deployment", ""))
                            totals[key] = totals.get(key, 0.0) + sample.value
        return totals


def _endpoints(slices: list[dict[str, object]]) -> ActivatorEndpoints | None:
    addresses: list[str] = []
    ports: dict[str, int] = {}
    for piece in slices:
        for port in piece.get("ports") or []:  # type: ignore[attr-defined]
            if port.get("name") and port.get("port"):
                ports[str(port["name"])] = int(port["port"])
        for endpoint in piece.get("endpoints") or []:  # type: ignore[attr-defined]
            if (endpoint.get("conditions") or {}).get("ready") is not False:
                addresses.extend(endpoint.get("addresses") or [])
    if not addresses or "http" not in ports:
        return None
    return ActivatorEndpoints(tuple(sorted(set(addresses))), ports["http"],
                              ports.get("admin", 9090))
