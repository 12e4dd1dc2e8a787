"""Load generators for OpenAI-compatible streaming endpoints. Every request streams, so that time to first
token (TTFT) and time per output token (TPOT) are measured client-side.

- `run_load`, closed loop: `concurrency` streams each send requests back to back until `num_requests`
  have been sent. Above 32 streams the streams are spread over several client processes (aiohttp, one
  event loop each) that start together, so that the client is never what limits a fast server.
- `open_loop`: requests start on a fixed schedule (`rate` per second) whatever the answers do, from one or
  more client processes; it reports the rate it achieved and its own lateness, so that a result limited
  by the client shows as such.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field

import aiohttp
from tqdm import tqdm

STALL_S = 0.1  # a gap between two streamed events this long is a visible stall
STREAMS_PER_PROCESS = 32  # one asyncio client process parses ~5k SSE events/s; more streams get more processes


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed content events
    error: str = ""


@dataclass
class LoadReport:
    target: str
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    # Stutter that does not depend on how many tokens each event carries (ITL percentiles do: a stream that
    # sends two tokens per event has half the events, so the same stalls make twice the share of its gaps):
    # each request's longest gap, and the gaps of STALL_S or more per 1,000 output tokens.
    max_gap_p50_ms: float = float("nan")
    max_gap_p99_ms: float = float("nan")
    stalls_per_1k_tokens: float = float("nan")
    first_error: str = ""  # of the failed requests, the first one's error
    replicas_over_time: list | None = None  # autoscaling runs: (seconds into the load, running replicas)

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def chat_body(model: str, index: int, prompt_words: int, max_tokens: int, salt: str = "") -> dict:
    # The run's salt and the request's index lead the prompt, so that no request finds its prompt in the
    # engine's prefix cache: neither from another request nor from an earlier run against the same server.
    text = f"Run {salt}, request {index}. " + " ".join(
        ["Tell me a long story about the sea and the stars."] * (prompt_words // 10))
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    started = time.monotonic()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return RequestResult(ok=False, error=f"HTTP {response.status}: {(await response.read())[:200]!r}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if event.get("error"):
                    return RequestResult(ok=False, error=str(event["error"])[:200])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
                    now = time.monotonic()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    done = time.monotonic()
    if first is None:
        return RequestResult(ok=False, error="no content streamed")
    return RequestResult(ok=True, ttft_s=first - started, latency_s=done - started, output_tokens=tokens, itl_s=gaps)


@dataclass
class Share:
    """One client process's part of a load: its streams and its request indices."""

    url: str
    model: str
    api_key: str
    concurrency: int
    indices: list[int]
    prompt_words: int
    max_tokens: int
    show_progress: bool
    salt: str


async def _run_share(share: Share, start_barrier=None) -> tuple[list[RequestResult], float, float]:
    """Closed loop: `share.concurrency` streams send the share's requests back to back.
    Returns the results and the monotonic start and end of the timed part."""
    headers = {"Authorization": f"Bearer {share.api_key}"}
    connector = aiohttp.TCPConnector(limit=share.concurrency * 2)
    results: list[RequestResult] = []
    indices = iter(share.indices)
    async with aiohttp.ClientSession(connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        # Warm-up: first requests pay one-off costs (connection set-up, lazy init) on every stack.
        await asyncio.gather(*(_one(session, share.url, chat_body(share.model, -1 - i, share.prompt_words, 4, share.salt))
                               for i in range(2)))
        if start_barrier is not None:  # every client process starts its streams at the same moment
            await asyncio.get_running_loop().run_in_executor(None, start_barrier.wait)
        progress = tqdm(total=len(share.indices), unit="req", leave=False, disable=not share.show_progress)

        async def stream():
            for index in indices:
                body = chat_body(share.model, index, share.prompt_words, share.max_tokens, share.salt)
                results.append(await _one(session, share.url, body))
                progress.update()

        started = time.monotonic()
        await asyncio.gather(*(stream() for _ in range(share.concurrency)))
        ended = time.monotonic()
        progress.close()
    return results, started, ended


def _share_process(share: Share, start_barrier, queue) -> None:
    queue.put(asyncio.run(_run_share(share, start_barrier)))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_load(target: str, base_url: str, model: str, *, concurrency: int, num_requests: int,
                   prompt_words: int, max_tokens: int, api_key: str = "none", processes: int | None = None
                   ) -> LoadReport:
    """Closed-loop load, from one client process per STREAMS_PER_PROCESS streams (or `processes`), so that
    the client's own parsing never limits what a fast server shows."""
    url = f"{base_url.rstrip('/')}/chat/completions"
    salt = os.urandom(4).hex()
    processes = max(1, min(concurrency, processes or -(-concurrency // STREAMS_PER_PROCESS)))
    streams, counts = _split(concurrency, processes), _split(num_requests, processes)
    offsets = [sum(counts[:i]) for i in range(processes)]
    shares = [Share(url, model, api_key, streams[i], list(range(offsets[i], offsets[i] + counts[i])),
                    prompt_words, max_tokens, show_progress=i == 0, salt=salt) for i in range(processes)]
    if processes == 1:
        results, started, ended = await _run_share(shares[0])
    else:
        context = multiprocessing.get_context("spawn")
        barrier, queue = context.Barrier(processes), context.Queue()
        workers = [context.Process(target=_share_process, args=(share, barrier, queue), daemon=True)
                   for share in shares]
        for worker in workers:
            worker.start()
        loop = asyncio.get_running_loop()
        parts = [await loop.run_in_executor(None, queue.get) for _ in workers]
        for worker in workers:
            worker.join()
        results = [r for part in parts for r in part[0]]
        started, ended = min(p[1] for p in parts), max(p[2] for p in parts)
    return summarize(target, concurrency, results, ended - started)


def summarize(target: str, concurrency: int, results: list[RequestResult], wall: float) -> LoadReport:
    good = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000 for r in good]
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) * 1000 for r in good if r.output_tokens > 1]
    itl = [gap * 1000 for r in good for gap in r.itl_s]
    max_gaps = [max(r.itl_s) * 1000 for r in good if r.itl_s]
    stalls = sum(gap >= STALL_S for r in good for gap in r.itl_s)
    tokens = sum(r.output_tokens for r in good)
    return LoadReport(
        target=target, concurrency=concurrency, requests=len(results), failed=len(results) - len(good),
        wall_s=round(wall, 2), output_tok_s=round(sum(r.output_tokens for r in good) / wall, 2),
        ttft_p50_ms=round(percentile(ttft, 50), 1), ttft_p99_ms=round(percentile(ttft, 99), 1),
        tpot_p50_ms=round(percentile(tpot, 50), 2), tpot_p99_ms=round(percentile(tpot, 99), 2),
        itl_p50_ms=round(percentile(itl, 50), 2), itl_p99_ms=round(percentile(itl, 99), 2),
        max_gap_p50_ms=round(percentile(max_gaps, 50), 1), max_gap_p99_ms=round(percentile(max_gaps, 99), 1),
        stalls_per_1k_tokens=round(stalls / tokens * 1000, 2) if tokens else float("nan"),
        first_error=next((r.error for r in results if not r.ok), ""),
    )


# ---- Open loop: requests start on a fixed schedule whatever the answers do (no coordinated omission) ----

@dataclass
class OpenLoopShare:
    """One client process's part of an open-loop load: every `processes`-th slot of the schedule."""

    url: str
    body: dict
    api_key: str
    rate: float  # the whole load's requests per second
    count: int  # the whole load's requests
    process_index: int
    processes: int
    start_at: float  # wall-clock time (time.time()) at which slot 0 is due, the same for every process


@dataclass
class Timed:
    ok: bool
    lag_s: float = 0.0  # how late the client sent it after its due time (the client's own limit showing)
    sent_s: float = 0.0  # when it was sent, seconds after the start
    ttft_s: float = 0.0  # from sending to the first content event
    total_s: float = 0.0  # from sending to the end of the stream
    error: str = ""


async def _timed_stream(session: aiohttp.ClientSession, url: str, body: dict, due: float, origin: float) -> Timed:
    sent = time.perf_counter()
    when = {"lag_s": sent - due, "sent_s": sent - origin}  # failed requests were sent too: they count in the rate
    first = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                return Timed(ok=False, error=f"HTTP {response.status}", **when)
            async for line in response.content:
                if first is None and line.startswith(b"data: {"):
                    first = time.perf_counter()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Timed(ok=False, error=f"{type(exc).__name__}: {exc}", **when)
    done = time.perf_counter()
    if first is None:
        return Timed(ok=False, error="no event streamed", **when)
    return Timed(ok=True, ttft_s=first - sent, total_s=done - sent, **when)


async def _open_loop_share(share: OpenLoopShare) -> tuple[list[Timed], float]:
    """The share's results, and the CPU seconds its process used from the schedule's start to its end."""
    connector = aiohttp.TCPConnector(limit=0)  # as many connections as the schedule needs: it is the load
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": f"Bearer {share.api_key}"},
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(5):  # warm the pools on both sides
            await _timed_stream(session, share.url, share.body, time.perf_counter(), time.perf_counter())
        # Every process maps the shared wall-clock start onto its own monotonic clock once.
        origin = time.perf_counter() + (share.start_at - time.time())
        await asyncio.sleep(max(0.0, origin - time.perf_counter()))
        cpu_start = time.process_time()
        tasks = []
        for slot in range(share.process_index, share.count, share.processes):
            due = origin + slot / share.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_timed_stream(session, share.url, share.body, due, origin)))
        results = await asyncio.gather(*tasks)
        return results, time.process_time() - cpu_start


def _open_loop_process(share: OpenLoopShare, queue) -> None:
    queue.put(asyncio.run(_open_loop_share(share)))


@dataclass
class OpenLoopReport:
    target: str
    rate_rps: float  # asked for
    sent_rps: float  # achieved by the client: requests over the span of their sending
    completed_rps: float  # answered without error, over the span from the first send to the last answer
    requests: int
    failed: int
    lag_p99_ms: float  # the client's lateness: above a millisecond or two, the client is part of the result
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float
    total_p99_ms: float
    first_error: str = ""
    client_cores: float = 0.0  # CPU the client processes used while the load ran, in cores

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != ""}


def open_loop(target: str, base_url: str, body: dict, *, rate: float, count: int, processes: int = 1,
              api_key: str = "none") -> OpenLoopReport:
    """Send `count` streamed requests at `rate` per second from `processes` client processes (aiohttp, one
    event loop each, interleaved slots of one schedule) and report latencies and the rates achieved."""
    url = f"{base_url.rstrip('/')}/chat/completions"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    start_at = time.time() + 3.0 + 0.5 * processes  # time for every process to start and warm up
    shares = [OpenLoopShare(url, body, api_key, rate, count, i, processes, start_at) for i in range(processes)]
    workers = [context.Process(target=_open_loop_process, args=(share, queue), daemon=True) for share in shares]
    for worker in workers:
        worker.start()
    results: list[Timed] = []
    cpu_s = 0.0
    with tqdm(total=count, unit="req", leave=False, desc=target) as progress:
        for _ in workers:  # each share comes back whole when its process is done
            part, part_cpu_s = queue.get(timeout=max(600.0, 10 * count / rate))
            results.extend(part)
            cpu_s += part_cpu_s
            progress.update(len(part))
    for worker in workers:
        worker.join(timeout=30)
    return summarize_open_loop(target, rate, results, cpu_s)


def summarize_open_loop(target: str, rate: float, results: list[Timed], client_cpu_s: float = 0.0) -> OpenLoopReport:
    good = [r for r in results if r.ok]
    sends = sorted(r.sent_s for r in results) or [0.0]
    send_span = max(sends[-1] - sends[0], 1e-9)
    answer_span = max((max(r.sent_s + r.total_s for r in good) - sends[0]) if good else 0.0, 1e-9)
    ms = lambda values, q: round(percentile([v * 1000 for v in values], q), 2)  # noqa: E731
    return OpenLoopReport(
        target=target, rate_rps=rate, sent_rps=round((len(results) - 1) / send_span, 1),
        completed_rps=round(len(good) / answer_span, 1), requests=len(results), failed=len(results) - len(good),
        lag_p99_ms=ms([r.lag_s for r in results], 99),
        ttft_p50_ms=ms([r.ttft_s for r in good], 50), ttft_p99_ms=ms([r.ttft_s for r in good], 99),
        total_p50_ms=ms([r.total_s for r in good], 50), total_p99_ms=ms([r.total_s for r in good], 99),
        first_error=next((r.error for r in results if not r.ok), ""),
        client_cores=round(client_cpu_s / answer_span, 2))
