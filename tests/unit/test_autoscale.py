"""The autoscaling algorithm, replayed over load traces through a small simulated cluster.

Each trace is a load over time (in requests in flight, the ``concurrency`` metric; one
replica serves ``TARGET`` of it). Every ``TICK`` the simulator reports what the ready
pods see, asks :func:`autoscale.decide` for replicas, and makes that many pods exist:
new pods become ready ``ready_delay`` seconds later (the model loads), removed pods go
at once (those still starting first). The assertions are what an operator of the
platform would check on a dashboard: it follows the load, never flaps, stays within
bounds, wastes little, sleeps after silence, wakes at once, and a restart changes
nothing.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pydantic
import pytest
from prometheus_client.parser import text_string_to_metric_families
from vllm_scrapes import SCRAPES

from modelyard.operator import api, autoscale, signals
from modelyard.operator.autoscale import Decision, Policy, Sample, State
from modelyard.runtime.metrics import RuntimeMetrics

TICK = 2.0
TARGET = 10.0
Load = Callable[[float], float]


@dataclass
class Run:
    """What a dashboard would show after a trace."""

    trace: list[tuple[float, float]] = field(default_factory=list)  # (t, load), noise-free
    desired: list[tuple[float, int]] = field(default_factory=list)
    ready: list[tuple[float, int]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def desired_at(self, t: float) -> int:
        return [d for time, d in self.desired if time <= t][-1]

    def first_time(self, predicate: Callable[[int], bool], after: float = 0.0) -> float:
        return next(time for time, d in self.desired if time >= after and predicate(d))

    def direction_changes(self) -> int:
        """How often the replica count turned round (up then down, or down then up)."""
        counts = [d for _, d in self.desired]
        signs = [1 if b > a else -1 for a, b in itertools.pairwise(counts) if b != a]
        return sum(1 for a, b in itertools.pairwise(signs) if a != b)

    def provisioning(self) -> tuple[float, float]:
        return autoscale.provisioning(self.trace, self.ready, TARGET)

    def needed_seconds(self) -> float:
        return sum(math.ceil(load / TARGET - 1e-9) * TICK for _, load in self.trace[:-1])


def simulate(load: Load, seconds: float, policy: Policy, *, start: int = 1,
             ready_delay: float = 20.0, noise: float = 0.05, seed: int = 7,
             restart_at: tuple[float, ...] = (), lose_state: bool = False,
             blind: tuple[float, float] | None = None, waiting_timeout: float | None = None,
             ) -> Run:
    """Replay ``load`` for ``seconds``. ``restart_at``: the operator restarts then (its
    window of samples is lost; its State goes through JSON, or is lost too with
    ``lose_state``). ``blind``: no metrics between these times. ``waiting_timeout``:
    requests held while no pod is ready give up after this long."""
    rng = random.Random(seed)
    pods: list[float] = [0.0] * start  # the time each pod is (or will be) ready
    samples: list[Sample] = []
    state = State()
    run = Run()
    waiting_since: float | None = None
    t = 0.0
    while t <= seconds:
        if t in restart_at:
            samples = []
            state = State() if lose_state else State.from_dict(
                json.loads(json.dumps(state.to_dict())))
        demand = load(t) * (1 + noise * rng.uniform(-1, 1))
        ready = sum(1 for at in pods if at <= t)
        if ready == 0 and demand > 0:
            waiting_since = t if waiting_since is None else waiting_since
            if waiting_timeout is not None and t - waiting_since > waiting_timeout:
                demand = 0.0  # the clients gave up
        else:
            waiting_since = None
        if blind is None or not blind[0] <= t < blind[1]:
            sample = (Sample(t, ready, demand) if ready else Sample(t, 0, 0.0, waiting=demand))
            samples = [s for s in samples if s.time > t - 120] + [sample]
        decision = autoscale.decide(samples, t, len(pods), state, policy)
        state = decision.state
        if decision.replicas > len(pods):
            pods += [t + ready_delay] * (decision.replicas - len(pods))
        else:
            pods = sorted(pods)[:decision.replicas]  # starting pods go first
        run.trace.append((t, load(t)))
        run.desired.append((t, decision.replicas))
        run.ready.append((t, sum(1 for at in pods if at <= t)))
        run.decisions.append(decision)
        t += TICK
    return run


def steps(*points: tuple[float, float]) -> Load:
    """A load of ``points[i][1]`` replicas' worth from ``points[i][0]`` on."""
    def load(t: float) -> float:
        return TARGET * [v for at, v in points if at <= t][-1]
    return load


STEP = steps((0, 1.8), (600, 7.6), (1800, 1.8))
SPIKE = steps((0, 1.8), (600, 9.5), (630, 1.8))


def ramp(t: float) -> float:
    return TARGET * (0.9 + 8.6 * min(t, 2400 - t, 1200) / 1200 if t < 2400 else 0.9)


def sawtooth(t: float) -> float:
    return TARGET * (1.8 + 3.7 * (t % 120) / 120)


def diurnal(t: float) -> float:
    return TARGET * (5 + 4 * math.sin(2 * math.pi * t / 7200))


SILENCE = steps((0, 2.6), (300, 0), (1500, 0.7))
POLICY = Policy(target=TARGET, min_replicas=1, max_replicas=20)


# ------------------------------------------------------------------------- traces


def test_step_is_followed_within_a_pod_start_and_released_after_the_delay() -> None:
    run = simulate(STEP, 2700, POLICY)
    # Up: the panic window sees the step in one tick; the pods then need ready_delay.
    assert run.first_time(lambda d: d >= 8, after=600) <= 600 + 3 * TICK
    assert all(r >= 8 for t, r in run.ready if 600 + 20 + 3 * TICK <= t < 1800)
    # Down: only after the stable window has seen it and scaleDownDelay has passed.
    down = run.first_time(lambda d: d < 8, after=1800)
    assert 1800 + 300 <= down <= 1800 + 60 + 300 + 2 * TICK
    assert run.desired_at(2700) == 2
    assert run.direction_changes() <= 1
    over, under = run.provisioning()
    assert under <= 6 * 30  # six missing replicas for the 20 s a pod takes to load, and a tick
    assert over <= 6 * (60 + 300 + 10)  # the scale-down delay, paid on purpose


def test_spike_panics_up_at_once_then_holds_until_the_delay() -> None:
    run = simulate(SPIKE, 1500, POLICY)
    assert run.first_time(lambda d: d >= 10, after=600) <= 600 + 3 * TICK
    assert any(d.panic for t, d in zip(run.desired, run.decisions, strict=True)
               if 600 <= t[0] < 610)
    assert run.desired_at(1500) == 2
    assert run.direction_changes() <= 1


def test_ramp_is_followed_without_turning_round() -> None:
    run = simulate(ramp, 3000, POLICY)
    over, under = run.provisioning()
    needed = run.needed_seconds()
    # Behind the ramp by the stable window's lag, a pod start and the 10 % tolerance.
    assert under <= 0.10 * needed
    assert over <= 0.25 * needed
    assert run.direction_changes() <= 1
    assert run.desired_at(3000) == 1


def test_sawtooth_does_not_flap() -> None:
    run = simulate(sawtooth, 1800, POLICY)
    assert run.direction_changes() == 0  # it goes up to the peaks and stays
    assert max(d for _, d in run.desired) <= 7


def test_diurnal_load_follows_the_day_with_few_turns() -> None:
    run = simulate(diurnal, 7200, POLICY, noise=0.1)
    over, under = run.provisioning()
    needed = run.needed_seconds()
    assert run.direction_changes() <= 2
    assert under <= 0.06 * needed
    assert over <= 0.10 * needed


def test_scales_to_zero_after_silence_and_wakes_at_once() -> None:
    policy = Policy(target=TARGET, min_replicas=0, max_replicas=20)
    run = simulate(SILENCE, 1800, policy)
    zero = run.first_time(lambda d: d == 0, after=300)
    assert 300 + 300 <= zero <= 300 + 300 + 2 * TICK  # idle delay, counted from the silence
    assert all(d == 0 for t, d in run.desired if zero <= t < 1500)
    assert run.desired_at(1500) >= 1  # the first tick that sees demand
    assert run.desired_at(1800) == 1


def test_never_leaves_the_bounds() -> None:
    policy = Policy(target=TARGET, min_replicas=3, max_replicas=6)
    for load in (STEP, SPIKE, ramp, sawtooth, SILENCE):
        run = simulate(load, 1800, policy, start=3)
        assert all(3 <= d <= 6 for _, d in run.desired)
    high = simulate(STEP, 1200, policy, start=3)
    assert high.desired_at(1200) == 6


def test_bounds_changed_by_the_user_apply_at_once() -> None:
    window = [Sample(float(t), 8, 80.0) for t in range(0, 60, 2)]
    lowered = autoscale.decide(window, 60.0, 8, State(desired=8), Policy(TARGET, 1, 5))
    assert lowered.replicas == 5
    raised = autoscale.decide(window, 60.0, 8, State(desired=8), Policy(TARGET, 10, 20))
    assert raised.replicas == 10


# ------------------------------------------------------------------ restarts, gaps


@functools.cache
def uninterrupted_step() -> Run:
    return simulate(STEP, 2700, POLICY)


@pytest.mark.parametrize("restart", [1000.0, 1900.0, 2050.0])
def test_a_restart_changes_nothing(restart: float) -> None:
    """Mid-trace (steady high load; early and late in the scale-down delay) the new
    operator has no samples but the State from status: it must not jump."""
    plain = uninterrupted_step()
    restarted = simulate(STEP, 2700, POLICY, restart_at=(restart,))
    before = restarted.desired_at(restart - TICK)
    assert all(d == before for t, d in restarted.desired if restart <= t < restart + 30)
    assert restarted.direction_changes() == plain.direction_changes()
    # It may release the extra replicas at most half a stable window later.
    assert restarted.first_time(lambda d: d < 8, after=1800) <= \
        plain.first_time(lambda d: d < 8, after=1800) + 30 + TICK


def test_a_restart_during_silence_keeps_the_idle_clock() -> None:
    policy = Policy(target=TARGET, min_replicas=0, max_replicas=20)
    plain = simulate(SILENCE, 1800, policy)
    restarted = simulate(SILENCE, 1800, policy, restart_at=(450.0,))
    zero = plain.first_time(lambda d: d == 0, after=300)
    assert restarted.first_time(lambda d: d == 0, after=300) == zero
    assert restarted.desired_at(1500) >= 1


def test_a_restart_without_state_holds_for_a_stable_window() -> None:
    run = simulate(STEP, 2700, POLICY, restart_at=(1000.0,), lose_state=True)
    assert all(d == 8 for t, d in run.desired if 1000 <= t < 1800)


def test_missing_metrics_hold_the_replicas() -> None:
    run = simulate(STEP, 1500, POLICY, blind=(1000.0, 1400.0))
    assert all(d == 8 for t, d in run.desired if 1000 <= t <= 1500)
    assert autoscale.decide([], 5.0, 3, State(desired=3), POLICY).replicas == 3
    zero = Policy(target=TARGET, min_replicas=0, max_replicas=4)
    assert autoscale.decide([], 5.0, 0, State(desired=0), zero).replicas == 0


# ------------------------------------------------------------------ starting pods


def test_a_pod_loading_its_model_is_not_idle() -> None:
    """Woken from zero by one burst of requests that then give up waiting, the pod takes
    longer to load (400 s) than the idle delay (300 s): it is not killed while loading."""
    policy = Policy(target=TARGET, min_replicas=0, max_replicas=4)
    burst = steps((0, 0), (100, 1), (130, 0))
    run = simulate(burst, 1500, policy, start=0, ready_delay=400, waiting_timeout=10)
    assert run.desired_at(100) == 1
    assert all(d == 1 for t, d in run.desired if 100 <= t < 500)
    assert any(r == 1 for _, r in run.ready)
    assert run.desired_at(1500) == 0  # once ready and idle for the delay


def test_pods_that_never_start_are_released_after_the_grace() -> None:
    policy = Policy(target=TARGET, min_replicas=0, max_replicas=4, startup_grace_seconds=600)
    burst = steps((0, 0), (100, 1), (130, 0))
    run = simulate(burst, 1200, policy, start=0, ready_delay=math.inf, waiting_timeout=10)
    assert all(d == 1 for t, d in run.desired if 100 <= t < 700)
    assert run.desired_at(1200) == 0


def test_a_spike_while_pods_start_does_not_cancel_them() -> None:
    run = simulate(SPIKE, 1500, POLICY, ready_delay=120)
    peak = max(d for _, d in run.desired)
    assert all(d == peak for t, d in run.desired if 606 <= t < 606 + 120)


# ------------------------------------------------------------------ the arithmetic


def test_average_metrics_scale_with_the_ready_replicas() -> None:
    """gpuUtilization and latencyP95 are per replica: 4 replicas at 90 % for a 60 %
    target need 6; concurrency is a total: 90 in flight at 10 each need 9."""
    util = Policy(target=60, metric="gpuUtilization", max_replicas=10)
    window = [Sample(float(t), 4, 90.0) for t in range(0, 60, 2)]
    assert autoscale.decide(window, 60.0, 4, State(desired=4), util).replicas == 6
    latency = Policy(target=200, metric="latencyP95", max_replicas=10)
    slow = [Sample(float(t), 4, 330.0) for t in range(0, 60, 2)]
    assert autoscale.decide(slow, 60.0, 4, State(desired=4), latency).replicas == 7
    total = [Sample(float(t), 4, 90.0) for t in range(0, 60, 2)]
    assert autoscale.decide(total, 60.0, 4, State(desired=4), POLICY).replicas == 9
    # An average over no ready pods says nothing; waiting requests still wake.
    none = [Sample(float(t), 0, 0.0) for t in range(0, 60, 2)]
    zero = Policy(target=60, metric="gpuUtilization", min_replicas=0, max_replicas=4)
    assert autoscale.decide(none, 60.0, 0, State(desired=0), zero).replicas == 0
    waiting = [*none, Sample(60.0, 0, 0.0, waiting=3)]
    assert autoscale.decide(waiting, 60.0, 0, State(desired=0), zero).replicas == 1


def test_tolerance_and_rate_limits() -> None:
    def at(value: float, ready: int = 4, now: float = 60.0) -> list[Sample]:
        return [Sample(now - t, ready, value) for t in range(0, 60, 2)]

    hold = State(desired=4)
    assert autoscale.decide(at(43.0), 60.0, 4, hold, POLICY).replicas == 4  # +7.5 %
    assert autoscale.decide(at(46.0), 60.0, 4, hold, POLICY).replicas == 5  # +15 %
    fast = Policy(target=1, max_replicas=1000)
    assert autoscale.decide(at(500.0, 2), 60.0, 2, State(desired=2), fast).replicas == 20
    assert autoscale.decide(at(500.0, 1), 60.0, 1, State(desired=1), fast).replicas == 10
    # Down: after the delay, at most half per decision, to the highest recommendation.
    low = State(desired=16, low=((1, 0.0),))
    assert autoscale.decide(at(5.0, 16, 400.0), 400.0, 16, low, POLICY).replicas == 8
    stepped = Policy(target=TARGET, max_replicas=20, max_scale_down_step=3)
    assert autoscale.decide(at(5.0, 16, 400.0), 400.0, 16, low, stepped).replicas == 13


def test_state_survives_json_and_tolerates_other_versions() -> None:
    state = State(desired=4, panic_until=12.5, panic_peak=4, low=((2, 3.0), (3, 1.0)),
                  idle_since=None, starting_since=1.0, last_scale_time=0.0)
    data = json.loads(json.dumps(state.to_dict()))
    assert "idleSince" not in data
    assert data["panicUntil"] == 12.5
    assert State.from_dict(data) == state
    assert State.from_dict({**data, "somethingNewer": 1}) == state
    assert State.from_dict(None) == State()


def test_steady_load_changes_no_state() -> None:
    """The State is kept in status: a steady model must not rewrite it every tick."""
    run = simulate(steps((0, 3.6)), 900, POLICY, start=4)
    states = {json.dumps(d.state.to_dict(), sort_keys=True) for d in run.decisions[60:]}
    assert len(states) == 1


def test_policy_from_the_api_and_its_checks() -> None:
    spec = api.Autoscaling(min_replicas=0, max_replicas=8, metric="rps", target=25,
                           scale_down_delay_seconds=120)
    policy = Policy.from_spec(spec, stable_window_seconds=30)
    assert (policy.min_replicas, policy.max_replicas, policy.metric, policy.target,
            policy.scale_down_delay_seconds, policy.panic_window_seconds) == \
        (0, 8, "rps", 25, 120, 3)
    assert policy.aggregate == "total"
    with pytest.raises(ValueError, match="unknown metric"):
        Policy(target=1, metric="cpu")
    with pytest.raises(ValueError, match="min_replicas"):
        Policy(target=1, min_replicas=5, max_replicas=2)


def test_provisioning_counts_replica_seconds() -> None:
    trace = [(0.0, 20.0), (10.0, 40.0), (20.0, 0.0), (30.0, 0.0)]  # 2, 4, 0 replicas needed
    replicas = [(0.0, 3), (15.0, 4), (25.0, 1)]
    over, under = autoscale.provisioning(trace, replicas, TARGET)
    # 0-10: 3 vs 2 -> +10; 10-15: 3 vs 4 -> -5; 15-20: 4 vs 4; 20-25: 4 vs 0 -> +20;
    # 25-30: 1 vs 0 -> +5.
    assert (over, under) == (35.0, 5.0)


# ------------------------------------------------------------------ scrapes → samples


def metrics_text(m: RuntimeMetrics) -> str:
    return m.render().decode()


def test_window_turns_runtime_scrapes_into_samples() -> None:
    pods = {name: RuntimeMetrics("resnet", "3") for name in ("a", "b", "c")}
    for m, inflight, depth in zip(pods.values(), (3, 5, 0), (1, 2, 0), strict=True):
        m.inflight.set(inflight)
        m.queue_depth.set(depth)

    def scrape(t: float) -> list[autoscale.Scrape]:
        return [autoscale.parse_scrape(name, t, metrics_text(m), ready=name != "c")
                for name, m in pods.items()]

    concurrency = autoscale.Window("concurrency")
    assert concurrency.add(0.0, scrape(0.0)) == Sample(0.0, 2, 8.0)  # c is not ready
    queue = autoscale.Window("queueDepth")
    assert queue.add(0.0, scrape(0.0), waiting=4) == Sample(0.0, 2, 3.0, waiting=4)

    rps = autoscale.Window("rps")
    latency = autoscale.Window("latencyP95")
    first = scrape(0.0)
    assert rps.add(0.0, first) is None  # a rate needs two scrapes
    assert latency.add(0.0, first) is None
    for _ in range(100):
        pods["a"].observe_request("v2", 200, 0.040)
    for _ in range(50):
        pods["b"].observe_request("v2", 200, 0.020)
    second = scrape(10.0)
    assert rps.add(10.0, second) == Sample(10.0, 2, 15.0)  # 150 requests in 10 s
    p95 = latency.add(10.0, second)
    assert p95 is not None
    assert 25 < p95.value <= 50  # ms, within the 25-50 ms bucket
    assert [s.time for s in rps.samples] == [10.0]


def test_window_survives_restarted_pods_and_new_ones() -> None:
    a, b = RuntimeMetrics("m", "1"), RuntimeMetrics("m", "1")
    for _ in range(40):
        a.observe_request("v2", 200, 0.01)
    window = autoscale.Window("rps", seconds=30)
    window.add(0.0, [autoscale.parse_scrape("a", 0.0, metrics_text(a), ready=True)])
    a2 = RuntimeMetrics("m", "1")  # pod a restarted: its counter is back to 5
    for _ in range(5):
        a2.observe_request("v2", 200, 0.01)
    for _ in range(7):
        b.observe_request("v2", 200, 0.01)
    sample = window.add(5.0, [
        autoscale.parse_scrape("a", 5.0, metrics_text(a2), ready=True),
        autoscale.parse_scrape("b", 5.0, metrics_text(b), ready=True),  # first sight of b
    ])
    assert sample == Sample(5.0, 2, 2.0)  # a: 5 in 5 s; b is assumed to carry as much
    window.add(40.0, [])
    assert [s.time for s in window.samples] == [40.0]  # older than 30 s: dropped


def test_rps_counts_requests_refused_for_overload_as_offered_load() -> None:
    """A pod at its queue bound answers 503 (or 504 for a passed deadline) at once; those
    requests are demand it could not serve, and rps counts them: a refusing model scales
    out, while concurrency and queueDepth stop at the bound."""
    m = RuntimeMetrics("m", "1")
    window = autoscale.Window("rps")
    window.add(0.0, [autoscale.parse_scrape("a", 0.0, metrics_text(m), ready=True)])
    for _ in range(60):
        m.observe_request("v2", 200, 0.01)
    for _ in range(30):
        m.observe_request("v2", 503, 0.0005)
        m.observe_shed("queue_full")
    for _ in range(10):
        m.observe_request("v2", 504, 0.2)
        m.observe_shed("deadline")
    sample = window.add(10.0, [autoscale.parse_scrape("a", 10.0, metrics_text(m), ready=True)])
    assert sample == Sample(10.0, 1, 10.0)  # 100 requests offered in 10 s, 60 served


def test_runtime_metric_names_are_the_ones_read() -> None:
    """The names this module reads are the runtime's own."""
    m = RuntimeMetrics("m", "1")
    m.observe_request("v2", 200, 0.01)
    names = {s.name for f in text_string_to_metric_families(metrics_text(m)) for s in f.samples}
    assert {signals.INFLIGHT, signals.QUEUE_DEPTH, signals.REQUESTS,
            signals.LATENCY} <= names


def test_gpu_utilization_is_the_mean_over_ready_pods_in_percent() -> None:
    def exposition(*ratios: float) -> str:  # the shape the runtime's GPU collector writes
        lines = ["# HELP modelyard_gpu_utilization_ratio GPU utilisation",
                 "# TYPE modelyard_gpu_utilization_ratio gauge"]
        lines += [f'modelyard_gpu_utilization_ratio{{model="m",version="1",device="{i}"}} {r}'
                  for i, r in enumerate(ratios)]
        return "\n".join(lines) + "\n"

    window = autoscale.Window("gpuUtilization")
    sample = window.add(0.0, [
        autoscale.parse_scrape("a", 0.0, exposition(0.9, 0.7), ready=True),  # 2 GPUs: 80 %
        autoscale.parse_scrape("b", 0.0, exposition(0.4), ready=True),
        autoscale.parse_scrape("c", 0.0, exposition(0.0), ready=False),  # loading: not counted
    ])
    assert sample is not None
    assert (sample.ready_replicas, round(sample.value, 6)) == (2, 60.0)
    assert window.add(1.0, [autoscale.parse_scrape("a", 1.0, "", ready=True)]) is None


def test_every_signal_is_one_registry_entry_read_the_same_from_scrapes_and_promql() -> None:
    """The CRD's enum is the registry; each entry reads its value from a round of scrapes
    and has an instant PromQL query over the same runtime series."""
    from modelyard.operator import crd

    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    metric = schema["properties"]["spec"]["properties"]["autoscaling"]["properties"]["metric"]
    assert metric["enum"] == list(signals.NAMES)
    a = RuntimeMetrics("m", "1")
    a.observe_request("v2", 200, 0.01)
    first = autoscale.parse_scrape("a", 0.0, metrics_text(a), ready=True)
    a.observe_request("v2", 200, 0.02)
    later = autoscale.parse_scrape("a", 2.0, metrics_text(a), ready=True)
    generative = (autoscale.parse_scrape("a", 0.0, SCRAPES[("v1", "before")], ready=True),
                  autoscale.parse_scrape("a", 2.0, SCRAPES[("v1", "after")], ready=True))
    for engine, (before, now) in (("modelyard", (first, later)), ("vllm", generative)):
        for entry in signals.SIGNALS.values():
            value = entry.from_scrapes([now], {"a": before})
            if engine not in entry.engines or entry.name == "gpuUtilization":
                assert value is None, entry.name  # no such gauge (no GPU): no figure, not 0
                continue
            assert value is not None, (engine, entry.name)
            assert value >= 0, (engine, entry.name)
            query = entry.query('{namespace="ns"}', "60000ms", engine)
            assert 'namespace="ns"' in query, entry.name
    with pytest.raises(pydantic.ValidationError, match="unknown metric 'cpu'"):
        api.parse_spec({"model": {"version": "1", "uri": "s3://m/1"},
                        "autoscaling": {"maxReplicas": 2, "target": 1, "metric": "cpu"}})


# ------------------------------------------------------- generative models (vLLM's scrapes)


def vllm_scrape(moment: str, t: float, pod: str = "a") -> autoscale.Scrape:
    return autoscale.parse_scrape(pod, t, SCRAPES[("v1", moment)], ready=True)


def test_vllm_signals_read_from_a_real_scrape() -> None:
    busy = vllm_scrape("busy", 0.0)  # 40 long completions: 32 running, 7 waiting (1 done)
    assert (busy.inflight, busy.queue_depth) == (39, 7)  # not the modelyard_* gauges
    assert busy.kv_cache_usage is not None
    assert 0 < busy.kv_cache_usage < 0.05  # short prompts hold few blocks
    idle = vllm_scrape("idle", 2.0)
    assert (idle.inflight, idle.queue_depth, idle.kv_cache_usage) == (0, 0, 0)
    assert idle.requests - busy.requests == 40  # all answered in between

    def sample(metric: str) -> Sample | None:
        window = autoscale.Window(metric)
        window.add(0.0, [busy])
        return window.add(4.0, [vllm_scrape("busy", 4.0), vllm_scrape("busy", 4.0, "b")])

    assert sample("concurrency") == Sample(4.0, 2, 78.0)  # in flight on two pods
    assert sample("queueDepth") == Sample(4.0, 2, 14.0)
    kv = sample("kvCacheUsage")
    assert kv is not None
    assert kv.value == pytest.approx(100 * busy.kv_cache_usage)  # percent, per replica
    assert sample("rps") == Sample(4.0, 2, 0.0)  # nothing answered between the two scrapes
    rps = autoscale.Window("rps")
    rps.add(0.0, [vllm_scrape("after", 0.0)])
    answered = rps.add(10.0, [vllm_scrape("idle", 10.0)])  # the 40 long ones, say in 10 s
    assert answered is not None
    assert answered.value == pytest.approx(
        (idle.requests - vllm_scrape("after", 0.0).requests) / 10)


def _vllm_trace(moment: str, metric: str, *, seconds: float = 400.0,
                read_in_flight: bool = True) -> list[int]:
    """Replicas decided tick by tick while one vLLM pod's scrape stays ``moment``."""
    policy = Policy(target=4, min_replicas=0, max_replicas=4, metric=metric,
                    scale_to_zero_delay_seconds=60)
    window, in_flight = autoscale.Window(metric), autoscale.Window("concurrency")
    state, replicas, decided = State(), 1, []
    t = 0.0
    while t <= seconds:
        scrapes = [vllm_scrape(moment, t)] if replicas else []
        window.add(t, scrapes)
        in_flight.add(t, scrapes)
        decision = autoscale.decide(window.samples, t, replicas, state, policy,
                                    in_flight=in_flight.samples if read_in_flight else ())
        state, replicas = decision.state, decision.replicas
        decided.append(replicas)
        t += TICK
    return decided


@pytest.mark.parametrize("metric", ["rps", "queueDepth", "kvCacheUsage", "concurrency"])
def test_a_busy_vllm_model_is_never_idle_whatever_the_metric(metric: str) -> None:
    """Scale to zero reads vLLM's running plus waiting requests: 39 in flight that answer
    nothing between two scrapes (rps 0) are not idleness."""
    assert 0 not in _vllm_trace("busy", metric)
    if metric == "rps":  # what reading the metric alone would do: sleep while it serves
        assert _vllm_trace("busy", metric, read_in_flight=False)[-1] == 0


@pytest.mark.parametrize("metric", ["rps", "queueDepth", "kvCacheUsage", "concurrency"])
def test_an_idle_vllm_model_goes_to_zero_after_the_delay(metric: str) -> None:
    decided = _vllm_trace("idle", metric)
    assert decided[-1] == 0
    assert decided.index(0) * TICK >= 60  # not before scaleToZeroDelaySeconds


def test_the_autoscaler_loop_reads_requests_in_flight_of_a_vllm_model() -> None:
    """The loop (scaling.py) feeds the idle test vLLM's running plus waiting requests
    while it scales on another metric: a busy model stays up, an idle one goes to zero."""
    from modelyard.operator import scaling
    from modelyard.operator.world import Observed

    resource = {
        "metadata": {"name": "chat", "namespace": "ns"},
        "spec": {"model": {"version": "1", "uri": "file:///models/chat/1/", "format": "hf"},
                 "runtime": {"engine": "vllm"},
                 "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "metric": "rps",
                                 "target": 4, "scaleToZeroDelaySeconds": 60}},
    }
    pod = {"metadata": {"name": "chat-v1-a", "labels": {"modelyard.dev/version": "1"}},
           "status": {"podIP": "10.0.0.1",
                      "conditions": [{"type": "Ready", "status": "True"}]}}
    decided: list[int] = []

    class Loop:  # what the autoscaler reads of the reconciler
        def leading(self) -> bool:
            return True

        def autoscaled_keys(self) -> list[tuple[str, str]]:
            return [("ns", "chat")]

        def observe(self, key: tuple[str, str]) -> Observed:
            return Observed(resource, [{"spec": {"replicas": 1}}], [pod], [])

        async def autoscaled(self, key: tuple[str, str], status: Any) -> None:
            decided.append(status.desired_replicas)

    now = [0.0]
    text = [SCRAPES[("v1", "busy")]]

    async def scrape(ip: str, port: int) -> str:
        assert (ip, port) == ("10.0.0.1", 8080)
        return text[0]

    autoscaler = scaling.Autoscaler(cast(Any, Loop()), scraper=scrape, clock=lambda: now[0])

    async def ticks(seconds: float) -> None:
        end = now[0] + seconds
        while now[0] < end:
            await autoscaler.tick()
            now[0] += TICK

    asyncio.run(ticks(300))
    assert 0 not in decided  # 39 requests in flight, none answered between two scrapes
    text[0] = SCRAPES[("v1", "idle")]
    asyncio.run(ticks(300))
    assert decided[-1] == 0
