"""What did quantizing (or any change to the weights) cost? Two models side by side, each on its own vLLM
engine, measured as they are served:

- GSM8K answer perplexity: exp(mean NLL) of the reference solutions' tokens given each question in the chat
  template, from vLLM's prompt logprobs (one prefill per answer, no generation);
- greedy agreement on held-out general prompts: exact, same first five words;
- GSM8K accuracy (greedy, `####` answers), with --accuracy, for models that can do arithmetic.

    python -m jobs.evaluate.quality --base default --candidate runs/quantized/smollm2-w8a8

Prints one JSON line per model and the change; --out writes the whole result (storage paths work).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

log = logging.getLogger("tuneserve.quality")



def normalise(text: str) -> str:
    """Case and whitespace do not count when two answers are compared."""
    return " ".join(text.split()).lower()


def first_words(text: str, count: int = 5) -> str:
    return " ".join(normalise(text).split()[:count])


def answer_spans(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """The chat-rendered (question, answer) token ids and where the answer's tokens start."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return full_ids, start


def served_answer_nll(client, model: str, tokenizer, pairs: list[tuple[str, str]]) -> tuple[float, int]:
    """Summed NLL of the answers' tokens given their questions, and how many, from a served model's prompt
    logprobs (completions with echo): the model as an OpenAI endpoint serves it, not a copy in transformers."""
    total, count = 0.0, 0
    for question, answer in pairs:
        prefix = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        logprobs = client.completions.create(model=model, prompt=full, max_tokens=1, echo=True, logprobs=1,
                                             temperature=0).choices[0].logprobs
        answer_part = [lp for lp, offset in zip(logprobs.token_logprobs, logprobs.text_offset)
                       if offset >= len(prefix) and lp is not None][:-1]  # the last one is the generated token
        total -= sum(answer_part)
        count += len(answer_part)
    return total, count


def answer_kl(tokenizer, base_logits, tuned_logits, pairs: list[tuple[str, str]], device) -> float:
    """Mean per-token KL(base || tuned) of the next-token distributions over each answer's tokens, given its
    prompt (chat template), full vocabulary. `base_logits` / `tuned_logits` map a [1, n] id tensor to its
    [1, n, vocab] logits: two models, or one PEFT model with its adapter off and on."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, answer in pairs:
            ids, start = answer_spans(tokenizer, prompt, answer)
            if start >= len(ids):
                continue
            tensor = torch.tensor([ids], device=device)
            # the distributions that predict the answer's tokens: positions start-1 .. len-2
            base_lp, tuned_lp = (torch.log_softmax(logits(tensor)[0, start - 1:-1].float(), -1)
                                 for logits in (base_logits, tuned_logits))
            total += (base_lp.exp() * (base_lp - tuned_lp)).sum().item()
            count += len(ids) - start
    return total / max(count, 1)


def token_kl(base: str, tuned: str, pairs: list[tuple[str, str]]) -> float:
    """answer_kl between two model folders, in transformers (float32; bf16 on a GPU when there is one). It
    sees a drift that greedy agreement misses, and does not count a harmless change of wording as a
    disagreement. `pairs`: (prompt, answer), typically the base model's own answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.model_cache import resolve_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":  # every core of the node: a Ray task with num_cpus=1 starts with OMP_NUM_THREADS=1
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    paths = [resolve_model_path(base), resolve_model_path(tuned)]
    tokenizer = AutoTokenizer.from_pretrained(paths[0])
    base_model, tuned_model = (AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval()
                               for p in paths)
    return answer_kl(tokenizer, lambda ids: base_model(input_ids=ids).logits,
                     lambda ids: tuned_model(input_ids=ids).logits, pairs, device)


class QualityEngine:
    """One offline vLLM engine (a Ray actor): prompt logprobs and greedy answers for one model."""

    def __init__(self, model: str, dtype: str, on_gpu: bool, max_model_len: int):
        from jobs.evaluate.runners import EngineReplica

        self.engine = EngineReplica(model, dtype, max_model_len, 1, {"enforce_eager": not on_gpu}, None)

    def answer_nll(self, pairs: list[tuple[str, str]]) -> tuple[float, int]:
        """Summed negative log-likelihood of each answer's tokens, and how many tokens."""
        from vllm import SamplingParams

        tokenizer = self.engine.tokenizer
        spans = [answer_spans(tokenizer, q, a) for q, a in pairs]
        outputs = self.engine.llm.generate([{"prompt_token_ids": ids} for ids, _ in spans],
                                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=True)
        total, count = 0.0, 0
        for (ids, start), out in zip(spans, outputs):
            for position in range(max(start, 1), len(ids)):
                total -= out.prompt_logprobs[position][ids[position]].logprob
                count += 1
        return total, count

    def answers(self, prompts: list[str], max_tokens: int) -> list[str]:
        settings = {"temperature": 0.0, "max_tokens": max_tokens, "seed": None}
        return [text.strip() for text, _ in self.engine.generate([[{"role": "user", "content": p}]
                                                                  for p in prompts], settings)]


def _resources(on_gpu: bool) -> dict:
    from cluster.engine_defaults import CPU_ENGINE_ENV

    return {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1,
                                                          "runtime_env": {"env_vars": dict(CPU_ENGINE_ENV)}}


def start_engine(model: str):
    """A QualityEngine actor for `model` in the dtype the app would serve it in (quantized weights run bf16
    on CPU; the folder's config.json is read where it is, a storage URI too, without fetching weights)."""
    import ray

    from cluster.resources import cluster_has_gpus
    from cluster.engine_defaults import resolve_dtype
    from serve_app.quantization import folder_method, read_folder_config

    on_gpu = cluster_has_gpus()
    quantized = bool(folder_method(read_folder_config(model) or {}))
    dtype = resolve_dtype("auto", on_gpu, quantized)
    return ray.remote(QualityEngine).options(**_resources(on_gpu)).remote(model, dtype, on_gpu, 2048), dtype


def answer_nll_and_answers(model: str, pairs: list[tuple[str, str]], prompts: list[str], max_tokens: int
                           ) -> tuple[float, int, list[str]]:
    """On one engine: the summed NLL of the answers given their questions (and how many tokens), and
    greedy answers to `prompts`."""
    import ray

    engine, _ = start_engine(model)
    try:
        nll, tokens = ray.get(engine.answer_nll.remote(pairs))
        return nll, tokens, ray.get(engine.answers.remote(prompts, max_tokens))
    finally:
        ray.kill(engine)


def token_kl_task(base: str, tuned: str, pairs: list[tuple[str, str]]):
    """token_kl as a Ray task (on a GPU when the cluster has one): an ObjectRef of the float."""
    import ray

    from cluster.resources import cluster_has_gpus

    options = {"num_gpus": 1, "num_cpus": 1} if cluster_has_gpus() else {"num_cpus": 1}
    return ray.remote(token_kl).options(**options).remote(base, tuned, pairs)


def measure(model: str, gsm8k: list[dict], general: list[str], accuracy: bool, max_tokens: int) -> dict:
    import ray

    from jobs.evaluate.gsm8k import INSTRUCTION, Example, reference_answer, score

    started = time.perf_counter()
    engine, dtype = start_engine(model)
    try:
        nll, tokens = ray.get(engine.answer_nll.remote([(r["question"], r["answer"]) for r in gsm8k]))
        replies = ray.get(engine.answers.remote(general, max_tokens))
        row = {"model": model, "dtype": dtype, "gsm8k_answer_ppl": round(math.exp(nll / tokens), 4),
               "answer_tokens": tokens, "general_answers": replies}
        if accuracy:
            prompts = [f"{r['question']}\n{INSTRUCTION}" for r in gsm8k]
            solved = ray.get(engine.answers.remote(prompts, 512))
            scores = [score(Example(i, r["question"], reference_answer(r["answer"])), s)
                      for i, (r, s) in enumerate(zip(gsm8k, solved))]
            row["gsm8k_accuracy"] = round(sum(s["flexible_correct"] for s in scores) / len(scores), 4)
            # the strict score reads only a number after "####": how often the answer is in that format at all
            row["gsm8k_strict_accuracy"] = round(sum(s["strict_correct"] for s in scores) / len(scores), 4)
            row["gsm8k_format_rate"] = round(sum(s["strict_answer"] is not None for s in scores) / len(scores), 4)
    finally:
        ray.kill(engine)
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


def compare(base: dict, candidate: dict) -> dict:

    pairs = list(zip(base["general_answers"], candidate["general_answers"]))
    change = {"ppl_change": round(candidate["gsm8k_answer_ppl"] / base["gsm8k_answer_ppl"] - 1, 4),
              "general_exact": round(sum(normalise(a) == normalise(b) for a, b in pairs) / len(pairs), 4),
              "general_same_start": round(sum(first_words(a) == first_words(b) for a, b in pairs) / len(pairs), 4)}
    if "gsm8k_accuracy" in base:
        change["accuracy_change"] = round(candidate["gsm8k_accuracy"] - base["gsm8k_accuracy"], 4)
    return change


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate.quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="reference model: HF folder, storage URI or 'default'")
    parser.add_argument("--candidate", required=True, help="the model to judge against it")
    parser.add_argument("--limit", type=int, default=200, help="GSM8K test answers for perplexity/accuracy")
    parser.add_argument("--accuracy", action="store_true", help="also solve the GSM8K questions (slow on CPU)")
    parser.add_argument("--max-tokens", type=int, default=64, help="per answer to a general prompt")
    parser.add_argument("--out", default=None, help="write the result as JSON here (storage paths work)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from cluster.local import connect
    from cluster.storage import locate
    from jobs.data.identity import GENERAL_HELDOUT
    from jobs.evaluate.gsm8k import DEFAULT_GSM8K

    if args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    gsm8k = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines() if line.strip()][:args.limit]
    connect(logging_level=logging.WARNING)
    rows = {name: measure(path, gsm8k, GENERAL_HELDOUT, args.accuracy, args.max_tokens)
            for name, path in (("base", args.base), ("candidate", args.candidate))}
    result = {"gsm8k_answers": len(gsm8k), "general_prompts": len(GENERAL_HELDOUT), **compare(rows["base"],
              rows["candidate"]), "rows": rows}
    for name, row in rows.items():
        print(json.dumps({"role": name, **{k: v for k, v in row.items() if k != "general_answers"}}))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        locate(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
