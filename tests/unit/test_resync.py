"""The resync is a safety net: it skips a resource when nothing a pass reads has changed
since a pass that found nothing to do, so 1000 models at rest cost no passes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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


def test_passes_are_bounded_and_a_known_models_status_goes_before_new_models() -> None:
    """A thousand models applied at once: at most gate.PASSES passes run at once (the others
    wait holding nothing), and a child's change for a model already known (its status to
    report) runs before the queued first passes of new models."""
    from modelyard.operator import gate

    reconciler = Reconciler(Cluster())  # type: ignore[arg-type]
    running: list[str] = []
    order: list[str] = []
    most = [0]
    release = asyncio.Event()

    async def a_pass(observed: Observed) -> float | None:
        name = observed.resource["metadata"]["name"]
        running.append(name)
        order.append(name)
        most[0] = max(most[0], len(running))
        if name != "known":
            await release.wait()
        running.remove(name)
        return None

    reconciler._pass = a_pass  # type: ignore[method-assign]

    def snapshot_of(name: str) -> Callable[[], Observed]:
        return lambda: Observed(resource={"metadata": {"name": name, "namespace": "ns"}},
                                deployments=[], services=[], pods=[])

    async def scenario() -> None:
        await reconciler.reconcile(("ns", "known"), snapshot_of("known"))
        new = [asyncio.create_task(reconciler.reconcile(("ns", f"m{i}"), snapshot_of(f"m{i}")))
               for i in range(50)]
        await asyncio.sleep(0)
        # its pod became ready while the 50 first passes run or wait their turn
        status = asyncio.create_task(reconciler.reconcile(("ns", "known"),
                                                          priority=gate.REPORT))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(status, *new)

    asyncio.run(scenario())
    assert most[0] == gate.PASSES
    assert len(order) == 52
    # right after the passes that were running, before the 42 creations queued ahead of it
    assert order.index("known", 1) == 1 + gate.PASSES, order


def test_triggers_for_a_model_whose_pass_is_queued_are_one_pass() -> None:
    """While a model's pass runs, the next one queues; any trigger after that returns at
    once (the queued pass reads the indexes when its turn comes), so a burst of events
    costs two passes, and the second sees the last event."""
    cluster = Cluster()
    reconciler = Reconciler(cluster)  # type: ignore[arg-type]
    seen: list[str] = []
    release = asyncio.Event()

    async def a_pass(observed: Observed) -> float | None:
        seen.append(observed.pods[0]["metadata"]["resourceVersion"])
        await release.wait()
        return None

    reconciler._pass = a_pass  # type: ignore[method-assign]

    async def scenario() -> None:
        first = asyncio.create_task(reconciler.reconcile(("ns", "m"), cluster.snapshot))
        await asyncio.sleep(0)
        burst = []
        for version in range(11, 31):  # twenty events while the first pass runs
            cluster.pod_version = str(version)
            burst.append(asyncio.create_task(reconciler.reconcile(("ns", "m"))))
            await asyncio.sleep(0)
        assert sum(task.done() for task in burst) == 19  # all but the queued one returned
        release.set()
        await asyncio.gather(first, *burst)

    asyncio.run(scenario())
    assert seen == ["10", "30"]


def test_a_node_cache_claim_that_failed_is_tried_again_and_then_once_per_namespace() -> None:
    """The claim is applied by a namespace's first pass; one the API refused (say, RBAC
    without the cache's rules) sets a retry, so the resync does not take the pass as at
    rest; once applied it is not written again while the namespace has models."""
    from modelyard.operator import reconcile
    from modelyard.operator.render import NodeCache

    class Writer(Cluster):
        refuse = True
        claims: list[str] = []

        def snapshot(self) -> Observed:
            observed = super().snapshot()
            observed.resource["metadata"]["uid"] = "u"
            return observed

        def claim_node_cache(self, volume: dict[str, object], claim: dict[str, object]) -> None:
            self.claims.append(str(claim["metadata"]["namespace"]))  # type: ignore[index]
            if self.refuse:
                raise RuntimeError("persistentvolumes is forbidden")

    writer = Writer()
    reconciler = Reconciler(writer, node_cache=NodeCache("/c"))  # type: ignore[arg-type]

    class Todo:
        apply = ({"kind": "Deployment"},)
        recheck_after = None

    async def nothing(*_: object) -> None:
        return None

    reconciler._executor.execute = nothing  # type: ignore[method-assign,assignment]
    reconciler._executor.report = nothing  # type: ignore[method-assign,assignment]
    original_plan = reconcile.plan.plan
    reconcile.plan.plan = lambda *_: Todo()  # type: ignore[assignment,misc,return-value]
    try:
        async def scenario() -> list[float | None]:
            first = await reconciler._pass(writer.snapshot())
            writer.refuse = False
            second = await reconciler._pass(writer.snapshot())
            third = await reconciler._pass(writer.snapshot())
            return [first, second, third]

        assert asyncio.run(scenario()) == [reconcile.RETRY_S, None, None]
        assert writer.claims == ["ns", "ns"]  # refused, applied, then not again
    finally:
        reconcile.plan.plan = original_plan  # type: ignore[assignment]
