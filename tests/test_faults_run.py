"""A recorded run through a proxy that breaks 20 % of the requests to the model servers.

The runner must finish in bounded time; every trajectory ends succeeded, or failed with the
fault named; the pool's retry counts agree exactly with what the proxy injected; and the store
holds every step once (``tests/faults_common.check_recorded_run``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("starlette")

from agent_graph.rollout import rollout
from agent_graph.runner import make_group_tasks
from nodes.backends.base import BackendUnavailable
from nodes.backends.clients.pool import RetryPolicy, ServerPool, Timeouts
from nodes.backends.servers.http_common import BackgroundServer
from nodes.state import Budget
from storage.store import TrajectoryStore
from tests.fake_servers import FakeModelServer
from tests.fault_proxy import FAULTS, RETRIED, FaultProxy
from tests.faults_common import check_recorded_run, write_backends_config

NO_RETRY = RetryPolicy(retries=0, backoff_s=0.0, cooldown_s=0.0)


@pytest.fixture(scope="module")
def fake_server():
    fake = FakeModelServer(latency_s=0.002, edit_percent=50)
    with BackgroundServer(fake.app) as server:
        yield fake, server


@pytest.mark.parametrize("fault", FAULTS)
async def test_each_fault_reaches_the_client_as_intended(fake_server, fault):
    _, server = fake_server
    with FaultProxy(server.url, rate=1.0, mix={fault: 1.0}, drip_delay_s=0.05) as proxy:
        pool = ServerPool(
            proxy.url, retry=NO_RETRY, timeouts=Timeouts(request_s=1.0, connect_s=1.0)
        )
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 1}
        started = time.perf_counter()
        try:
            body = await pool.post_json("chat", "/v1/chat/completions", payload)
            outcome = body["choices"][0]["message"]["content"]
        except BackendUnavailable as error:
            outcome = error
        elapsed = time.perf_counter() - started
        await pool.aclose()
    assert proxy.injected == {fault: 1} and proxy.requests == 1
    counters = pool.counters()[proxy.url]
    if fault == "slow_drip":  # 8 chunks, 50 ms apart: slow (each read < 1 s), but it works
        assert outcome.startswith("A blueprint") and elapsed >= 0.3
        assert counters["failures"] == 0
        return
    assert isinstance(outcome, BackendUnavailable), outcome
    assert proxy.url in str(outcome) and "chat" in str(outcome)
    assert counters["failures"] == (fault in RETRIED) and counters["gave_up"] == (fault in RETRIED)
    expected = {
        "reset_before": ("ReadError", "RemoteProtocolError"),
        "reset_after": ("ReadError", "RemoteProtocolError"),
        "http_500": ("HTTP 500",),
        "timeout": ("ReadTimeout",),
        "truncated": ("RemoteProtocolError", "ReadError"),
        "garbage": ("is not JSON",),
    }[fault]
    assert any(text in str(outcome) for text in expected), outcome
    forwarded = fault in ("reset_after", "truncated", "slow_drip")
    assert proxy.forwarded == forwarded  # the others never reach the server
    assert elapsed < 5  # an injected timeout costs the 1 s read timeout, not a hang


@pytest.mark.slow
@pytest.mark.parametrize("retries", [4, 1])
async def test_a_run_at_20_percent_faults_finishes_and_loses_nothing(
    fake_server, tmp_path, retries
):
    """With 4 retries (5 attempts) nearly every request gets through; with 1 retry about one
    request in 40 fails twice, so requests are given up too and their trajectories fail."""
    fake, server = fake_server
    before = sum(fake.requests.values())
    # Garbage (a 200 that is not JSON) is not retried: rarer, so most trajectories succeed.
    mix = {kind: 1.0 for kind in FAULTS} | {"garbage": 0.2}
    with FaultProxy(server.url, rate=0.2, mix=mix, seed=6) as proxy:
        config = write_backends_config(tmp_path / "backends.toml", proxy.url, retries=retries)
        store = TrajectoryStore(f"sqlite:///{tmp_path / 'faults.db'}")
        prompts = [f"{i % 5 + 1} red circles left of a blue square" for i in range(50)]
        tasks = make_group_tasks(prompts, group_size=2, seed=3)  # 100 trajectories
        started = time.perf_counter()
        outcome = await asyncio.wait_for(
            rollout(
                store,
                tasks,
                mode="decompose",
                budget=Budget(max_rounds=2),
                name="faults",
                concurrency=32,
                backends_config=config,
            ),
            timeout=120,
        )
        run_id, results, requests = outcome.run_id, outcome.results, outcome.requests
        elapsed = time.perf_counter() - started
    # Finished, in bounded time, with every trajectory accounted for.
    assert len(results) == 100 and elapsed < 60
    assert store.run(run_id).status == "finished"
    statuses = check_recorded_run(store, run_id, 100)

    # The pool's counts agree with what the proxy did.
    attempts = sum(c["requests"] for c in requests.values())
    failures = sum(c["failures"] for c in requests.values())
    retried = sum(c["retries"] for c in requests.values())
    gave_up = sum(c["gave_up"] for c in requests.values())
    assert list(requests) == [proxy.url]
    assert attempts == proxy.requests  # every attempt reached the proxy, none twice
    assert failures == proxy.retried_faults  # each injected failure seen once
    assert retried == failures - gave_up  # each failure retried unless it was the last
    assert proxy.forwarded == sum(fake.requests.values()) - before
    # 20 % faults, 5 of the 6.2 weights retried: ~16 % of the attempts failed.
    assert 0.10 * attempts <= failures <= 0.24 * attempts
    if retries == 1:
        assert gave_up > 0

    # Failed trajectories: exactly the garbage answers and the requests given up, named.
    failed = [r for r in results if r.status == "failed"]
    not_json = [r for r in failed if "not JSON" in r.error]
    exhausted = [r for r in failed if f"gave up after {retries + 1} attempts" in r.error]
    assert len(not_json) == proxy.injected["garbage"]
    assert len(exhausted) == gave_up
    assert len(failed) == len(not_json) + len(exhausted) == statuses["failed"]
    for r in failed:
        assert proxy.url in r.error
    # Decompose mode (plan, decompose, draw, reflect, refine, ...): several calls per trajectory.
    assert attempts - retried >= 6 * statuses["succeeded"]
    assert fake.requests["images.edits"] >= statuses["succeeded"]
    print(
        f"\n{attempts} attempts, {dict(proxy.injected)}, {retried} retried, {gave_up} given up,"
        f" {statuses}, {elapsed:.1f} s"
    )
    store.close()
