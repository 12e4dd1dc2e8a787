"""Prefix-cache-aware routing: multi-turn chat sessions that share long system prompts, sent to the
app with the same engine replicas under each router in turn (Serve's default power-of-two, round-robin, and
ours), in one run. Each router gets fresh engines, so that none starts with another's cache.

The workload: `sessions` sessions of `turns` turns; each session's system prompt is one of `system_variants`
(about `system_words` words each), and each turn adds a user message of about `user_words` words. Each turn
carries the whole conversation, the answers the model gave included, as chat clients send it; `concurrency`
sessions run at a time. Reported per router: TTFT p50/p99 over all turns (and over turns 2+), output tokens/s
over the whole workload, and the engines' own prefix-cache hit rate (vLLM's counters, through /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass

import aiohttp
import httpx
from tqdm import tqdm

from jobs.bench.common import markdown_table, write_results
from jobs.bench.loadgen import percentile
from jobs.bench.serve_bench import engine_spec_in_local_ray

WORDS = ("river stone light garden market winter signal harbor paper engine silver forest window pattern "
         "question morning letter bridge mountain candle lantern orchard meadow compass thunder velvet").split()


@dataclass
class Workload:
    sessions: int = 16
    turns: int = 4
    system_variants: int = 4
    system_words: int = 750  # 761 tokens with SmolLM2's tokenizer
    user_words: int = 38  # 46 tokens
    max_tokens: int = 32
    concurrency: int = 4
    seed: int = 0

    def system_prompts(self) -> list[str]:
        rng = random.Random(self.seed)
        return [f"You are assistant variant {v}. Follow these notes: "
                + " ".join(rng.choice(WORDS) for _ in range(self.system_words)) for v in range(self.system_variants)]

    def user_turn(self, session: int, turn: int) -> str:
        rng = random.Random(f"{self.seed}-{session}-{turn}")
        return f"Session {session}, turn {turn}: " + " ".join(rng.choice(WORDS) for _ in range(self.user_words))


@dataclass
class RoutingReport:
    routing: str
    requests: int
    failed: int
    wall_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    later_turns_ttft_p50_ms: float  # turns 2+: the ones a conversation's own cache can serve
    engine_prefix_hit_rate: float  # vLLM's prefix-cache hits / queries (tokens), both replicas
    first_error: str = ""

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != ""}


async def _turn(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, int, str]:
    """One streamed turn: (TTFT s, output tokens, the answer's text)."""
    started = time.monotonic()
    first, tokens, text = None, 0, []
    async with http.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("error"):
                raise RuntimeError(str(event["error"])[:200])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.monotonic()
                    text.append(piece)
    if first is None:
        raise RuntimeError("no content streamed")
    return first - started, tokens, "".join(text)


async def run_sessions(base_url: str, model: str, work: Workload, label: str) -> tuple[list, list, float, str]:
    """Every session's turns: ([(turn, TTFT s, tokens)], errors, wall s)."""
    url = f"{base_url}/chat/completions"
    systems = work.system_prompts()
    gate = asyncio.Semaphore(work.concurrency)
    results: list[tuple[int, float, int]] = []
    errors: list[str] = []
    bar = tqdm(total=work.sessions * work.turns, desc=f"{label}: turns", unit="turn", leave=False)

    async def session(index: int, http: aiohttp.ClientSession) -> None:
        async with gate:
            messages = [{"role": "system", "content": systems[index % work.system_variants]}]
            for turn in range(work.turns):
                messages.append({"role": "user", "content": work.user_turn(index, turn)})
                body = {"model": model, "messages": messages, "max_tokens": work.max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
                try:
                    ttft, tokens, answer = await _turn(http, url, body)
                except Exception as exc:  # the session cannot go on without its answer
                    errors.append(f"{type(exc).__name__}: {exc}")
                    bar.update(work.turns - turn)
                    return
                results.append((turn, ttft, tokens))
                messages.append({"role": "assistant", "content": answer})
                bar.update(1)

    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(session(i, http) for i in range(work.sessions)))
    bar.close()
    return results, errors, time.monotonic() - started


def prefix_cache_counters(metrics_url: str) -> tuple[float, float]:
    """(hits, queries) of vLLM's prefix cache, in tokens, summed over the engines (GET /metrics)."""
    text = httpx.get(metrics_url, timeout=30).text
    totals = {"ray_vllm_prefix_cache_hits_total": 0.0, "ray_vllm_prefix_cache_queries_total": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["ray_vllm_prefix_cache_hits_total"], totals["ray_vllm_prefix_cache_queries_total"]


def settled_counters(metrics_url: str, limit_s: float = 60.0) -> tuple[float, float]:
    """The counters once Ray's export has caught up: the same two reads 6 s apart (it exports every ~5 s)."""
    deadline = time.monotonic() + limit_s
    last = prefix_cache_counters(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(6)
        now = prefix_cache_counters(metrics_url)
        if now == last:
            return now
        last = now
    return last


def measure(routing: str, base_url: str, model: str, work: Workload) -> RoutingReport:
    metrics_url = base_url.removesuffix("/v1") + "/metrics"
    hits_before, queries_before = settled_counters(metrics_url)
    results, errors, wall = asyncio.run(run_sessions(base_url, model, work, routing))
    hits_after, queries_after = settled_counters(metrics_url)
    queries = queries_after - queries_before
    ttfts = [t for _, t, _ in results]
    later = [t for turn, t, _ in results if turn > 0]
    return RoutingReport(
        routing=routing, requests=len(results) + len(errors), failed=len(errors), wall_s=round(wall, 2),
        output_tok_s=round(sum(n for _, _, n in results) / wall, 1),
        ttft_p50_ms=round(percentile(ttfts, 50) * 1000, 1), ttft_p99_ms=round(percentile(ttfts, 99) * 1000, 1),
        later_turns_ttft_p50_ms=round(percentile(later, 50) * 1000, 1),
        engine_prefix_hit_rate=round((hits_after - hits_before) / queries, 3) if queries > 0 else float("nan"),
        first_error=errors[0] if errors else "")


def compare(reports: list[RoutingReport], ours: str = "prefix", baseline: str = "power_of_two") -> dict:
    mine = next((r for r in reports if r.routing == ours), None)
    base = next((r for r in reports if r.routing == baseline), None)
    if mine is None or base is None:
        return {}
    return {"ttft_p50_lower_x": round(base.ttft_p50_ms / mine.ttft_p50_ms, 2),
            "ttft_p99_lower_x": round(base.ttft_p99_ms / mine.ttft_p99_ms, 2),
            "output_tok_s_ratio": round(mine.output_tok_s / base.output_tok_s, 3), "vs": baseline}


def prefix_benchmark(args: argparse.Namespace) -> None:
    from jobs.bench.serve_targets import served, tuneserve_config
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    spec = engine_spec_in_local_ray(args)
    on_gpu = spec.on_gpu
    work = Workload(sessions=args.sessions, turns=args.turns, system_variants=args.system_variants,
                    system_words=args.system_words, user_words=args.user_words, max_tokens=args.max_tokens,
                    concurrency=args.concurrency)
    reports = []
    for routing in args.routings.split(","):
        config = tuneserve_config(spec, replicas=args.replicas)
        model = config["models"][0]
        model["routing"], _, gap = routing.partition(":")  # prefix:N: prefix routing with load gap N
        if gap:
            model["routing_load_gap"] = int(gap)
        if on_gpu:
            model["resources"]["num_gpus"] = args.gpus_per_replica
        started = time.monotonic()
        print(f"== {routing}: starting {args.replicas} engine replicas ...", flush=True)
        with served(build_from_config(AppConfig.model_validate(config))) as url:
            print(f"== {routing}: ready in {time.monotonic() - started:.0f} s", flush=True)
            reports.append(measure(routing, url, spec.model_id, work))
        print(json.dumps(reports[-1].row()), flush=True)
    rows = [r.row() for r in reports]
    print(markdown_table(rows, ["routing", "requests", "failed", "ttft_p50_ms", "ttft_p99_ms",
                                "later_turns_ttft_p50_ms", "output_tok_s", "engine_prefix_hit_rate", "wall_s"]))
    comparison = compare(reports)
    if comparison:
        print(json.dumps(comparison))
    write_results(args, rows, workload=vars(work), comparison=comparison, replicas=args.replicas)


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
    prefix = sub.add_parser("prefix", help="multi-turn chat sessions under Serve's router, round-robin and "
                                           "prefix routing, on the same number of engine replicas")
    prefix.add_argument("--routings", default="power_of_two,round_robin,prefix",
                        help="comma list of power_of_two, round_robin, prefix, prefix:N (load gap N), each on "
                             "fresh engines")
    prefix.add_argument("--replicas", type=int, default=2, help="engine replicas")
    prefix.add_argument("--gpus-per-replica", type=float, default=1.0,
                        help="on GPU: 0.5 puts two replicas on one GPU (set gpu_memory_utilization to match "
                             "with --engine-kwargs)")
    prefix.add_argument("--model", default="default", help="HF folder ('default': cached SmolLM2)")
    prefix.add_argument("--model-id", default="bench-model")
    prefix.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    prefix.add_argument("--max-model-len", type=int, default=4096)
    prefix.add_argument("--max-num-seqs", type=int, default=64)
    prefix.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True)
    prefix.add_argument("--engine-kwargs", default=None, help="JSON of extra vLLM engine arguments")
    prefix.add_argument("--sessions", type=int, default=16)
    prefix.add_argument("--turns", type=int, default=4)
    prefix.add_argument("--system-variants", type=int, default=4)
    prefix.add_argument("--system-words", type=int, default=750, help="per system prompt (750: 761 SmolLM2 tokens)")
    prefix.add_argument("--user-words", type=int, default=38, help="per user turn (38: 46 SmolLM2 tokens)")
    prefix.add_argument("--max-tokens", type=int, default=32, help="output tokens per turn (ignore_eos)")
    prefix.add_argument("--concurrency", type=int, default=4, help="sessions at a time")
    prefix.add_argument("--out", default=None, help="write results as JSON here")
    prefix.set_defaults(run=prefix_benchmark)
