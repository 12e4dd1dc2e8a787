"""A closed-loop load generator for OpenAI-compatible streaming endpoints.

`concurrency` workers each send requests back to back until `num_requests` have been sent. Every request
streams, so that time to first token (TTFT) and time per output token (TPOT) are measured client-side.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm


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

    def row(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def chat_body(model: str, index: int, prompt_words: int, max_tokens: int) -> dict:
    # The index leads the prompt so that requests do not share one cached prefix end to end.
    text = f"Request {index}. " + " ".join(["Tell me a long story about the sea and the stars."] * (prompt_words // 10))
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def _one(client: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestResult:
    started = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("error"):
                    return RequestResult(ok=False, error=str(event["error"])[:200])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                choices = event.get("choices") or []
                if choices and (choices[0].get("delta", {}).get("content") or choices[0].get("text")):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
    done = time.perf_counter()
    if first is None:
        return RequestResult(ok=False, error="no content streamed")
    return RequestResult(ok=True, ttft_s=first - started, latency_s=done - started, output_tokens=tokens, itl_s=gaps)


async def run_load(target: str, base_url: str, model: str, *, concurrency: int, num_requests: int,
                   prompt_words: int, max_tokens: int, api_key: str = "none") -> LoadReport:
    url = f"{base_url.rstrip('/')}/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    results: list[RequestResult] = []
    counter = iter(range(num_requests))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        # Warm-up: first requests pay one-off costs (connection set-up, lazy init) on every stack.
        await asyncio.gather(*(_one(client, url, chat_body(model, -1 - i, prompt_words, 4), headers)
                               for i in range(2)))
        progress = tqdm(total=num_requests, desc=f"{target} c={concurrency}", unit="req", leave=False)

        async def worker():
            for index in counter:
                results.append(await _one(client, url, chat_body(model, index, prompt_words, max_tokens), headers))
                progress.update()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        progress.close()
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
    )
