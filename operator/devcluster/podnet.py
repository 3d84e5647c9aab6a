"""A private pod network for the local cluster: pod addresses that exist only here.

kwok gives each pod an address from its node's ``podCIDR``. The API server refuses
loopback addresses in EndpointSlices, so pods need ordinary addresses for Services to
get endpoints; and a real runtime process must be able to listen on its pod's address
and be reached from the tests, the operator and Prometheus on this machine.

:class:`PodNetwork` makes both true without letting any traffic leave the machine:

* a network namespace ``modelyard-pods-<n>`` where the whole pod range
  ``10.<200+n>.0.0/16`` is *local* (one ``local`` route on its loopback, so a process
  can bind any pod address without configuring it first);
* a veth pair ``mypod<n>``/``mypod<n>p`` joining it to this machine's namespace, with
  the link addresses ``10.250.<n>.1/30`` (here) and ``.2`` (there), and one route
  here sending the pod range into the namespace.

Runtime processes run inside the namespace (:meth:`command`); everything else reaches
them through the route. Nothing else routes these addresses: they are reachable from
this machine only, like a cluster's pod network from a node.

Each running cluster holds one block ``n`` (0-39) through an exclusive lock on
``/run/modelyard/podnet/<n>.lock``, so clusters of parallel test runs never share a
range; a block left behind by a killed process is cleaned up by the next one to take
it. Needs root (CAP_NET_ADMIN), as creating any network namespace does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Self

from .locks import try_lock

log = logging.getLogger(__name__)

BLOCKS = 40
FIRST_OCTET = 10
SECOND_OCTET_BASE = 200  # block n uses 10.<200+n>.0.0/16
LINK_OCTET = 250  # block n links over 10.250.<n>.0/30
LOCK_DIR = Path("/run/modelyard/podnet")


class PodNetworkError(RuntimeError):
    """The pod network could not be created; the message says why and what to do."""


class PodNetwork:
    """One block of pod addresses, live from :meth:`create` until :meth:`delete`."""

    def __init__(self, block: int, lock: IO[bytes]):
        self.block = block
        self._lock = lock
        self.namespace = f"modelyard-pods-{block}"
        self.host_link = f"mypod{block}"
        self.pod_link = f"mypod{block}p"
        self.pod_range = ipaddress.ip_network(
            f"{FIRST_OCTET}.{SECOND_OCTET_BASE + block}.0.0/16")
        self.host_address = f"{FIRST_OCTET}.{LINK_OCTET}.{block}.1"
        self.namespace_address = f"{FIRST_OCTET}.{LINK_OCTET}.{block}.2"

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def create(cls) -> Self:
        """Take a free block, clear what a dead owner may have left in it, and build it."""
        if shutil.which("ip") is None:
            raise PodNetworkError("the local cluster's pod network needs iproute2 "
                                  "(the `ip` command): apt-get install iproute2")
        try:
            LOCK_DIR.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise PodNetworkError(_NEEDS_ROOT) from exc
        for block in range(BLOCKS):
            handle = try_lock(LOCK_DIR / f"{block}.lock")
            if handle is None:
                continue
            network = cls(block, handle)
            try:
                network._build()
            except BaseException:
                network.delete()
                raise
            return network
        raise PodNetworkError(f"all {BLOCKS} pod network blocks are in use: are "
                              f"{BLOCKS} local clusters running?")

    def delete(self) -> None:
        """Remove the namespace, the link and its route, and give the block back.

        Processes still running inside the namespace keep it alive until they exit;
        stop them first."""
        self._clear()
        with contextlib.suppress(OSError):
            self._lock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    # -- addressing ------------------------------------------------------------------

    def node_cidr(self, index: int) -> str:
        """The podCIDR of node ``index``: a /24 of this block."""
        if not 0 <= index < 128:
            raise ValueError(f"node index {index} out of range: at most 128 nodes")
        return f"{FIRST_OCTET}.{SECOND_OCTET_BASE + self.block}.{index}.0/24"

    @property
    def spare_cidr(self) -> str:
        """For kwok's ``--cidr`` (nodes without a podCIDR): the upper half of the block."""
        return f"{FIRST_OCTET}.{SECOND_OCTET_BASE + self.block}.128.0/17"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the pod network (where pod addresses can be bound)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    # -- internals -------------------------------------------------------------------

    def _build(self) -> None:
        self._clear()
        ns = ["-n", self.namespace]
        for args in (
            ["netns", "add", self.namespace],
            ["link", "add", self.host_link, "type", "veth", "peer", "name", self.pod_link,
             "netns", self.namespace],
            ["addr", "add", f"{self.host_address}/30", "dev", self.host_link],
            ["link", "set", self.host_link, "up"],
            [*ns, "link", "set", "lo", "up"],
            [*ns, "addr", "add", f"{self.namespace_address}/30", "dev", self.pod_link],
            [*ns, "link", "set", self.pod_link, "up"],
            [*ns, "route", "add", "local", str(self.pod_range), "dev", "lo"],
            [*ns, "route", "add", "default", "via", self.host_address],
            ["route", "add", str(self.pod_range), "via", self.namespace_address,
             "dev", self.host_link],
        ):
            _ip(*args)
        log.info("pod network %s: pods in %s, reached through %s", self.namespace,
                 self.pod_range, self.host_link)

    def _clear(self) -> None:
        # Deleting one end of a veth pair deletes the other and the route through it.
        _ip("link", "del", self.host_link, check=False)
        _ip("netns", "del", self.namespace, check=False)


_NEEDS_ROOT = ("the local cluster's pod network needs root (CAP_NET_ADMIN) to create a "
               "network namespace; run as root, as CI and `make run` do")


def _ip(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        detail = proc.stderr.strip()
        if "Operation not permitted" in detail or os.geteuid() != 0:
            raise PodNetworkError(f"{_NEEDS_ROOT} (ip {' '.join(args)}: {detail})")
        raise PodNetworkError(f"ip {' '.join(args)} failed: {detail}")
