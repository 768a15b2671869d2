"""Servers that go away and servers that must not be flooded: a model server restarted mid-run
(the clients recover, the run fully succeeds), and ``max_in_flight`` (a cap on the requests in
flight per server, measured at the server)."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("starlette")

from agent_graph.rollout import rollout
from agent_graph.runner import make_group_tasks
from nodes.backends.clients.pool import ServerPool
from nodes.backends.config import build_backends, load_config
from nodes.backends.servers.http_common import BackgroundServer
from nodes.state import Budget
from storage.store import TrajectoryStore
from tests.fake_servers import FakeModelServer
from tests.faults_common import check_recorded_run, write_backends_config

CHAT = "/v1/chat/completions"


def payload(i: int) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"p{i}"}], "seed": i}


# --- max_in_flight ---------------------------------------------------------------------------


async def flood(pool: ServerPool, requests: int) -> list[str]:
    bodies = await asyncio.wait_for(  # a lost slot would hang: bound it
        asyncio.gather(*(pool.post_json("chat", CHAT, payload(i)) for i in range(requests))),
        timeout=30,
    )
    return [b["choices"][0]["message"]["content"] for b in bodies]


async def test_without_a_cap_the_server_sees_every_request_at_once():
    fake = FakeModelServer(latency_s=0.3)  # long enough for all 24 to be sent meanwhile
    with BackgroundServer(fake.app) as server:
        pool = ServerPool(server.url)
        answers = await flood(pool, 24)
        await pool.aclose()
    assert len(answers) == 24
    assert fake.peak_in_flight >= 12  # the measurement itself works


async def test_max_in_flight_caps_concurrent_requests_per_server():
    fakes = [FakeModelServer(latency_s=0.05), FakeModelServer(latency_s=0.05)]
    with BackgroundServer(fakes[0].app) as a, BackgroundServer(fakes[1].app) as b:
        pool = ServerPool([a.url, b.url], max_in_flight=3)
        started = time.perf_counter()
        answers = await flood(pool, 60)
        elapsed = time.perf_counter() - started
        counters = pool.counters()
        await pool.aclose()
    assert len(answers) == 60 and all(a.startswith("A blueprint of p") for a in answers)
    assert [f.peak_in_flight for f in fakes] == [3, 3]  # reached, never exceeded
    served = [f.requests["chat"] for f in fakes]  # a freed slot goes to the next in line:
    assert sum(served) == 60 and min(served) >= 20  # both servers used, about evenly
    assert all(c["peak_in_flight"] == 3 and c["waited"] > 0 for c in counters.values())
    assert sum(c["waited"] for c in counters.values()) == 60 - 6  # all but the first 6 waited
    assert all(s.in_flight == 0 for s in pool.servers) and not pool._waiters
    assert elapsed >= 60 / 6 * 0.05 * 0.9  # 10 waves of 6


async def test_a_request_cancelled_while_waiting_for_a_slot_frees_nothing_it_did_not_take():
    fake = FakeModelServer(latency_s=0.2)
    with BackgroundServer(fake.app) as server:
        pool = ServerPool(server.url, max_in_flight=1)
        first = asyncio.create_task(pool.post_json("chat", CHAT, payload(0)))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(pool.post_json("chat", CHAT, payload(i))) for i in (1, 2)]
        await asyncio.sleep(0.05)
        waiting[0].cancel()
        await asyncio.wait_for(asyncio.gather(first, waiting[1]), timeout=10)
        assert waiting[0].cancelled()
        # The slot is free again.
        await asyncio.wait_for(pool.post_json("chat", CHAT, payload(3)), timeout=10)
        await pool.aclose()
    assert fake.requests["chat"] == 3 and fake.peak_in_flight == 1
    assert pool.servers[0].in_flight == 0 and not pool._waiters


async def test_max_in_flight_from_the_backends_config_holds_during_a_run(tmp_path):
    fake = FakeModelServer(latency_s=0.02, edit_percent=50)
    with BackgroundServer(fake.app) as server:
        config = write_backends_config(tmp_path / "b.toml", server.url, max_in_flight=2)
        built = build_backends(load_config(config))
        assert built["planner"].pool.max_in_flight == built["generator"].pool.max_in_flight == 2
        store = TrajectoryStore(f"sqlite:///{tmp_path / 'capped.db'}")
        tasks = make_group_tasks([f"prompt {i}" for i in range(12)], 2, seed=1)
        outcome = await asyncio.wait_for(
            rollout(
                store,
                tasks,
                mode="reflect",
                budget=Budget(max_rounds=2),
                concurrency=24,
                backends_config=config,
            ),
            timeout=60,
        )
        run_id, results, requests = outcome.run_id, outcome.results, outcome.requests
    assert {r.status for r in results} == {"succeeded"}
    # Two pools (chat, images), each at most 2 in flight, on one server: at most 4 there.
    assert fake.peak_in_flight <= 4
    assert requests[server.url]["peak_in_flight"] == 2 and requests[server.url]["waited"] > 0
    check_recorded_run(store, run_id, 24)
    store.close()


# --- a server restarted mid-run --------------------------------------------------------------


async def test_a_model_server_restarted_mid_run_costs_retries_not_trajectories(tmp_path):
    first = FakeModelServer(latency_s=0.02, edit_percent=50)
    server = BackgroundServer(first.app).start()
    port = server.port
    # Backoff 0.1 s doubling over 6 retries waits up to ~6 s: longer than the 1 s outage.
    config = write_backends_config(
        tmp_path / "b.toml", server.url, retries=6, backoff_s=0.1, timeout_s=5.0
    )
    store = TrajectoryStore(f"sqlite:///{tmp_path / 'restart.db'}")
    tasks = make_group_tasks([f"{i % 3 + 2} green stars" for i in range(30)], 2, seed=4)
    replacement: dict[str, object] = {}

    async def restart() -> None:
        while sum(first.requests.values()) < 60:  # well into the run
            await asyncio.sleep(0.01)
        await asyncio.to_thread(server.stop)
        down_at = time.perf_counter()
        await asyncio.sleep(1.0)
        second = FakeModelServer(latency_s=0.02, edit_percent=50)
        replacement["fake"] = second
        replacement["server"] = await asyncio.to_thread(
            BackgroundServer(second.app, port=port).start
        )
        replacement["outage_s"] = time.perf_counter() - down_at

    restarter = asyncio.create_task(restart())
    try:
        outcome = await asyncio.wait_for(
            rollout(
                store,
                tasks,
                mode="reflect",
                budget=Budget(max_rounds=3),
                concurrency=16,
                backends_config=config,
            ),
            timeout=90,
        )
        run_id, results, requests = outcome.run_id, outcome.results, outcome.requests
        await restarter
    finally:
        restarter.cancel()
        if "server" in replacement:
            replacement["server"].stop()  # type: ignore[attr-defined]
        else:
            server.stop()
    counts = requests[server.url]
    second = replacement["fake"]
    assert replacement["outage_s"] >= 1.0
    assert [r.status for r in results] == ["succeeded"] * 60, [r.error for r in results]
    assert counts["failures"] > 0 and counts["retries"] == counts["failures"]
    assert counts["gave_up"] == 0
    assert sum(second.requests.values()) > 0  # the run went on against the new server
    check_recorded_run(store, run_id, 60)
    print(f"\nrestart: {counts}; new server served {dict(second.requests)}")
    store.close()


def test_max_in_flight_must_be_at_least_one(tmp_path):
    from nodes.backends.config import ConfigError

    config = write_backends_config(tmp_path / "b.toml", "http://127.0.0.1:9", max_in_flight=0)
    with pytest.raises(ConfigError, match=r"backends\.vlm\.max_in_flight: .*greater than or equal"):
        load_config(config)
    with pytest.raises(ValueError, match="max_in_flight"):
        ServerPool("http://127.0.0.1:9", max_in_flight=0)
