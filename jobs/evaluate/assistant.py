"""Did the personal-assistant fine-tune work, and what did it cost? Base and tuned model side by side:

- identity: share of greedy answers to held-out paraphrased identity questions that name the owner;
- general agreement: of 50 held-out general questions, the share answered exactly as the base model
  answers (and with the same first five words), and how many answers name the owner (over-fitting);
- GSM8K perplexity: teacher-forced perplexity of the reference solutions (answer tokens only, given the
  question in the chat template), from `../shared/data/gsm8k/test.jsonl`; the change against the base.

  python -m jobs.evaluate.assistant --base default --tuned runs/finetune/assistant-cpu/merged \\
      --heldout data/assistant.heldout.jsonl

Generation runs on vLLM (one offline engine per model on the local Ray); perplexity on transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from cluster.storage import locate
from jobs.data.records import DataError, read_text
from jobs.evaluate.gsm8k import DEFAULT_GSM8K

log = logging.getLogger("tuneserve.assistant_eval")


def read_heldout(path: str) -> tuple[list[str], list[str], str]:
    """The held-out file `python -m jobs.data identity` wrote, from storage (relative paths live there)."""
    identity, general, owner = [], [], ""
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        record = json.loads(line)
        if record.get("kind") == "identity":
            identity.append(record["question"])
            owner = record["owner"]
        elif record.get("kind") == "general":
            general.append(record["question"])
        else:
            raise ValueError(f"{path}:{lineno}: kind must be 'identity' or 'general'")
    return identity, general, owner


def answers(model: str, questions: list[str], max_tokens: int) -> list[str]:
    from jobs.evaluate.runners import GenerationSettings, answer_prompts

    return answer_prompts(model, questions, GenerationSettings(max_tokens=max_tokens))


def gsm8k_perplexity(model_path: str, limit: int | None, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) over the reference solutions' tokens, given each question (chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.data.tokenize import IGNORE, collate, encode

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    records = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines() if line.strip()][:limit]
    examples = [encode(tokenizer, [{"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": r["answer"]}], 2048)[0] for r in records]
    examples.sort(key=lambda e: len(e.input_ids))  # similar lengths per batch: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from tqdm import tqdm

    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc=f"perplexity {Path(model_path).name}",
                          unit="batch"):
            batch = collate(examples[start:start + batch_size], pad)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(),
                                                    ignore_index=IGNORE, reduction="sum")
            total_nll += nll.item()
            total_tokens += int((labels != IGNORE).sum())
    return math.exp(total_nll / total_tokens), len(examples)


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def first_words(text: str, count: int = 5) -> str:
    return " ".join(normalise(text).split()[:count])


def evaluate(base: str, tuned: str, identity_qs: list[str], general_qs: list[str], owner: str,
             ppl_limit: int | None, max_tokens: int) -> tuple[dict, dict[str, list[str]], list[str]]:
    """Base and tuned side by side (needs a connected Ray): the result (rows of figures), every answer per
    model, and the questions in order."""
    from cluster.model_cache import resolve_model_path
    from jobs.data.identity import names_owner

    models = {"base": base, "tuned": tuned}  # engines resolve them on their own nodes
    questions = identity_qs + general_qs
    rows, outputs = {}, {}
    count = 0
    for name, path in models.items():
        started = time.perf_counter()
        replies = answers(path, questions, max_tokens)
        ppl, count = gsm8k_perplexity(resolve_model_path(path), ppl_limit)  # here, in the driver
        outputs[name] = replies
        rows[name] = {"model": name, "identity": sum(names_owner(r, owner) for r in replies[:len(identity_qs)])
                      / len(identity_qs), "gsm8k_ppl": round(ppl, 4), "wall_s": round(time.perf_counter() - started, 1)}
    general = list(zip(outputs["base"][len(identity_qs):], outputs["tuned"][len(identity_qs):]))
    rows["base"].update(general_agreement=1.0, general_same_start=1.0)
    rows["tuned"].update(
        general_agreement=sum(normalise(a) == normalise(b) for a, b in general) / len(general),
        general_same_start=sum(first_words(a) == first_words(b) for a, b in general) / len(general))
    for name, row in rows.items():  # over-fitting shows as the owner's name in answers to unrelated questions
        row["general_names_owner"] = sum(names_owner(r, owner) for r in outputs[name][len(identity_qs):])
    change = rows["tuned"]["gsm8k_ppl"] / rows["base"]["gsm8k_ppl"] - 1
    result = {"owner": owner, "identity_questions": len(identity_qs), "general_questions": len(general_qs),
              "gsm8k_answers": count, "ppl_change": round(change, 4), "rows": list(rows.values())}
    return result, outputs, questions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate.assistant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="default", help="base model: HF folder or 'default'")
    parser.add_argument("--tuned", required=True, help="fine-tuned model: merged HF folder")
    parser.add_argument("--heldout", required=True, help="held-out questions from `python -m jobs.data identity`")
    parser.add_argument("--ppl-limit", type=int, default=None, help="first N GSM8K answers (default: all 1,319)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", default=None, help="output folder (default: beside --tuned)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from cluster.local import connect

    try:
        identity_qs, general_qs, owner = read_heldout(args.heldout)
        if not DEFAULT_GSM8K.is_file():
            raise FileNotFoundError(f"{DEFAULT_GSM8K}: GSM8K test set not found (set TUNESERVE_GSM8K)")
        out = locate(args.out) if args.out else locate(args.tuned)
        if not args.out:  # beside the tuned model: <run>/assistant_eval
            out = out.at(out.path.rstrip("/").rsplit("/", 1)[0]).join("assistant_eval")
    except (OSError, ValueError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    connect(logging_level=logging.WARNING)
    result, outputs, questions = evaluate(args.base, args.tuned, identity_qs, general_qs, owner, args.ppl_limit,
                                          args.max_tokens)
    rows, change, count = {r["model"]: r for r in result["rows"]}, result["ppl_change"], result["gsm8k_answers"]
    out.join("results.json").write_text(json.dumps(result, indent=1))
    out.join("answers.jsonl").write_text("".join(
        json.dumps({"question": q, "base": outputs["base"][i], "tuned": outputs["tuned"][i]}) + "\n"
        for i, q in enumerate(questions)))
    table = ["| model | identity (held-out) | general: same answer as base | same first 5 words | "
             "names the owner | GSM8K answer ppl |", "|---|---|---|---|---|---|"]
    for row in rows.values():
        table.append(f"| {row['model']} | {row['identity']:.1%} | {row['general_agreement']:.0%} | "
                     f"{row['general_same_start']:.0%} | {row['general_names_owner']}/{len(general_qs)} | {row['gsm8k_ppl']} |")
    text = "\n".join(table) + f"\n\nperplexity change: {change:+.2%} over {count} GSM8K answers\n"
    out.join("results.md").write_text(text)
    print("\n" + text + f"written to {out.uri}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
