"""Read conversations from OpenAI `messages` JSON/JSONL, alpaca JSON/JSONL or a HF dataset.

Every reader yields the same shape: a list of `{"role", "content"}` dicts. Errors name the file,
the line (for JSONL) and what is wrong, so a bad file fails before any worker starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROLES = {"system", "user", "assistant"}
HF_PREFIX = "hf:"


class DataError(ValueError):
    """A data source is missing or malformed."""


Conversation = list[dict[str, str]]


def _check_messages(messages: object, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out: Conversation = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return out


def _from_alpaca(record: dict, where: str) -> Conversation:
    instruction, output = record.get("instruction"), record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise DataError(f"{where}: alpaca records need string 'instruction' and 'output'")
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise DataError(f"{where}: alpaca 'input' must be a string")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages: Conversation = []
    if isinstance(record.get("system"), str) and record["system"]:
        messages.append({"role": "system", "content": record["system"]})
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def to_conversation(record: object, where: str) -> Conversation:
    """One record in either supported format → a conversation."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: each record must be a JSON object")
    if "messages" in record:
        return _check_messages(record["messages"], where)
    if "instruction" in record:
        return _from_alpaca(record, where)
    raise DataError(f"{where}: unknown record format; expected 'messages' (OpenAI) or "
                    f"'instruction'/'output' (alpaca), got keys {sorted(record)[:6]}")


def _json_records(text: str, path: str) -> Iterable[tuple[object, str]]:
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from exc
        for i, record in enumerate(records):
            yield record, f"{path}[{i}]"
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{path}:{lineno}"
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc


def _hf_records(spec: str) -> Iterable[tuple[object, str]]:
    """`hf:<name or local folder>[:split]`, read through HF `datasets`."""
    import datasets

    name, _, split = spec[len(HF_PREFIX):].partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types; all mean "cannot read this"
        raise DataError(f"{spec}: cannot load the dataset ({exc})") from exc
    for i, record in enumerate(dataset):
        yield record, f"{spec}[{i}]"


def read_records(source: str | Path, parse) -> list:
    """Every record of one source (a .json/.jsonl file or `hf:<dataset>[:split]`), each through
    `parse(record, where)`; none is an error."""
    source = str(source)
    records = _hf_records(source) if source.startswith(HF_PREFIX) else _json_records(read_text(source), source)
    parsed = [parse(record, where) for record, where in records]
    if not parsed:
        raise DataError(f"{source}: no records")
    return parsed


def read_conversations(source: str | Path) -> list[Conversation]:
    """All conversations of one source: a .json/.jsonl file or `hf:<dataset>[:split]`."""
    return read_records(source, to_conversation)


def to_prompt(record: object, where: str) -> Conversation:
    """A prompt record: {"prompt": "..."} or {"messages": [...]} up to its last user turn (an assistant
    answer after it is dropped: the model being distilled writes its own)."""
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError(f"{where}: a prompt record needs 'prompt' (a non-empty string) or 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    last_user = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                    default=None)
    if last_user is None:
        raise DataError(f"{where}: no user message to answer")
    checked = _check_messages(messages[:last_user + 1] + [{"role": "assistant", "content": ""}], where)
    return checked[:-1]


def read_prompts(source: str | Path) -> list[Conversation]:
    """All prompts of one source (.json/.jsonl or `hf:<dataset>[:split]`), each a conversation ending in a
    user turn."""
    return read_records(source, to_prompt)


@dataclass
class Preference:
    """One preference pair: the conversation so far, and the answer preferred to the other."""

    prompt: Conversation
    preferred: str
    non_preferred: str


def _single_answer(value: object, where: str, key: str) -> str:
    if (not isinstance(value, list) or len(value) != 1 or not isinstance(value[0], dict)
            or value[0].get("role") != "assistant" or not isinstance(value[0].get("content"), str)):
        raise DataError(f"{where}: '{key}' must be a list of one assistant message with string content")
    return value[0]["content"]


def to_preference(record: object, where: str) -> Preference:
    """OpenAI's preference format: {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
    ...}], "non_preferred_output": [...]}; the input ends with a user turn."""
    if not isinstance(record, dict) or not isinstance(record.get("input"), dict):
        raise DataError(f"{where}: a preference record needs 'input' (an object with 'messages'), "
                        f"'preferred_output' and 'non_preferred_output'")
    messages = record["input"].get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'input.messages' must be a non-empty list")
    checked = _check_messages(messages + [{"role": "assistant", "content": ""}], where)[:-1]
    if checked[-1]["role"] != "user":
        raise DataError(f"{where}: 'input.messages' must end with a user message (the turn both answers answer)")
    preferred = _single_answer(record.get("preferred_output"), where, "preferred_output")
    non_preferred = _single_answer(record.get("non_preferred_output"), where, "non_preferred_output")
    if preferred == non_preferred:
        raise DataError(f"{where}: the preferred and non-preferred answers are the same")
    return Preference(checked, preferred, non_preferred)


def read_preferences(source: str | Path) -> list[Preference]:
    """All preference pairs of one source (.json/.jsonl or `hf:<dataset>[:split]`)."""
    return read_records(source, to_preference)


def read_text(source: str) -> str:
    """A data file from storage: a URI, an absolute local path, or a path relative to the storage root
    (see cluster/storage.py), so that a job reads the same bytes on whichever node its driver runs."""
    from cluster.storage import StorageError, locate, storage_root

    try:
        location = locate(source)
        if not location.is_file():
            hint = ""
            if Path(source).is_file() and not location.is_local:
                hint = (f"; it exists on this machine only: upload it with "
                        f"`python -m cluster.storage put {source} {source}`")
            raise DataError(f"{source}: data file not found (looked for {location.uri}, storage root "
                            f"{storage_root()}){hint}")
        return location.read_text()
    except StorageError as exc:
        raise DataError(f"{source}: {exc}") from exc


def write_text(path: str, text: str) -> str:
    """Write a file to storage (same path forms as read_text); returns where it went."""
    from cluster.storage import StorageError, locate

    try:
        location = locate(path)
        location.write_text(text)
    except StorageError as exc:
        raise DataError(f"{path}: {exc}") from exc
    return location.uri


def write_jsonl(path: str | Path, conversations: Iterable[Conversation]) -> tuple[int, str]:
    """OpenAI-messages JSONL to storage; returns (count, where)."""
    lines = [json.dumps({"messages": messages}, ensure_ascii=False) for messages in conversations]
    return len(lines), write_text(str(path), "".join(line + "\n" for line in lines))
