"""Preference pairs made from the base model's own answers, for `objective: dpo`.

`gsm8k-format`: the base answers GSM8K training questions with the evaluate job's prompt, which asks for the
final answer after "####". An answer whose last number the flexible extraction finds becomes a pair:
preferred, the same answer ending in "#### <that number>" (what the strict score reads); non-preferred, the
answer as the base wrote it. The two differ only in the format, so DPO on them teaches the format and leaves
the reasoning and the numbers to the base. An answer that already ends in the format, or has no number,
makes no pair.
"""

from __future__ import annotations

import json
import logging

from jobs.data.records import write_text

TASKS = ("gsm8k-format",)


def with_final_answer(answer: str) -> str | None:
    """The answer ending in '#### N', N its last number; None when it has no number or already has the format."""
    from jobs.evaluate.gsm8k import extract_flexible, extract_strict

    if extract_strict(answer) is not None:
        return None
    number = extract_flexible(answer)
    if number is None:
        return None
    return f"{answer.rstrip()}\n#### {number}"


def format_pairs(prompts: list[list[dict]], answers: list[str]) -> list[dict]:
    """OpenAI preference records: each prompt's answer with the final-answer line preferred to it as written."""
    pairs = []
    for prompt, answer in zip(prompts, answers):
        preferred = with_final_answer(answer)  # None for an empty answer too: it has no number
        if preferred is not None:
            pairs.append({"input": {"messages": prompt},
                          "preferred_output": [{"role": "assistant", "content": preferred}],
                          "non_preferred_output": [{"role": "assistant", "content": answer.strip()}]})
    return pairs


def make(task: str, model: str, out: str, count: int, dataset: str | None, max_tokens: int,
         temperature: float) -> tuple[int, int, str]:
    """Answers `count` training questions with the base and writes the pairs; (answers, pairs, where)."""
    from cluster.local import connect
    from cluster.model_cache import resolve_model_path
    from jobs.evaluate.gsm8k import DEFAULT_GSM8K, load
    from jobs.evaluate.runners import GenerationSettings, answer_prompts

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    examples = load(dataset or str(DEFAULT_GSM8K.parent / "train.jsonl"), limit=count)
    prompts = [example.prompt() for example in examples]
    connect(logging_level=logging.WARNING)
    # Unseeded when sampling: vLLM's CPU backend fails on per-request seeds above temperature 0.
    settings = GenerationSettings(max_tokens=max_tokens, temperature=temperature, seed=None if temperature else 0)
    answers = answer_prompts(resolve_model_path(model), [p[0]["content"] for p in prompts], settings)
    pairs = format_pairs(prompts, answers)
    where = write_text(out, "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs))
    return len(answers), len(pairs), where
