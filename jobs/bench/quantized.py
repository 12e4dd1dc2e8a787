"""Quantized against full-precision weights, one contender after another in one run, each on vLLM's own
OpenAI server with the same engine arguments:

- size on disk (the folder's safetensors files);
- engine memory: on a GPU, vLLM's "Model loading took X GiB" (the weights as loaded); on a CPU, the PSS of
  the server's process tree after the load (every contender gets the same KV cache space);
- output tok/s and TTFT at each concurrency (closed loop, streaming, `ignore_eos`);
- GSM8K answer perplexity from the served model's prompt logprobs (`--answers 0` skips it: dummy weights).

A contender is `NAME=PATH[,KEY=VALUE...]`: KEY=VALUE are vLLM engine arguments for that one (for example
`quantization=fp8`, `dtype=bfloat16`). The dtype is otherwise what the app would serve it in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
from pathlib import Path

from jobs.bench.common import markdown_table, write_results
from jobs.bench.loadgen import run_load
from jobs.bench.serve_targets import EngineSpec, raw_vllm

LOADED = re.compile(r"Model loading took ([0-9.]+) GiB")


def parse_contender(text: str) -> tuple[str, str, dict]:
    """`fp8=/models/x,quantization=fp8` -> ("fp8", "/models/x", {"quantization": "fp8"})."""
    head, *pairs = text.split(",")
    name, sep, path = head.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--contender {text!r}: expected NAME=PATH[,KEY=VALUE...]")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--contender {text!r}: {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, path, options


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def tree_pss_mib(root: int) -> float:
    """Proportional set size of a process and its descendants (shared libraries counted once overall)."""
    from cluster.local import _with_descendants

    total_kib = 0
    for pid in _with_descendants({root}):
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
        except OSError:
            pass
    return round(total_kib / 1024, 1)


def measure_contender(name: str, path: str, options: dict, base: EngineSpec, levels: list[int], requests: int,
                      per_stream: int, prompt_words: int, max_tokens: int, answers: list[tuple[str, str]]
                      ) -> list[dict]:
    """One row per concurrency level; a contender whose engine does not start gives one row with its error
    (what this machine's vLLM cannot run is a result too)."""
    try:
        return _measure(name, path, options, base, levels, requests, per_stream, prompt_words, max_tokens, answers)
    except RuntimeError as exc:
        log_path = str(exc).rpartition("vLLM's log: ")[2]
        lines = Path(log_path).read_text(errors="replace").splitlines() if Path(log_path).is_file() else []
        # the root cause, not vLLM's closing "Engine core initialization failed" line
        errors = [line for line in lines if "Error: " in line and "initialization failed" not in line]
        row = {"contender": name, "path": path, **options, "error": errors[0][-300:] if errors else str(exc)}
        print(json.dumps(row), flush=True)
        return [row]


def _measure(name: str, path: str, options: dict, base: EngineSpec, levels: list[int], requests: int,
             per_stream: int, prompt_words: int, max_tokens: int, answers: list[tuple[str, str]]) -> list[dict]:
    from openai import OpenAI
    from transformers import AutoTokenizer

    from cluster.engine_defaults import resolve_dtype
    from jobs.evaluate.quality import served_answer_nll
    from serve_app.quantization import folder_method, read_folder_config

    options = dict(options)
    quantized = bool(options.get("quantization") or folder_method(read_folder_config(path) or {}))
    dtype = options.pop("dtype", None) or resolve_dtype("auto", base.on_gpu, quantized)
    spec = EngineSpec(**{**base.__dict__, "path": path, "dtype": dtype, "extra": {**(base.extra or {}), **options}})
    server: dict = {}
    with raw_vllm(spec, process_info=server) as urls:
        url = urls["vllm"]
        row = {"contender": name, "path": path, "dtype": dtype, **options, "size_mib": round(folder_bytes(path) / 2**20, 1)}
        if answers:
            client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            total, count = served_answer_nll(client, spec.model_id, AutoTokenizer.from_pretrained(path), answers)
            row["answer_ppl"] = round(math.exp(total / count), 4)
        rows = []
        for level in levels:
            report = asyncio.run(run_load(name, url, spec.model_id, concurrency=level,
                                          num_requests=max(level, min(requests, per_stream * level)),
                                          prompt_words=prompt_words,
                                          max_tokens=max_tokens))
            rows.append({**row, "concurrency": level, "failed": report.failed,
                         "output_tok_s": report.output_tok_s, "ttft_p50_ms": report.ttft_p50_ms,
                         "tpot_p50_ms": report.tpot_p50_ms})
            print(json.dumps(rows[-1]), flush=True)
        if base.on_gpu:
            loaded = LOADED.findall(Path(server["log"]).read_text())
            memory = {"weights_gib": float(loaded[-1])} if loaded else {}
        else:
            memory = {"engine_pss_mib": tree_pss_mib(server["pid"])}
        return [{**r, **memory} for r in rows]


def compare(rows: list[dict], baseline: str) -> list[dict]:
    """Each contender against the baseline at the same concurrency."""
    out = []
    for row in rows:
        if "error" in row:
            continue
        base = next((b for b in rows if b["contender"] == baseline and b["concurrency"] == row["concurrency"]), None)
        if base is None or row["contender"] == baseline:
            continue
        ratio = {"contender": row["contender"], "vs": baseline, "concurrency": row["concurrency"],
                 "output_tok_s_ratio": round(row["output_tok_s"] / base["output_tok_s"], 3),
                 "size_ratio": round(row["size_mib"] / base["size_mib"], 3) if base["size_mib"] else None}
        for key in ("weights_gib", "engine_pss_mib"):
            if key in row and key in base:
                ratio[f"{key}_ratio"] = round(row[key] / base[key], 3)
        if "answer_ppl" in row and "answer_ppl" in base:
            ratio["answer_ppl_change"] = round(row["answer_ppl"] / base["answer_ppl"] - 1, 4)
        out.append(ratio)
    return out


def quantize_benchmark(args: argparse.Namespace) -> None:
    from cluster.model_cache import resolve_model_path
    from cluster.resources import cluster_has_gpus
    from jobs.evaluate.gsm8k import DEFAULT_GSM8K

    contenders = [parse_contender(c) for c in args.contender]
    on_gpu = cluster_has_gpus()
    base = EngineSpec(model_id="bench-model", path="", dtype="", max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, on_gpu=on_gpu,
                      enforce_eager=(not on_gpu) if args.enforce_eager is None else args.enforce_eager,
                      extra=json.loads(args.engine_kwargs) if args.engine_kwargs else None)
    test = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines()
            if line.strip()][:args.answers] if args.answers else []
    answers = [(r["question"], r["answer"]) for r in test]
    rows = []
    for name, path, options in contenders:
        print(f"== {name}: {path} {options or ''}", flush=True)
        rows += measure_contender(name, resolve_model_path(path), options, base,
                                  [int(c) for c in args.concurrency.split(",")], args.requests,
                                  args.max_requests_per_stream, args.prompt_words, args.max_tokens, answers)
    ratio_rows = compare(rows, contenders[0][0])
    columns = ["contender", "dtype", "concurrency", "failed", "size_mib", "weights_gib", "engine_pss_mib",
               "output_tok_s", "ttft_p50_ms", "tpot_p50_ms", "answer_ppl", "error"]
    print("\n" + markdown_table(rows, [c for c in columns if any(c in r for r in rows)]))
    if ratio_rows:
        print("\n" + markdown_table(ratio_rows, list(dict.fromkeys(k for r in ratio_rows for k in r))))
    write_results(args, rows, ratios=ratio_rows, gpu=on_gpu)  # machine, cores and versions come with it


def add_command(sub) -> None:
    """This module's `python -m jobs.bench` command(s)."""
    quant = sub.add_parser("quantize", help="quantized vs full-precision weights: size, engine memory, output "
                                            "tok/s and answer perplexity, each on raw vLLM")
    quant.add_argument("--contender", action="append", required=True, metavar="NAME=PATH[,KEY=VALUE...]",
                       help="a model folder ('default': cached SmolLM2) and its own vLLM engine arguments, "
                            "for example fp8=/models/x,quantization=fp8; the first is the baseline")
    quant.add_argument("--concurrency", default="8", help="comma list of concurrent streams")
    quant.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    quant.add_argument("--max-requests-per-stream", type=int, default=10**6,
                       help="cap requests at this many per stream (keeps the 1-stream level short)")
    quant.add_argument("--prompt-words", type=int, default=200)
    quant.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    quant.add_argument("--answers", type=int, default=20,
                       help="GSM8K test answers for the perplexity (0: none, as for dummy weights)")
    quant.add_argument("--max-model-len", type=int, default=2048)
    quant.add_argument("--max-num-seqs", type=int, default=64)
    quant.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                       help="default: on for CPU engines, off on a GPU")
    quant.add_argument("--engine-kwargs", default=None, help="JSON of extra vLLM engine arguments for every one")
    quant.add_argument("--out", default=None, help="write results as JSON here")
    quant.set_defaults(run=quantize_benchmark)
