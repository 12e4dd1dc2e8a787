"""Did the personal-assistant fine-tune work, and what did it cost? Base and tuned model side by side:

- identity: share of greedy answers to held-out paraphrased identity questions that name the owner;
- general agreement: of 50 held-out general questions, the share answered exactly as the base model
  answers (and with the same first five words), and how many answers name the owner (over-fitting);
- general KL: mean per-token KL(base || tuned) along the base's own answers to the general questions
  (full vocabulary), which a harmless change of wording does not move the way it moves agreement;
- GSM8K perplexity: teacher-forced perplexity of the reference solutions (answer tokens only, given the
  question in the chat template), from `../shared/data/gsm8k/test.jsonl`; the change against the base.

  python -m jobs.evaluate.assistant --base default --tuned runs/finetune/assistant-cpu/merged \\
      --heldout data/assistant.heldout.jsonl

Answers and perplexity run on vLLM (one offline engine per model on the connected Ray; perplexity from
prompt logprobs); the KL on transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

from cluster.storage import locate
from jobs.data.records import DataError, read_text
from jobs.evaluate.gsm8k import DEFAULT_GSM8K
from jobs.evaluate.quality import first_words, normalise

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


def base_figures(base: str, pairs: list[tuple[str, str]], questions: list[str], max_tokens: int):
    """Where the base model's half of an evaluation is kept: the same for every fine-tune of that base,
    so the gate after each fine-tune runs one model, not two. Keyed by the base's files (their sizes and
    times), the questions, the GSM8K answers and the settings; in storage, so any node's driver finds it."""
    import hashlib

    from cluster.model_cache import resolve_model_path
    from cluster.storage import fingerprint, is_uri

    folder = locate(base if is_uri(base) else resolve_model_path(base))
    if not folder.exists():
        return None  # a hub id or a path another node holds: nothing to key it by here
    key = hashlib.sha256(json.dumps([EVALUATION_VERSION, base, fingerprint(folder), pairs, questions,
                                     max_tokens]).encode()).hexdigest()[:20]
    return locate(f"cache/assistant_eval/base-{key}.json")


EVALUATION_VERSION = 2  # bump when what the base's figures are made of changes


def evaluate(base: str, tuned: str, identity_qs: list[str], general_qs: list[str], owner: str,
             ppl_limit: int | None, max_tokens: int) -> tuple[dict, dict[str, list[str]], list[str]]:
    """Base and tuned side by side (needs a connected Ray): the result (rows of figures), every answer per
    model, and the questions in order. Each model gets one vLLM engine for its answers and its GSM8K
    perplexity (prompt logprobs: one prefill per answer), the base only once per base, questions and
    settings (base_figures); then one task measures the token KL of the tuned model from the base on the
    base's general answers."""
    import ray

    from jobs.data.identity import names_owner
    from jobs.evaluate.quality import answer_nll_and_answers, token_kl_task

    records = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines() if line.strip()][:ppl_limit]
    pairs = [(r["question"], r["answer"]) for r in records]
    questions = identity_qs + general_qs
    rows, outputs = {}, {}
    for name, path in {"base": base, "tuned": tuned}.items():  # engines resolve the models on their own nodes
        started = time.perf_counter()
        cached = base_figures(path, pairs, questions, max_tokens) if name == "base" else None
        if cached is not None and cached.is_file():
            nll, tokens, replies = json.loads(cached.read_text())
            log.info("base figures reused from %s", cached.uri)
        else:
            nll, tokens, replies = answer_nll_and_answers(path, pairs, questions, max_tokens)
            if cached is not None:
                cached.write_text(json.dumps([nll, tokens, replies]))
        outputs[name] = replies
        rows[name] = {"model": name, "identity": sum(names_owner(r, owner) for r in replies[:len(identity_qs)])
                      / len(identity_qs), "gsm8k_ppl": round(math.exp(nll / tokens), 4),
                      "wall_s": round(time.perf_counter() - started, 1)}
    general = list(zip(outputs["base"][len(identity_qs):], outputs["tuned"][len(identity_qs):]))
    started = time.perf_counter()
    kl = ray.get(token_kl_task(base, tuned, [(q, a) for q, (a, _) in zip(general_qs, general)]))
    rows["base"].update(general_agreement=1.0, general_same_start=1.0, general_kl=0.0)
    rows["tuned"].update(
        general_agreement=sum(normalise(a) == normalise(b) for a, b in general) / len(general),
        general_same_start=sum(first_words(a) == first_words(b) for a, b in general) / len(general),
        general_kl=round(kl, 5))
    for name, row in rows.items():  # over-fitting shows as the owner's name in answers to unrelated questions
        row["general_names_owner"] = sum(names_owner(r, owner) for r in outputs[name][len(identity_qs):])
    change = rows["tuned"]["gsm8k_ppl"] / rows["base"]["gsm8k_ppl"] - 1
    result = {"owner": owner, "identity_questions": len(identity_qs), "general_questions": len(general_qs),
              "gsm8k_answers": len(pairs), "ppl_change": round(change, 4), "kl_s": round(time.perf_counter() - started, 1),
              "rows": list(rows.values())}
    return result, outputs, questions


def gate(gate, base: str, summary: dict, run) -> tuple[bool, dict, list[str]]:
    """The publish gate's assistant evaluator (jobs/finetune/publish.py): this run's evaluation against the
    recipe's thresholds (`publish.gate`). Returns (passed, figures, the reasons it failed)."""
    figures = gate_evaluation(gate, base, summary, run)
    tuned = next(r for r in figures["rows"] if r["model"] == "tuned")
    checks = [
        (tuned["identity"] >= gate.min_identity, f"identity {tuned['identity']:.1%} < min_identity {gate.min_identity:.1%}"),
        (tuned["general_same_start"] >= gate.min_general_same_start,
         f"general answers starting as the base's {tuned['general_same_start']:.1%} < min_general_same_start "
         f"{gate.min_general_same_start:.1%}"),
        (tuned["general_names_owner"] <= gate.max_general_names_owner,
         f"general answers naming the owner {tuned['general_names_owner']} > max_general_names_owner "
         f"{gate.max_general_names_owner}"),
        (figures["ppl_change"] <= gate.max_ppl_change,
         f"GSM8K perplexity change {figures['ppl_change']:+.2%} > max_ppl_change {gate.max_ppl_change:+.2%}"),
    ]
    reasons = [why for ok, why in checks if not ok]
    return not reasons, figures, reasons


def gate_evaluation(gate, base: str, summary: dict, run) -> dict:
    """The assistant evaluation of this run, reused when it was already made with the same settings (a
    second publish of the same run under other thresholds does not evaluate again)."""
    from jobs.finetune.config import GateError

    if not summary.get("merged"):
        raise GateError("the gate evaluates the merged model: set output.merge: true (the default)")
    settings = {"base": base, "tuned": summary["merged"], "heldout": locate(gate.heldout).uri,
                "ppl_limit": gate.ppl_limit, "max_tokens": gate.max_tokens}
    saved = run.join("assistant_eval", "gate.json")
    if saved.is_file():
        previous = json.loads(saved.read_text())
        if previous.get("settings") == settings:
            log.info("gate: the evaluation of this run with these settings exists (%s); reusing it", saved.uri)
            return previous["result"]
    from cluster.local import connect

    connect(logging_level=logging.WARNING)
    identity, general, owner = read_heldout(gate.heldout)
    log.info("gate: evaluating %s against %s (%d identity and %d general questions, %s GSM8K answers)",
             settings["tuned"], base, len(identity), len(general), gate.ppl_limit or "all")
    result, _, _ = evaluate(base, summary["merged"], identity, general, owner, gate.ppl_limit, gate.max_tokens)
    saved.write_text(json.dumps({"settings": settings, "result": result}, indent=1))
    return result


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
             "token KL from base | names the owner | GSM8K answer ppl |", "|---|---|---|---|---|---|---|"]
    for row in rows.values():
        table.append(f"| {row['model']} | {row['identity']:.1%} | {row['general_agreement']:.0%} | "
                     f"{row['general_same_start']:.0%} | {row['general_kl']:.4f} | "
                     f"{row['general_names_owner']}/{len(general_qs)} | {row['gsm8k_ppl']} |")
    text = "\n".join(table) + f"\n\nperplexity change: {change:+.2%} over {count} GSM8K answers\n"
    out.join("results.md").write_text(text)
    print("\n" + text + f"written to {out.uri}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
