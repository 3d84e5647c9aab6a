"""The resync is a safety net: it skips a resource when nothing a pass reads has changed
since a pass that found nothing to do, so 1000 models at rest cost no passes."""

from __future__ import annotations

import asyncio

from modelyard.operator.reconcile import Reconciler
from modelyard.operator.world import Observed


class Cluster:
    """The indexes' view of one model, and a stand-in for the writer (no write happens)."""

    def __init__(self) -> None:
        self.model_version = "1"
        self.pod_version = "10"
        self.httproute = False

    def has_httproute(self) -> bool:
        return self.httproute

    def snapshot(self) -> Observed:
        return Observed(resource={"metadata": {"name": "m", "namespace": "ns",
                                               "resourceVersion": self.model_version}},
                        deployments=[], services=[],
                        pods=[{"metadata": {"name": "p", "resourceVersion": self.pod_version}}])


def test_a_resync_passes_over_a_resource_at_rest_and_not_one_that_changed() -> None:
    cluster = Cluster()
    reconciler = Reconciler(cluster)  # type: ignore[arg-type]
    passes: list[str] = []
    recheck: list[float | None] = [None]

    async def a_pass(observed: Observed) -> float | None:
        passes.append(observed.pods[0]["metadata"]["resourceVersion"])
        return recheck[0]

    reconciler._pass = a_pass  # type: ignore[method-assign]

    async def scenario() -> None:
        await reconciler.reconcile(("ns", "m"), cluster.snapshot)  # an event: always a pass
        await reconciler.resync_once()
        assert passes == ["10"], "the resync passed over a model at rest"
        cluster.pod_version = "11"  # a change the watch missed, or not acted on yet
        await reconciler.resync_once()
        assert passes == ["10", "11"]
        recheck[0] = 5.0  # something falls due: not at rest
        cluster.pod_version = "12"
        await reconciler.resync_once()
        await reconciler.resync_once()
        assert passes == ["10", "11", "12", "12"]
        recheck[0] = None
        await reconciler.resync_once()  # the timer's pass found nothing to do ...
        await reconciler.resync_once()  # ... so the next resync skips
        assert passes == ["10", "11", "12", "12", "12"]
        cluster.httproute = True  # outside the indexes: the resync looks before it skips
        reconciler._gateway = (False, -1e9)
        await reconciler.resync_once()
        assert passes[-1] == "12"
        assert len(passes) == 6
        await reconciler.reconcile(("ns", "m"))  # an event passes whatever the inputs
        assert len(passes) == 7
        reconciler.forget(("ns", "m"))

    asyncio.run(scenario())
