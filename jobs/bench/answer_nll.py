"""GSM8K answer NLL, the assistant evaluation's largest part (jobs.evaluate.assistant), two ways side by side
in one process, on this machine's CPU (float32; the evaluation's CPU engine settings):

- vllm: what the evaluation runs, one offline vLLM engine with prompt logprobs
  (`jobs.evaluate.quality.QualityEngine.answer_nll`), which projects every prompt position onto the vocabulary;
- transformers: the candidate, pairs packed into rows of 1,024 tokens (position ids restart per pair,
  attention `packed_sdpa`) with logits only where an answer token is predicted (`logits_to_keep`): the
  questions' 42% of GSM8K's tokens skip the vocabulary projection.

Rounds alternate the two, so a change in the machine's speed falls on both. Prints prompt tokens/s per round,
the speed ratio, and both NLLs (they should agree to float32 rounding).

    python -m jobs.bench.answer_nll --limit 400 --rounds 2 --out docs/results/bench-answer-nll-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def packed_answer_nll(model, tokenizer, pairs: list[tuple[str, str]], row_tokens: int = 1024) -> tuple[float, int]:
    """Summed NLL of each answer's tokens given its question (chat template), and how many, in transformers:
    the answers become training examples labelled from the answer on, packed and read as the fine-tune's
    loss reads them (`pack`, `collate`, `loss_positions`)."""
    import torch

    from jobs.data.tokenize import IGNORE, Example, collate, pack, padding_id
    from jobs.evaluate.quality import answer_spans
    from jobs.finetune.losses import loss_positions

    examples = [Example(ids, [IGNORE] * start + ids[start:])
                for ids, start in (answer_spans(tokenizer, q, a) for q, a in pairs)]
    total, count = 0.0, 0
    with torch.inference_mode():
        for row in pack(examples, row_tokens):
            batch = collate([row], padding_id(tokenizer))
            keep = loss_positions(batch["labels"], None)  # position p predicts token p + 1
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           logits_to_keep=keep).logits[0]
            targets = batch["labels"][0, keep + 1]
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    return total, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench.answer_nll", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="HF folder or 'default' (float32)")
    parser.add_argument("--limit", type=int, default=400, help="first N GSM8K test answers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the rows and the summary here (JSON)")
    args = parser.parse_args(argv)

    from cluster.engine_defaults import CPU_ENGINE_ENV

    for key, value in CPU_ENGINE_ENV.items():  # as the evaluation's engine actor gets them
        os.environ.setdefault(key, value)
    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.model_cache import resolve_model_path
    from jobs.evaluate.gsm8k import DEFAULT_GSM8K
    from jobs.evaluate.quality import QualityEngine, answer_spans
    from jobs.finetune import attention

    records = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines() if line.strip()][:args.limit]
    pairs = [(r["question"], r["answer"]) for r in records]
    folder = resolve_model_path(args.model)
    attention.register()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention.NAME).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = QualityEngine(args.model, "float32", False, 2048)
    prompt_tokens = sum(len(answer_spans(tokenizer, q, a)[0]) for q, a in pairs)
    contenders = {"vllm": lambda: engine.answer_nll(pairs),
                  "transformers": lambda: packed_answer_nll(model, tokenizer, pairs)}
    rows = []
    for round_ in range(args.rounds):
        for name, run in contenders.items():
            started = time.perf_counter()
            nll, tokens = run()
            seconds = time.perf_counter() - started
            rows.append({"round": round_, "contender": name, "s": round(seconds, 1), "nll": nll, "answer_tokens": tokens,
                         "prompt_tokens_per_s": round(prompt_tokens / seconds)})
            print(json.dumps(rows[-1]), flush=True)
    seconds = {name: [r["s"] for r in rows if r["contender"] == name] for name in contenders}
    nll = {name: rows[[r["contender"] for r in rows].index(name)]["nll"] for name in contenders}
    summary = {"pairs": len(pairs), "prompt_tokens": prompt_tokens, "rounds": args.rounds,
               "median_s": {name: statistics.median(s) for name, s in seconds.items()},
               "speedup": round(statistics.median(seconds["vllm"]) / statistics.median(seconds["transformers"]), 3),
               "per_round_speedup": [round(v / t, 3) for v, t in zip(seconds["vllm"], seconds["transformers"])],
               "nll_relative_difference": abs(nll["vllm"] - nll["transformers"]) / nll["vllm"],
               "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(summary))
    print(f"\ntransformers packed / vLLM prompt logprobs: {summary['speedup']}x "
          f"(rounds {summary['per_round_speedup']}), NLLs differ by {summary['nll_relative_difference']:.1e}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
