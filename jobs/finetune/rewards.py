"""Rewards for reinforcement fine-tuning (`objective: grpo`).

A reward is a function `(prompt, completion, example) -> float`: the prompt's messages, the completion's
text, and the training example's own fields (a GSM8K row's `answer`, a JSON task's `schema`, ...). A
recipe names each by import path (`module:function`), or a shipped one by its short name, with a weight:

    grpo:
      rewards:
        - {function: gsm8k_flexible, weight: 1.0}
        - {function: answer_format, weight: 0.2}
        - {function: my_project.rewards:politeness, weight: 0.5}

The GSM8K rewards read answers with the evaluate job's own extraction, so a trained model's reward and its
GSM8K score agree on what an answer is.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Callable

from jobs.evaluate.gsm8k import extract_flexible, extract_strict, reference_answer

Reward = Callable[[list, str, dict], float]


def _reference(example: dict) -> str:
    answer = example.get("answer")
    if not isinstance(answer, str):
        raise ValueError("this reward needs the example's 'answer' (a GSM8K solution or its final number)")
    return reference_answer(answer)  # the number after '####', or the whole answer when it has none


def gsm8k_strict(prompt: list, completion: str, example: dict) -> float:
    """1 when the number after '####' is the reference answer (the evaluate job's strict score)."""
    return float(extract_strict(completion) == _reference(example))


def gsm8k_flexible(prompt: list, completion: str, example: dict) -> float:
    """1 when the last number in the completion is the reference answer (the flexible score)."""
    return float(extract_flexible(completion) == _reference(example))


def answer_format(prompt: list, completion: str, example: dict) -> float:
    """1 when the completion ends its reasoning with '#### <number>', the format the strict score reads."""
    return float(extract_strict(completion) is not None)


def json_valid(prompt: list, completion: str, example: dict) -> float:
    """1 when the completion is one JSON value (a fenced ```json block counts) that fits the example's
    `schema`, if it has one; 0.5 for valid JSON that does not fit it; else 0."""
    text = completion.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(text)
    except ValueError:
        return 0.0
    schema = example.get("schema")
    if schema is None:
        return 1.0
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return 0.5
    return 1.0


def length(prompt: list, completion: str, example: dict) -> float:
    """How close the completion's length in characters is to the example's `target_chars` (default 400):
    1 at the target, falling linearly to 0 at twice it or at nothing."""
    target = example.get("target_chars", 400)
    return max(0.0, 1.0 - abs(len(completion) - target) / target)


SHIPPED: dict[str, Reward] = {f.__name__: f for f in (gsm8k_strict, gsm8k_flexible, answer_format, json_valid,
                                                        length)}


def load_reward(name: str) -> Reward:
    """A shipped reward by its short name, or any function by `module:function`; ValueError saying why not."""
    if name in SHIPPED:
        return SHIPPED[name]
    module, _, function = name.partition(":")
    if not module or not function:
        raise ValueError(f"reward {name!r}: not a shipped reward ({', '.join(SHIPPED)}) nor 'module:function'")
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {name!r}: {exc}") from None
    if not callable(found):
        raise ValueError(f"reward {name!r}: not a function")
    return found


def score(rewards: list[tuple[Reward, float]], prompt: list, completion: str,
          example: dict) -> tuple[float, list[float], list[str]]:
    """The weighted sum of the rewards, each reward's own value, and what went wrong. A reward that raises
    or returns something that is not a finite number scores 0 for this answer, and the error comes back to
    be logged and counted: one odd completion must not end a run."""
    parts, errors = [], []
    for function, _ in rewards:
        name = f"{function.__module__}:{function.__name__}"
        try:
            value = float(function(prompt, completion, example))
        except Exception as exc:
            value, problem = 0.0, f"{name} raised {type(exc).__name__}: {exc}"
        else:
            problem = None if math.isfinite(value) else f"{name} returned {value}"
        if problem:
            value = 0.0
            errors.append(problem)
        parts.append(value)
    return sum(w * v for (_, w), v in zip(rewards, parts)), parts, errors
