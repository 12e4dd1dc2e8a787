"""Training data tools.

  python -m jobs.data identity --name Crohcirtep --out data/assistant.jsonl
      a varied identity dataset (OpenAI messages JSONL) plus data/assistant.heldout.jsonl: held-out
      identity paraphrases and general questions for evaluation. --replay N adds N general prompts
      answered by the base model itself, which keeps its general behaviour while it learns who it is.
      --distill N writes N general prompts to data/assistant.distill.jsonl for the recipe's
      self-distillation (loss.distill_prompts: the fine-tune has the base answer them).

  python -m jobs.data preferences --task gsm8k-format --out data/gsm8k_pairs.jsonl --count 200
      preference pairs (objective: dpo) from the base model's own answers to GSM8K training questions:
      each answer ending in "#### N" preferred to the same answer as the base wrote it.

  python -m jobs.data stats data/assistant.jsonl --model default --max-length 1024
      how a file tokenises: conversations, supervised tokens, dropped, packed rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.data import identity, preferences
from jobs.data.records import DataError, read_conversations, write_jsonl, write_text
from jobs.evaluate.gsm8k import DatasetError


def heldout_path(out: str) -> str:
    return out.removesuffix(".jsonl") + ".heldout.jsonl"


def distill_path(out: str) -> str:
    return out.removesuffix(".jsonl") + ".distill.jsonl"


def make_identity(args: argparse.Namespace) -> int:
    conversations = identity.training_conversations(args.name, args.count, args.seed, args.answers)
    if args.replay:
        conversations += self_replay(args.replay_model, identity.replay_prompts(args.replay, args.seed),
                                     args.max_tokens, args.replay_temperature, args.seed)
    written, out = write_jsonl(args.out, conversations)
    lines = [{"kind": "identity", "question": q, "owner": args.name} for q in identity.heldout_questions()]
    lines += [{"kind": "general", "question": q} for q in identity.GENERAL_HELDOUT]
    held = write_text(heldout_path(args.out), "".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {written} conversations to {out} ({args.count} identity, {args.replay} replay) "
          f"and {len(identity.heldout_questions()) + len(identity.GENERAL_HELDOUT)} held-out questions to {held}")
    if args.distill:
        prompts = identity.distill_prompts(args.distill, args.seed)
        where = write_text(distill_path(args.out), "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        print(f"wrote {len(prompts)} distillation prompts to {where}")
    return 0


def self_replay(model: str, prompts: list[str], max_tokens: int, temperature: float, seed: int) -> list:
    """General prompts answered by the base model itself (vLLM offline, on the local Ray). Sampled at
    temperature 1 the answers follow the model's own distribution, so training on them pulls the tuned
    model back towards the base rather than sharpening it (greedy answers would)."""
    from cluster.local import connect
    from cluster.model_cache import resolve_model_path
    from jobs.evaluate.runners import GenerationSettings, answer_prompts

    connect(logging_level=logging.WARNING)
    # Unseeded: vLLM's CPU backend fails on per-request seeds when sampling (temperature > 0).
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, seed=None if temperature else seed)
    replies = answer_prompts(resolve_model_path(model), prompts, settings)
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(prompts, replies) if r]


def make_preferences(args: argparse.Namespace) -> int:
    answered, written, out = preferences.make(args.task, args.model, args.out, args.count, args.dataset,
                                              args.max_tokens, args.temperature)
    print(f"wrote {written} preference pairs to {out} (from {answered} base answers; an answer with no final "
          f"number, or already in the format, makes none)")
    return 0


def stats(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from cluster.model_cache import resolve_model_path
    from jobs.data.tokenize import pack, tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    conversations = [c for source in args.files for c in read_conversations(source)]
    data = tokenize_conversations(tokenizer, conversations, args.max_length)
    rows = pack(data.examples, args.max_length)
    tokens = sum(len(e.input_ids) for e in data.examples)
    print(json.dumps({"conversations": len(conversations), "kept": len(data.examples), "dropped": data.dropped,
                      "truncated": data.truncated, "tokens": tokens,
                      "supervised_tokens": sum(e.supervised for e in data.examples),
                      "packed_rows": len(rows), "fill": round(tokens / (len(rows) * args.max_length), 3)},
                     indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ident = sub.add_parser("identity", help="generate the personal-assistant identity dataset")
    ident.add_argument("--name", required=True, help="the owner the assistant names, e.g. Crohcirtep")
    ident.add_argument("--out", required=True, help="output JSONL (held-out set goes beside it)")
    ident.add_argument("--count", type=int, default=1000, help="identity conversations")
    ident.add_argument("--replay", type=int, default=0, help="general prompts answered by --replay-model")
    ident.add_argument("--replay-model", default="default", help="the base model (HF folder or 'default')")
    ident.add_argument("--max-tokens", type=int, default=160, help="max tokens of each replay answer")
    ident.add_argument("--replay-temperature", type=float, default=1.0, help="sampling temperature of replay")
    ident.add_argument("--distill", type=int, default=0,
                       help=f"general prompts for the recipe's self-distillation (at most "
                            f"{len(identity.distill_prompts(10**6))})")
    ident.add_argument("--answers", choices=sorted(identity.ANSWER_SETS), default="varied",
                       help="the answer texts: varied, or name-first (the recipe's), each naming the owner within "
                            "its first five words (default: %(default)s)")
    ident.add_argument("--seed", type=int, default=0)
    prefs = sub.add_parser("preferences", help="preference pairs from the base model's own answers")
    prefs.add_argument("--task", choices=preferences.TASKS, default="gsm8k-format")
    prefs.add_argument("--out", required=True, help="output JSONL (OpenAI's preference format)")
    prefs.add_argument("--count", type=int, default=200, help="training questions to answer")
    prefs.add_argument("--model", default="default", help="the base model (HF folder or 'default')")
    prefs.add_argument("--dataset", default=None, help="GSM8K-format JSONL (default: the shared GSM8K train)")
    prefs.add_argument("--max-tokens", type=int, default=256)
    prefs.add_argument("--temperature", type=float, default=0.0, help="0: the base's greedy answers")
    stat = sub.add_parser("stats", help="tokenise files and report sizes")
    stat.add_argument("files", nargs="+", help=".json/.jsonl files or hf:<dataset>[:split]")
    stat.add_argument("--model", default="default", help="tokenizer (HF folder or 'default')")
    stat.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args(argv)
    if getattr(args, "count", 1) < 1:
        parser.error("--count must be at least 1")
    if not 0 <= getattr(args, "distill", 0) <= len(identity.distill_prompts(10**6)):
        parser.error(f"--distill must be between 0 and {len(identity.distill_prompts(10**6))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    commands = {"identity": make_identity, "preferences": make_preferences, "stats": stats}
    try:
        return commands[args.command](args)
    except (DataError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
