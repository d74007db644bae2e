"""The device scheduler: its policy under hypothesis, its gate across threads, and how
requests' priorities and tenants are read.

Policy properties, on random models (priorities, weights, limits), devices (slots) and
event sequences where every model always has a batch waiting:

- no more batches admitted than the device's slots, nor than a model's limit;
- every pick is of the highest priority among the waiting models under their limits;
- among models of one priority, rows served stay proportional to weights: the gap
  between two models' rows/weight never exceeds the largest batch over each's weight
  (start-time fair queuing's bound), so no model of equal priority starves.
"""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config.topology import ModelScheduling, SchedulingSettings
from pipeline.observability.metrics import Metrics
from pipeline.serving.scheduler import (
    Batch,
    DeviceScheduler,
    FairPolicy,
    RequestClass,
    RequestClasses,
)
from schemas.errors import RequestError
from schemas.messages import Envelope, Request

MAX_ROWS = 16


@st.composite
def models(draw: st.DrawFn, same_priority: bool = False) -> dict[str, ModelScheduling]:
    n = draw(st.integers(1, 4))
    return {
        f"m{i}": ModelScheduling(
            priority=0 if same_priority else draw(st.integers(0, 2)),
            weight=draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
            max_concurrent=None if same_priority else draw(st.one_of(st.none(), st.integers(1, 2))),
        )
        for i in range(n)
    }


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(models(), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_picks_keep_priority_order_and_every_limit(
    specs: dict[str, ModelScheduling], slots: int, seed: int
) -> None:
    rng = random.Random(seed)
    policy = FairPolicy(slots, specs)
    running: list[str] = []
    for _ in range(200):
        if running and (rng.random() < 0.5 or policy.total >= slots):
            policy.done(running.pop(rng.randrange(len(running))))
            continue
        waiting = [
            Batch(m, m, specs[m].priority, rng.randint(1, MAX_ROWS))
            for m in specs
            if rng.random() < 0.8
        ]
        index = policy.pick(waiting)
        under = [
            b
            for b in waiting
            if specs[b.model].max_concurrent is None
            or running.count(b.model) < specs[b.model].max_concurrent
        ]
        if index is None:
            assert len(running) >= slots or not under
            continue
        picked = waiting[index].model
        running.append(picked)
        assert waiting[index] in under
        assert waiting[index].priority == max(b.priority for b in under)
        assert len(running) <= slots
        limit = specs[picked].max_concurrent
        assert limit is None or running.count(picked) <= limit
        assert policy.total == len(running)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(models(same_priority=True), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_equal_priorities_share_rows_by_weight_and_none_starves(
    specs: dict[str, ModelScheduling], slots: int, seed: int
) -> None:
    rng = random.Random(seed)
    policy = FairPolicy(slots, specs)
    served = dict.fromkeys(specs, 0)
    running: list[str] = []
    for _ in range(400):  # every model always has a batch waiting
        if policy.total >= slots:
            policy.done(running.pop(rng.randrange(len(running))))
        rows = {m: rng.randint(1, MAX_ROWS) for m in specs}
        index = policy.pick([Batch(m, m, 0, rows[m]) for m in specs])
        assert index is not None
        picked = list(specs)[index]
        running.append(picked)
        served[picked] += rows[picked]
        for a, sa in specs.items():
            for b, sb in specs.items():
                gap = served[a] / sa.weight - served[b] / sb.weight
                assert gap <= MAX_ROWS / sa.weight + MAX_ROWS / sb.weight + 1e-9


def test_an_idle_model_earns_no_credit() -> None:
    """A model that waited for nothing does not then take the device for a long stretch."""
    policy = FairPolicy(1, {"a": ModelScheduling(), "b": ModelScheduling()})
    a, b = Batch("a", "a", 0, 10), Batch("b", "b", 0, 10)
    for _ in range(50):  # a alone for a while
        assert policy.pick([a]) == 0
        policy.done("a")
    picks = []
    for _ in range(10):  # then both: they alternate at once
        index = policy.pick([a, b])
        assert index is not None
        picks.append("ab"[index])
        policy.done("ab"[index])
    assert picks.count("b") == 5


def _scheduler(concurrency: int, **models: ModelScheduling) -> tuple[DeviceScheduler, Metrics]:
    metrics = Metrics()
    settings = SchedulingSettings(enabled=True, concurrency=concurrency)
    sched = DeviceScheduler(settings, {m: (s, ["cpu"]) for m, s in models.items()}, metrics)
    return sched, metrics


def _take(sched: DeviceScheduler, model: str, rows: int = 4) -> None:
    assert sched.acquire("cpu", [sched.batch(model, rows)]) == 0


def _waiter(sched: DeviceScheduler, model: str, order: list[str]) -> threading.Thread:
    def run() -> None:
        _take(sched, model)
        order.append(model)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _wait_until_waiting(sched: DeviceScheduler, n: int) -> None:
    lane = sched._lanes["cpu"]
    deadline = time.monotonic() + 5
    while len(lane.waiting) < n:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_freed_slot_goes_to_the_higher_priority_batch_whatever_came_first() -> None:
    sched, metrics = _scheduler(
        1, low=ModelScheduling(priority=0), high=ModelScheduling(priority=5)
    )
    _take(sched, "low")  # the device's one slot
    order: list[str] = []
    first = _waiter(sched, "low", order)
    _wait_until_waiting(sched, 1)
    second = _waiter(sched, "high", order)
    _wait_until_waiting(sched, 2)
    sched.release("low", "cpu")
    second.join(5)
    assert order == ["high"]
    sched.release("high", "cpu")
    first.join(5)
    assert order == ["high", "low"]
    sched.release("low", "cpu")
    assert metrics.scheduler_grants.labels("low", "cpu")._value.get() == 2
    assert metrics.scheduler_grants.labels("high", "cpu")._value.get() == 1
    assert metrics.scheduler_running.labels("cpu")._value.get() == 0
    counts = [
        s.value
        for m in metrics.scheduler_wait.collect()
        for s in m.samples
        if s.name == "kp_scheduler_wait_seconds_count"
    ]
    assert sum(counts) == 3


def test_a_model_at_its_limit_waits_while_another_takes_the_free_slot() -> None:
    sched, _ = _scheduler(
        2, a=ModelScheduling(priority=9, max_concurrent=1), b=ModelScheduling(priority=0)
    )
    _take(sched, "a", 1)
    order: list[str] = []
    waiting_a = _waiter(sched, "a", order)
    _wait_until_waiting(sched, 1)
    _waiter(sched, "b", order).join(5)
    assert order == ["b"]  # a's higher priority does not lift its limit
    sched.release("a", "cpu")
    waiting_a.join(5)
    assert order == ["b", "a"]


def test_disabled_scheduling_makes_no_scheduler() -> None:
    assert DeviceScheduler.for_graph(SchedulingSettings(), [], Metrics()) is None


@pytest.mark.parametrize("concurrency", [1, 3])
def test_many_threads_never_exceed_the_devices_slots(concurrency: int) -> None:
    sched, _ = _scheduler(concurrency, a=ModelScheduling(), b=ModelScheduling(weight=2))
    inside, most = 0, 0
    lock = threading.Lock()

    def work(model: str) -> None:
        nonlocal inside, most
        for _ in range(30):
            _take(sched, model, 2)
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.0005)
            with lock:
                inside -= 1
            sched.release(model, "cpu")

    threads = [threading.Thread(target=work, args=(m,)) for m in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert most == concurrency
    assert sched._lanes["cpu"].policy.total == 0


def test_tenants_share_a_device_by_their_weights_whatever_the_model() -> None:
    settings = SchedulingSettings(
        enabled=True, concurrency=1, fair_share="tenant", tenants={"gold": 3, "tin": 1}
    )
    sched = DeviceScheduler(settings, {"m": (ModelScheduling(), ["cpu"])})
    offer = [
        sched.batch("m", 8, RequestClass(None, "gold")),
        sched.batch("m", 8, RequestClass(None, "tin")),
        sched.batch("m", 8, RequestClass(None, "unlisted")),  # default weight, 1
    ]
    assert [b.flow for b in offer] == ["gold", "tin", "unlisted"]
    served = {"gold": 0, "tin": 0, "unlisted": 0}
    for _ in range(50):
        index = sched.acquire("cpu", offer)
        assert index is not None
        served[offer[index].flow] += 1
        sched.release("m", "cpu")
    assert served["gold"] == 30
    assert served["tin"] == served["unlisted"] == 10


def test_a_requests_priority_overrides_its_models() -> None:
    sched, _ = _scheduler(1, m=ModelScheduling(priority=5))
    assert sched.batch("m", 3).priority == 5
    assert sched.batch("m", 3, RequestClass(9, None)).priority == 9
    assert sched.batch("m", 3, RequestClass(0, None)).priority == 0


def test_an_offer_that_is_not_admitted_in_time_is_withdrawn_whole() -> None:
    sched, _ = _scheduler(1, a=ModelScheduling(), b=ModelScheduling())
    _take(sched, "a")
    assert sched.acquire("cpu", [sched.batch("b", 1), sched.batch("b", 2)], 0.01) is None
    assert sched._lanes["cpu"].waiting == []
    sched.release("a", "cpu")
    assert sched.acquire("cpu", [sched.batch("b", 1), sched.batch("b", 2)], 0.01) == 0
    assert sched._lanes["cpu"].policy.total == 1  # one of the offer, never two


def _request(**parameters: str) -> tuple[Envelope, Request]:
    env = Envelope("in", 0, 1, None, b"", 0, 0.0)
    return env, Request("r", "m", {}, parameters=dict(parameters))


def test_request_classes_come_from_parameters_then_headers() -> None:
    metrics = Metrics()
    tenants = SchedulingSettings(enabled=True, fair_share="tenant", tenants={"gold": 2})
    classes = RequestClasses(tenants, metrics)
    env, request = _request()
    assert classes.of(env, request, "m") is None
    env, request = _request(priority=" 7 ", tenant="gold")
    assert classes.of(env, request, "m") == RequestClass(7, "gold")
    env, request = _request()
    env.headers = [("KP.Priority", b"3"), ("kp.tenant", b"lead")]
    assert classes.of(env, request, "m") == RequestClass(3, "lead")
    assert metrics.scheduler_unlisted_tenants.labels("m")._value.get() == 1
    env, request = _request(priority="1")
    env.headers = [("kp.priority", b"9")]
    assert classes.of(env, request, "m") == RequestClass(1, None)  # the parameter wins
    by_model = RequestClasses(SchedulingSettings(enabled=True), metrics)
    env, request = _request(tenant="gold")
    assert by_model.of(env, request, "m") is None  # tenants mean nothing by model


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"priority": "high"}, "parameters.priority: 'high' is not a whole number from 0 to 1000"),
        ({"priority": "1001"}, "parameters.priority: '1001' is not a whole number"),
        ({"priority": "-1"}, "parameters.priority: '-1' is not a whole number"),
        ({"tenant": "x" * 129}, "parameters.tenant: longer than 128 characters"),
    ],
)
def test_a_bad_priority_or_tenant_is_a_request_error_naming_it(
    parameters: dict[str, str], message: str
) -> None:
    classes = RequestClasses(SchedulingSettings(enabled=True, fair_share="tenant"))
    env, request = _request(**parameters)
    with pytest.raises(RequestError, match=re.escape(message)):
        classes.of(env, request, "m")


def test_a_model_added_while_serving_shares_the_devices_and_may_bring_its_own() -> None:
    sched, _ = _scheduler(1, a=ModelScheduling(priority=0))
    sched.add("b", ModelScheduling(priority=5, max_concurrent=1), ["cpu", "cuda:1"])
    assert sched.devices() == ["cpu", "cuda:1"]
    assert sched.acquire("cuda:1", [sched.batch("b", 4)], timeout=1) == 0  # its own lane
    _take(sched, "a", 1)  # the one CPU slot
    order: list[str] = []
    waiting_a, waiting_b = _waiter(sched, "a", order), _waiter(sched, "b", order)
    _wait_until_waiting(sched, 2)
    sched.release("a", "cpu")
    waiting_b.join(5)
    assert order == ["b"]  # the added model's priority counts on the shared device
    sched.release("b", "cpu")
    waiting_a.join(5)
    assert order == ["b", "a"]
