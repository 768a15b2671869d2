"""Small-request latency and peak memory of ``atelier serve image|lm`` under the requests that
used to exhaust them (large outputs, long runs, abandoned clients, full queues, memory bombs).

    PYTHONPATH=. nice -n 5 .venv/bin/python benchmarks/server_load.py [--quick] [--requests 40]

Builds the tiny random-weight models (``nodes.backends.engines.tiny_models.build_all``) into a
temporary directory, starts the real servers as subprocesses (``python -m atelier.cli serve
image|lm`` on free loopback ports, ``--torch-threads 1``, ``--log-level warning``), waits for
``/health``, and prints Markdown tables, in one run:

(1) image server, latency of small requests (the largest size the default output limit allows
    on CPU, 64×64 for the tiny SD, 2 steps, unique seeds) sent closed-loop by 2 concurrent
    clients, ``--requests`` per scenario: p50 / p99 / max seconds, non-200 answers, and p50 and
    p99 relative to scenario (a):

    a. alone;
    b. while another client sends ``"size": "1024x1024"`` back to back (400 at once);
    c. while another client sends a long allowed request (32×32, 900 steps, on a server with
       ``--max-steps 1000``) and disconnects after 1 s, again and again (its work is cancelled
       between denoising steps); the table also gives the denoising work those requests would
       have cost had they not been cancelled (900 × the measured 32×32 step time each);
    d. while a long allowed request runs, again and again, against a server with
       ``--request-timeout 2`` (answered 504 after ~2 s);
    e. bursts of 3 × ``--max-queue`` concurrent small requests against ``--max-queue 4``:
       the 503s, whether each carries ``Retry-After``, and the latency of the accepted ones;
    c′, d′. c and d again against servers with ``--max-batch 1`` (``--skip-unbatched``: not):
       the check that batching does not make a small request wait inside a long one's model
       call (jobs with different steps or sizes never share a batch), so the rows match.

    A scenario stops starting small requests after ``--scenario-cap`` seconds, and a small
    request the client gave up on (``--client-timeout``) is counted as "timeout"; both are
    reported rather than hidden.

(2) peak memory of a fresh server process per attack (VmHWM of ``/proc/PID/status``, reset with
    ``/proc/PID/clear_refs`` after start-up so the peak is the attack's own; VmRSS after):
    the lm server (tiny LLaVA) with a 28 MiB prompt, and with 16 solid-colour 4096×4096 PNGs as
    data-URL image parts; the image server with a 4096×4096 edit upload at ``size=auto``, and
    with a 1024×1024 generation. Status, seconds to answer, and the increase in MB.

The load generator runs in this process and shares the machine's cores with the servers; each
server's model worker has one torch thread. ``--quick`` is a smaller run (12 requests per
scenario, 300 instead of 900 steps for the long request, a 30 s scenario cap). On the 2-core
machine it was written on, a full run takes about 4 minutes, ``--quick`` about 1.5.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SMALL_SIZE = "64x64"  # the tiny SD's native size: the default output limit on CPU
SMALL_STEPS = 2
LARGE_SIZE = "1024x1024"
LONG_SIZE = "32x32"
LONG_STEPS = 900
LONG_DISCONNECT_S = 1.0
SHORT_DEADLINE_S = 2
MAX_QUEUE = 4
CLIENTS = 2
BIG_SIDE = 4096
PROMPT_MIB = 28
BOMB_IMAGES = 16
GENERATIONS = "/v1/images/generations"
CHAT = "/v1/chat/completions"


# --- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m atelier.cli serve KIND ...`` as a subprocess on a free loopback port."""

    def __init__(self, name: str, kind: str, args: list[str], logs: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = logs / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "atelier.cli",
            "serve",
            kind,
            "--port",
            str(self.port),
            "--torch-threads",
            "1",
            "--log-level",
            "warning",
            "--drain-timeout",
            "2",
            *args,
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), _pypath()]))}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_healthy(self, timeout: float = 180.0) -> float:
        """Seconds until ``/health`` answers 200 (raises if the process exits or times out)."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not answer /health:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _pypath() -> str:
    return os.environ.get("PYTHONPATH", "")


def start(servers: list[Server]) -> None:
    """Wait for every server's ``/health`` (they load in parallel)."""
    for server in servers:
        server.wait_healthy()


def stop(servers: list[Server]) -> None:
    for server in servers:
        try:
            server.stop()
        except Exception as error:  # keep stopping the others
            print(f"could not stop {server.name}: {error}", file=sys.stderr)


# --- image latency ---------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    latencies: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    sent: int = 0
    wall_s: float = 0.0
    note: str = ""

    @property
    def non_200(self) -> int:
        return sum(s != "200" for s in self.statuses)


def small_payload(i: int) -> dict[str, Any]:
    return {
        "prompt": "a red circle",
        "size": SMALL_SIZE,
        "num_inference_steps": SMALL_STEPS,
        "seed": 1_000_000 + i,
    }


def long_payload(i: int, steps: int) -> dict[str, Any]:
    return {"prompt": "a blue square", "size": LONG_SIZE, "num_inference_steps": steps, "seed": i}


async def post(
    http: httpx.AsyncClient, url: str, payload: Any
) -> tuple[str, float, httpx.Response | None]:
    """(status or "timeout"/"error", seconds, response)."""
    started = time.perf_counter()
    try:
        response = await http.post(url, json=payload)
    except httpx.TimeoutException:
        return "timeout", time.perf_counter() - started, None
    except httpx.HTTPError as error:
        return f"error:{type(error).__name__}", time.perf_counter() - started, None
    return str(response.status_code), time.perf_counter() - started, response


async def closed_loop(
    url: str, n: int, clients: int, cap_s: float, timeout_s: float, scenario: Scenario
) -> None:
    """``n`` small requests from ``clients`` concurrent clients, one after another each; no new
    request starts after ``cap_s`` seconds."""
    counter = iter(range(n))
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as http:

        async def client() -> None:
            for i in counter:
                if time.perf_counter() - started > cap_s:
                    return
                scenario.sent += 1
                status, seconds, _ = await post(http, url + GENERATIONS, small_payload(i))
                scenario.latencies.append(seconds)
                scenario.statuses.append(status)

        await asyncio.gather(*(client() for _ in range(clients)))
    scenario.wall_s = time.perf_counter() - started


async def with_interference(
    main: Awaitable[None], interferer: Callable[[asyncio.Event], Awaitable[None]]
) -> None:
    """Run ``main`` while ``interferer(stop)`` runs; then set ``stop`` and wait for it."""
    stop_event = asyncio.Event()
    task = asyncio.ensure_future(interferer(stop_event))
    await asyncio.sleep(0.3)  # let the interference start first
    try:
        await main
    finally:
        stop_event.set()
        try:
            await asyncio.wait_for(task, 30)
        except (asyncio.TimeoutError, TimeoutError):
            task.cancel()


@dataclass
class Interference:
    statuses: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    headers_ok: int = 0

    def count(self, status: str) -> int:
        return sum(s == status for s in self.statuses)


def large_sender(url: str, record: Interference) -> Callable[[asyncio.Event], Awaitable[None]]:
    async def run(stop_event: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            i = 0
            while not stop_event.is_set():
                payload = {"prompt": "a red circle", "size": LARGE_SIZE, "seed": i}
                status, seconds, _ = await post(http, url + GENERATIONS, payload)
                record.statuses.append(status)
                record.seconds.append(seconds)
                i += 1

    return run


def disconnecting_sender(
    url: str, steps: int, after_s: float, record: Interference
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """Sends a long request, closes the connection after ``after_s`` seconds, repeats."""

    async def run(stop_event: asyncio.Event) -> None:
        i = 0
        while not stop_event.is_set():
            started = time.perf_counter()
            async with httpx.AsyncClient(timeout=after_s) as http:  # closed on exit
                status, _, _ = await post(http, url + GENERATIONS, long_payload(i, steps))
            record.statuses.append("disconnected" if status == "timeout" else status)
            record.seconds.append(time.perf_counter() - started)
            i += 1

    return run


def waiting_sender(
    url: str, steps: int, record: Interference
) -> Callable[[asyncio.Event], Awaitable[None]]:
    """Sends a long request and waits for its answer (a 504 at the server's deadline), repeats."""

    async def run(stop_event: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            i = 0
            while not stop_event.is_set():
                status, seconds, _ = await post(http, url + GENERATIONS, long_payload(i, steps))
                record.statuses.append(status)
                record.seconds.append(seconds)
                i += 1

    return run


async def bursts(
    url: str, n: int, burst: int, timeout_s: float, scenario: Scenario, record: Interference
) -> None:
    """``n`` small requests in bursts of ``burst`` concurrent ones, each burst after the last
    has been answered; 503s go to ``record`` (with whether ``Retry-After`` was there)."""
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=burst, max_keepalive_connections=burst)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as http:
        i = 0
        while i < n:
            size = min(burst, n - i)
            answers = await asyncio.gather(
                *(post(http, url + GENERATIONS, small_payload(i + k)) for k in range(size))
            )
            i += size
            for status, seconds, response in answers:
                scenario.sent += 1
                if status == "503":
                    record.statuses.append(status)
                    record.seconds.append(seconds)
                    retry = response.headers.get("retry-after") if response is not None else None
                    record.headers_ok += bool(retry and retry.isdigit())
                else:
                    scenario.latencies.append(seconds)
                    scenario.statuses.append(status)
    scenario.wall_s = time.perf_counter() - started


async def step_seconds(url: str) -> float:
    """Seconds per denoising step of a lone 32×32 request: (t(42 steps) - t(2 steps)) / 40,
    best of 2 each."""
    times: dict[int, float] = {}
    async with httpx.AsyncClient(timeout=120) as http:
        for steps in (2, 42):
            best = math.inf
            for seed in range(2):
                status, seconds, _ = await post(http, url + GENERATIONS, long_payload(seed, steps))
                if status != "200":
                    raise RuntimeError(f"the step-time probe got {status}")
                best = min(best, seconds)
            times[steps] = best
    return (times[42] - times[2]) / 40


async def warm_up(url: str) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        for i in range(3):
            await post(http, url + GENERATIONS, small_payload(-1 - i))


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        return (await http.get(url + "/stats")).json()


def percentile(values: list[float], q: float) -> float:
    """Nearest rank (p99 of 40 values is the largest)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def disconnect_scenario(
    name: str, url: str, args: argparse.Namespace, step_s: float
) -> Scenario:
    """Small requests while a long request is sent and dropped after 1 s, again and again."""
    scenario = Scenario(name)
    before = await stats(url)
    cut = Interference()
    await with_interference(
        closed_loop(url, args.requests, CLIENTS, args.scenario_cap, args.client_timeout, scenario),
        disconnecting_sender(url, args.long_steps, LONG_DISCONNECT_S, cut),
    )
    await asyncio.sleep(1.0)
    after = await stats(url)
    abandoned = after["abandoned_batches"] - before["abandoned_batches"]
    uncancelled = len(cut.statuses) * args.long_steps * step_s
    scenario.note = (
        f"{len(cut.statuses)} long sent ({cut.count('disconnected')} dropped), "
        f"{abandoned} batches abandoned; uncancelled: {uncancelled:.0f} s of denoising "
        f"({args.long_steps} × {step_s * 1000:.0f} ms each) in this {scenario.wall_s:.0f} s"
    )
    return scenario


async def deadline_scenario(name: str, url: str, args: argparse.Namespace) -> Scenario:
    """Small requests while a long request runs into the server's deadline, again and again."""
    scenario = Scenario(name)
    before = await stats(url)
    held = Interference()
    await with_interference(
        closed_loop(url, args.requests, CLIENTS, args.scenario_cap, args.client_timeout, scenario),
        waiting_sender(url, args.long_steps, held),
    )
    after = await stats(url)
    codes = ", ".join(f"{held.count(s)} × {s}" for s in sorted(set(held.statuses)))
    scenario.note = (
        f"long: {codes}, answered in {min(held.seconds, default=math.nan):.1f}–"
        f"{max(held.seconds, default=math.nan):.1f} s; "
        f"{after['abandoned_batches'] - before['abandoned_batches']} batches abandoned"
    )
    return scenario


async def image_latency(
    servers: dict[str, Server], args: argparse.Namespace
) -> tuple[list[Scenario], float]:
    """Scenarios a–e (and c′, d′ on servers with ``--max-batch 1``); the 32×32 step time."""
    n, cap, timeout = args.requests, args.scenario_cap, args.client_timeout
    urls = {name: server.url for name, server in servers.items()}
    for url in urls.values():
        await warm_up(url)
    step_s = await step_seconds(urls["main"])

    a = Scenario("a. alone")
    await closed_loop(urls["main"], n, CLIENTS, cap, timeout, a)

    b = Scenario(f"b. + {LARGE_SIZE} requests back to back")
    large = Interference()
    await with_interference(
        closed_loop(urls["main"], n, CLIENTS, cap, timeout, b), large_sender(urls["main"], large)
    )
    b.note = f"{len(large.statuses)} large sent: {large.count('400')} × 400"
    b.note += f", each answered in ≤ {max(large.seconds, default=math.nan) * 1000:.0f} ms"
    if len(large.statuses) != large.count("400"):
        b.note += f" (other: {sorted(set(large.statuses) - {'400'})})"

    long = f"{LONG_SIZE} × {args.long_steps} steps"
    c = await disconnect_scenario(f"c. + {long}, dropped after 1 s", urls["main"], args, step_s)
    timeout_flag = f"--request-timeout {SHORT_DEADLINE_S}"
    d = await deadline_scenario(f"d. + {long}, {timeout_flag}", urls["deadline"], args)

    e = Scenario(f"e. bursts of {3 * MAX_QUEUE}, --max-queue {MAX_QUEUE}")
    refused = Interference()
    await bursts(urls["queue"], n, 3 * MAX_QUEUE, timeout, e, refused)
    e.note = (
        f"{len(refused.statuses)} × 503 of {e.sent}, {refused.headers_ok} with Retry-After; "
        f"each 503 in ≤ {max(refused.seconds, default=math.nan) * 1000:.0f} ms"
    )
    scenarios = [a, b, c, d, e]
    if "main1" in urls:
        scenarios.append(
            await disconnect_scenario("c′. as c, --max-batch 1", urls["main1"], args, step_s)
        )
        scenarios.append(
            await deadline_scenario("d′. as d, --max-batch 1", urls["deadline1"], args)
        )
    return scenarios, step_s


def seconds(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def ratio(value: float, base: float) -> str:
    return "–" if math.isnan(value) or math.isnan(base) else f"{value / base:.2f}"


def latency_table(scenarios: list[Scenario]) -> str:
    base = scenarios[0]
    base_p50, base_p99 = percentile(base.latencies, 0.5), percentile(base.latencies, 0.99)
    header = (
        "| scenario | sent | 200 | non-200 | p50 s | p99 s | max s | p50 × a | p99 × a | "
        "wall s | other client |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for s in scenarios:
        ok = [t for t, st in zip(s.latencies, s.statuses, strict=True) if st == "200"]
        p50, p99 = percentile(ok, 0.5), percentile(ok, 0.99)
        others = sorted(set(s.statuses) - {"200"})
        non_200 = str(s.non_200) + (f" ({', '.join(others)})" if others else "")
        cells = [
            s.name,
            str(s.sent),
            str(len(ok)),
            non_200,
            seconds(p50),
            seconds(p99),
            seconds(max(ok, default=math.nan)),
            ratio(p50, base_p50),
            ratio(p99, base_p99),
            f"{s.wall_s:.1f}",
            s.note or "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- memory attacks --------------------------------------------------------------------------


def proc_status_mb(pid: int) -> dict[str, float]:
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                values[key] = int(rest.split()[0]) / 1024  # kB → MiB
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def solid_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 40, 40)).save(buffer, "PNG", compress_level=9)
    return buffer.getvalue()


@dataclass
class Attack:
    name: str
    server: str
    expect: str
    send: Callable[[httpx.Client, str], httpx.Response]


def attacks(png: bytes) -> list[Attack]:
    prompt_body = json.dumps(
        {
            "messages": [{"role": "user", "content": "a" * (PROMPT_MIB * 1024 * 1024)}],
            "max_tokens": 4,
        }
    ).encode()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    parts: list[dict[str, Any]] = [{"type": "text", "text": "describe"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for _ in range(BOMB_IMAGES)]
    bomb_body = json.dumps(
        {"messages": [{"role": "user", "content": parts}], "max_tokens": 4}
    ).encode()
    json_headers = {"content-type": "application/json"}

    def prompt(http: httpx.Client, base: str) -> httpx.Response:
        return http.post(base + CHAT, content=prompt_body, headers=json_headers)

    def bomb(http: httpx.Client, base: str) -> httpx.Response:
        return http.post(base + CHAT, content=bomb_body, headers=json_headers)

    def edit(http: httpx.Client, base: str) -> httpx.Response:
        return http.post(
            base + "/v1/images/edits",
            data={"prompt": "make it blue", "size": "auto"},
            files={"image": ("big.png", png, "image/png")},
        )

    def large(http: httpx.Client, base: str) -> httpx.Response:
        return http.post(base + GENERATIONS, json={"prompt": "x", "size": LARGE_SIZE})

    return [
        Attack(
            f"{PROMPT_MIB} MiB prompt in one message ({len(prompt_body) / 2**20:.1f} MiB body)",
            "lm",
            "400 characters",
            prompt,
        ),
        Attack(
            f"{BOMB_IMAGES} solid {BIG_SIDE}×{BIG_SIDE} PNGs ({len(png) / 1024:.0f} KiB each) "
            "as data URLs",
            "lm",
            "400 pixel budget",
            bomb,
        ),
        Attack(f"edit, {BIG_SIDE}×{BIG_SIDE} upload, size=auto", "image", "400", edit),
        Attack(f'generation, "size": "{LARGE_SIZE}"', "image", "400", large),
    ]


def memory(models: Any, logs: Path, png: bytes) -> list[tuple[Attack, dict[str, Any]]]:
    """Each attack against its own fresh server (all started together, attacked in turn)."""
    plan = attacks(png)
    args = {
        "lm": ("lm", ["--model", str(models.vlm)]),
        "image": (
            "image",
            ["--model", str(models.sd), "--edit-model", str(models.ip2p), "--steps", "2"],
        ),
    }
    servers = [Server(f"mem{i}-{a.server}", *args[a.server], logs) for i, a in enumerate(plan)]
    results = []
    try:
        start(servers)
        with httpx.Client(timeout=120) as http:
            for attack, server in zip(plan, servers, strict=True):
                http.get(server.url + "/health")
                time.sleep(0.5)
                reset = reset_peak(server.pid)
                before = proc_status_mb(server.pid)
                started = time.perf_counter()
                response = attack.send(http, server.url)
                seconds = time.perf_counter() - started
                time.sleep(0.2)
                after = proc_status_mb(server.pid)
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:200]
                results.append(
                    (
                        attack,
                        {
                            "status": response.status_code,
                            "seconds": seconds,
                            "before": before,
                            "after": after,
                            "reset": reset,
                            "message": message,
                        },
                    )
                )
    finally:
        stop(servers)
    return results


def memory_table(results: list[tuple[Attack, dict[str, Any]]]) -> str:
    header = (
        "| attack | server | expected | status | s to answer | VmHWM before MB | "
        "VmHWM after MB | increase MB | VmRSS after MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for attack, r in results:
        hwm_before = r["before"]["VmHWM"]
        hwm_after = r["after"]["VmHWM"]
        cells = [
            attack.name,
            attack.server,
            attack.expect,
            str(r["status"]),
            f"{r['seconds']:.2f}",
            f"{hwm_before:.0f}" + ("" if r["reset"] else " (not reset)"),
            f"{hwm_after:.0f}",
            f"{hwm_after - hwm_before:+.0f}",
            f"{r['after']['VmRSS']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Answers:")
    for attack, r in results:
        lines.append(f"- {attack.name}: {r['status']} {r['message'][:160]!r}")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (~2 minutes)")
    parser.add_argument("--requests", type=int, default=None, help="small requests per scenario")
    parser.add_argument(
        "--scenario-cap", type=float, default=60.0, help="no new small request after this (s)"
    )
    parser.add_argument(
        "--client-timeout", type=float, default=30.0, help="a small request's client timeout (s)"
    )
    parser.add_argument("--skip-memory", action="store_true", help="only the latency table")
    parser.add_argument(
        "--skip-unbatched", action="store_true", help="leave out c′ and d′ (--max-batch 1)"
    )
    args = parser.parse_args()
    args.requests = args.requests or (12 if args.quick else 40)
    args.long_steps = 300 if args.quick else LONG_STEPS
    if args.quick:
        args.scenario_cap = min(args.scenario_cap, 30.0)

    started = time.perf_counter()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="atelier-load-") as scratch:
        from nodes.backends.engines.tiny_models import build_all, quiet_progress_bars

        quiet_progress_bars()
        models = build_all(Path(scratch) / "models")
        logs = Path(scratch) / "logs"
        logs.mkdir()
        print(f"tiny models built in {time.perf_counter() - started:.1f} s")
        try:
            common = ["--model", str(models.sd), "--steps", str(SMALL_STEPS)]
            long = ["--max-steps", str(LONG_STEPS + 100)]
            deadline = ["--request-timeout", str(SHORT_DEADLINE_S)]
            specs = {
                "main": [*common, *long],
                "deadline": [*common, *long, *deadline],
                "queue": [*common, "--max-queue", str(MAX_QUEUE)],
            }
            if not args.skip_unbatched:
                specs["main1"] = [*specs["main"], "--max-batch", "1"]
                specs["deadline1"] = [*specs["deadline"], "--max-batch", "1"]
            image = {
                name: Server(f"image-{name}", "image", spec, logs) for name, spec in specs.items()
            }
            servers = list(image.values())
            start(servers)
            print(f"image servers up at {time.perf_counter() - started:.1f} s")
            scenarios, step_s = asyncio.run(image_latency(image, args))
            stop(servers)
            print(f"latency scenarios done at {time.perf_counter() - started:.1f} s")
            results = []
            if not args.skip_memory:
                png = solid_png(BIG_SIDE)
                results = memory(models, logs, png)
        finally:
            stop(servers)

    print()
    print(
        f"**(1) image server: {CLIENTS} closed-loop clients, {args.requests} requests of "
        f"{SMALL_SIZE} × {SMALL_STEPS} steps per scenario; tiny SD, --torch-threads 1, "
        f"--max-batch 8 (default) unless said; a 32×32 step took {step_s * 1000:.0f} ms**"
    )
    print()
    print(latency_table(scenarios))
    if results:
        print()
        print(
            "**(2) peak memory of a fresh server per attack (VmHWM reset after start-up; MB = "
            "MiB)**"
        )
        print()
        print(memory_table(results))
    print()
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
