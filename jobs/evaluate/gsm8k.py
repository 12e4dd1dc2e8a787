"""GSM8K: loading, prompting and scoring, as the seed (and lm-evaluation-harness) define them.

- strict: the number after "#### " (the format the prompt asks for);
- flexible: the last number anywhere in the response.
Both sides are normalised (commas, "$" and a trailing "." removed) and must then match exactly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cluster.storage import StorageError, locate, project_root

INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
# The shared copy beside the repository (override with TUNESERVE_GSM8K).
# project_root(), not this file: under `ray job submit` the code runs from a copy in a temp dir.
DEFAULT_GSM8K = Path(os.environ.get(
    "TUNESERVE_GSM8K", project_root().parent / "shared" / "data" / "gsm8k" / "test.jsonl"))

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


class DatasetError(ValueError):
    """A dataset that cannot be read: says which file and line, and what is wrong."""


@dataclass(frozen=True)
class Example:
    index: int
    question: str
    answer: str  # the normalised final answer

    def prompt(self, instruction: str = INSTRUCTION) -> list[dict]:
        return [{"role": "user", "content": f"{self.question}\n{instruction}"}]


def normalize(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip()
    return text.removesuffix(".")


def reference_answer(solution: str) -> str:
    """GSM8K solutions end with '#### <number>'."""
    return normalize(solution.split("####")[-1])


def extract_strict(response: str) -> str | None:
    match = _STRICT.search(response)
    return normalize(match.group(1)) if match else None


def extract_flexible(response: str) -> str | None:
    matches = _FLEXIBLE.findall(response)
    if not matches:
        return None
    last = matches[-1]
    return normalize(last[0] or last[1])


def load_jsonl(path: str | Path, limit: int | None = None) -> list[Example]:
    """Any JSONL whose lines hold `question` and `answer` (GSM8K's own format)."""
    try:
        location = locate(str(path))
        if not location.is_file():
            raise DatasetError(f"dataset file not found: {path} ({location.uri})")
        text = location.read_text()
    except StorageError as exc:
        raise DatasetError(f"dataset {path}: {exc}") from exc
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("question"), str) \
                or not isinstance(record.get("answer"), str):
            raise DatasetError(f"{path}:{number}: each line needs string fields 'question' and 'answer'")
        examples.append(Example(len(examples), record["question"], reference_answer(record["answer"])))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DatasetError(f"{path}: no examples")
    return examples


def load_hf(name: str, split: str = "test", limit: int | None = None) -> list[Example]:
    """The Hugging Face `datasets` copy (e.g. openai/gsm8k), where a hub is reachable."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DatasetError("the 'datasets' package is needed for hf: datasets (pip install datasets)") from None
    try:
        rows = load_dataset(name, "main", split=split)
    except Exception as exc:
        raise DatasetError(f"cannot load {name} from the Hugging Face hub: {exc}") from None
    examples = [Example(i, row["question"], reference_answer(row["answer"])) for i, row in enumerate(rows)]
    return examples[:limit] if limit is not None else examples


def load(dataset: str, limit: int | None = None) -> list[Example]:
    """`gsm8k` (the shared test set), `hf:<name>` or a path to a JSONL file."""
    if dataset == "gsm8k":
        return load_jsonl(DEFAULT_GSM8K, limit)
    if dataset.startswith("hf:"):
        return load_hf(dataset[3:], limit=limit)
    return load_jsonl(dataset, limit)


def score(example: Example, response: str) -> dict:
    strict, flexible = extract_strict(response), extract_flexible(response)
    return {"index": example.index, "question": example.question, "reference": example.answer,
            "response": response, "strict_answer": strict, "flexible_answer": flexible,
            "strict_correct": strict == example.answer, "flexible_correct": flexible == example.answer}
