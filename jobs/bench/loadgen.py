"""A closed-loop load generator for OpenAI-compatible streaming endpoints.

`concurrency` streams each send requests back to back until `num_requests` have been sent. Every request
streams, so that time to first token (TTFT) and time per output token (TPOT) are measured client-side.
Above 32 streams the streams are spread over several client processes (aiohttp, one event loop each)
that start together, so that the client is never what limits a fast server.
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
    return LoadReport(
        target=target, concurrency=concurrency, requests=len(results), failed=len(results) - len(good),
        wall_s=round(wall, 2), output_tok_s=round(sum(r.output_tokens for r in good) / wall, 2),
        ttft_p50_ms=round(percentile(ttft, 50), 1), ttft_p99_ms=round(percentile(ttft, 99), 1),
        tpot_p50_ms=round(percentile(tpot, 50), 2), tpot_p99_ms=round(percentile(tpot, 99), 2),
        itl_p50_ms=round(percentile(itl, 50), 2), itl_p99_ms=round(percentile(itl, 99), 2),
        first_error=next((r.error for r in results if not r.ok), ""),
    )
