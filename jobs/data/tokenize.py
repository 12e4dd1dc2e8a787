"""Chat-template tokenisation with assistant-only labels, and packing.

Labels: the conversation is rendered once with the model's chat template; each assistant turn's
character span is found by rendering the prefix before it (with the generation prompt) and the
prefix including it. Tokens inside those spans keep their ids as labels, all others get -100, so the
loss covers what the assistant says (and its end-of-turn marker) and nothing the user wrote.

Distillation targets: an example may carry, per token, the teacher's top-k next-token ids and logprobs
(`teacher_ids`, `teacher_logprobs`, aligned with `input_ids` like `labels`; empty where there is none).
Such tokens are trained towards the teacher's distribution instead of their own id (jobs/finetune/losses.py).

Preference pairs (`objective: dpo`): one row holds both conversations of a pair, each with labels on its final
answer only and `pair_side` marking which answer a label belongs to; position ids restart at the second, so
it does not attend to the first. Pairs are not packed with each other.

Packing: whole examples are packed first-fit into rows of `max_length` tokens with `position_ids`
restarting at 0 for each example. Transformers turns restarting position ids into a block-diagonal
causal mask, so packed examples do not attend to each other.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from jobs.data.records import Conversation, DataError, Preference

IGNORE = -100
PREFERRED, NON_PREFERRED = 1, 2  # Example.pair_side marks


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] = field(default_factory=list)
    teacher_ids: list[list[int]] = field(default_factory=list)  # [] or one (possibly empty) list per token
    teacher_logprobs: list[list[float]] = field(default_factory=list)
    # [] or one flag per token: the greedy-margin hinge applies to that token's target (loss.margin_hinge.tokens)
    teacher_margin: list[bool] = field(default_factory=list)
    # Preference pairs: [] or one mark per token, PREFERRED or NON_PREFERRED on each answer token, 0 elsewhere
    pair_side: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.position_ids:
            self.position_ids = list(range(len(self.input_ids)))

    def targets(self) -> tuple[list[list[int]], list[list[float]]]:
        """Per-token teacher targets, empty lists where there are none."""
        if self.teacher_ids:
            return self.teacher_ids, self.teacher_logprobs
        return [[] for _ in self.input_ids], [[] for _ in self.input_ids]

    def margin_flags(self) -> list[bool]:
        return self.teacher_margin or [False] * len(self.input_ids)

    @property
    def distilled(self) -> int:
        return sum(1 for ids in self.teacher_ids if ids)

    @property
    def supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class TokenizedData:
    examples: list[Example]
    dropped: int  # conversations with no supervised token left after truncation
    truncated: int


def _render(tokenizer, messages: Conversation, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1], generation_prompt=False))
        if not text.startswith(_render(tokenizer, messages[: i + 1], generation_prompt=False)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "assistant-only labels need a template that does")
        spans.append((start, end))
    return text, spans


def encode(tokenizer, messages: Conversation, max_length: int, last_turn_only: bool = False) -> tuple[Example, bool]:
    """One conversation → token ids and assistant-only labels (the last assistant turn's only, if asked),
    cut to `max_length`."""
    text, spans = assistant_spans(tokenizer, messages)
    spans = spans[-1:] if last_turn_only else spans
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    labels = []
    for token, (begin, end) in zip(ids, offsets):
        inside = any(begin >= s and end <= e and end > begin for s, e in spans)
        labels.append(token if inside else IGNORE)
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length]), truncated


def tokenize_conversations(tokenizer, conversations: list[Conversation], max_length: int) -> TokenizedData:
    examples, dropped, truncated = [], 0, 0
    for messages in conversations:
        example, was_truncated = encode(tokenizer, messages, max_length)
        truncated += was_truncated
        if example.supervised == 0:
            dropped += 1
            continue
        examples.append(example)
    return TokenizedData(examples, dropped, truncated)


def encode_pair(tokenizer, pair: Preference, max_length: int) -> tuple[Example | None, bool]:
    """A preference pair → one row holding both conversations, each cut to `max_length`, with position ids
    restarting at the second (so that it does not attend to the first), labels on each final answer and
    `pair_side` telling which answer a label belongs to. None when either answer has no token left."""
    sides = []
    truncated = False
    for mark, answer in ((PREFERRED, pair.preferred), (NON_PREFERRED, pair.non_preferred)):
        example, cut = encode(tokenizer, pair.prompt + [{"role": "assistant", "content": answer}], max_length,
                              last_turn_only=True)
        truncated |= cut
        if example.supervised == 0:
            return None, truncated
        sides.append((mark, example))
    row = Example([], [], [])
    for mark, example in sides:
        row.input_ids += example.input_ids
        row.labels += example.labels
        row.position_ids += example.position_ids
        row.pair_side += [mark if label != IGNORE else 0 for label in example.labels]
    return row, truncated


def tokenize_preferences(tokenizer, pairs: list[Preference], max_length: int) -> TokenizedData:
    examples, dropped, truncated = [], 0, 0
    for pair in pairs:
        row, was_truncated = encode_pair(tokenizer, pair, max_length)
        truncated += was_truncated
        if row is None:
            dropped += 1
        else:
            examples.append(row)
    return TokenizedData(examples, dropped, truncated)


def pack(examples: list[Example], max_length: int, seed: int = 0) -> list[Example]:
    """First-fit packing of whole examples into rows of at most `max_length` tokens."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    rows: list[Example] = []
    room: list[int] = []
    distilling = any(example.teacher_ids for example in examples)
    for example in order:
        n = len(example.input_ids)
        for i, free in enumerate(room):
            if n <= free:
                row = rows[i]
                row.input_ids += example.input_ids
                row.labels += example.labels
                row.position_ids += example.position_ids
                if distilling:
                    ids, logprobs = example.targets()
                    row.teacher_ids += ids
                    row.teacher_logprobs += logprobs
                    row.teacher_margin += example.margin_flags()
                room[i] -= n
                break
        else:
            ids, logprobs = example.targets() if distilling else ([], [])
            rows.append(Example(list(example.input_ids), list(example.labels), list(example.position_ids),
                                list(ids), list(logprobs), example.margin_flags() if distilling else []))
            room.append(max_length - n)
    return rows


def padding_id(tokenizer) -> int:
    """The id `collate` pads with: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(rows: list[Example], pad_id: int, width: int | None = None, multiple: int = 1) -> dict:
    """Right-pad a batch to `width` (default: its longest row, rounded up to `multiple`). Padding gets
    label -100 and its own position ids (a separate 'sequence'). Fixed widths keep GPU shapes static:
    a new shape every step makes the CUDA caching allocator and kernel selection start over."""
    import torch

    longest = max(len(row.input_ids) for row in rows)
    width = max(width or 0, -(-longest // multiple) * multiple)
    input_ids, labels, position_ids = [], [], []
    for row in rows:
        pad = width - len(row.input_ids)
        input_ids.append(row.input_ids + [pad_id] * pad)
        labels.append(row.labels + [IGNORE] * pad)
        position_ids.append(row.position_ids + list(range(pad)))
    batch = {
        "input_ids": torch.tensor(input_ids),
        "labels": torch.tensor(labels),
        "position_ids": torch.tensor(position_ids),
    }
    if any(row.pair_side for row in rows):
        batch["pair_side"] = torch.tensor([row.pair_side + [0] * (width - len(row.pair_side)) for row in rows])
    targets = [(b, t, ids, logprobs, margin) for b, row in enumerate(rows) if row.teacher_ids
               for t, (ids, logprobs, margin) in enumerate(zip(row.teacher_ids, row.teacher_logprobs,
                                                               row.margin_flags())) if ids]
    if targets:  # token (row, position) -> the teacher's top-k ids and logprobs for that token
        batch["distill_positions"] = torch.tensor([[b, t] for b, t, *_ in targets])
        batch["distill_ids"] = torch.tensor([target[2] for target in targets])
        batch["distill_logprobs"] = torch.tensor([target[3] for target in targets], dtype=torch.float32)
        batch["distill_margin_mask"] = torch.tensor([target[4] for target in targets])
    return batch
