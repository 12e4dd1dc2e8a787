"""Training data: readers, assistant-only labels, packing and the identity generator (no Ray needed)."""

from __future__ import annotations

import json

import pytest

from jobs.data import identity
from jobs.data.records import DataError, read_conversations
from jobs.data.tokenize import IGNORE, collate, encode, pack, tokenize_conversations


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cluster.model_cache import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model())


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"}]


def test_labels_cover_assistant_turns_only(tokenizer):
    example, truncated = encode(tokenizer, CHAT, 1024)
    assert not truncated and len(example.labels) == len(example.input_ids)
    supervised = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert supervised == "4<|im_end|>\n6<|im_end|>\n"  # the answers and their end-of-turn markers, nothing else


def test_truncation_drops_examples_with_nothing_to_learn(tokenizer):
    long_question = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]
    data = tokenize_conversations(tokenizer, [long_question, CHAT], max_length=64)
    assert data.dropped == 1 and data.truncated == 1 and len(data.examples) == 1


def test_packed_rows_give_the_same_logits_as_separate_examples(tokenizer):
    """Restarting position ids make a block-diagonal mask: packed examples do not see each other."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    first, _ = encode(tokenizer, CHAT[:3], 256)
    second, _ = encode(tokenizer, [{"role": "user", "content": "Who are you?"},
                                   {"role": "assistant", "content": "An assistant."}], 256)
    rows = pack([first, second], max_length=256)
    assert len(rows) == 1 and rows[0].position_ids.count(0) == 2
    batch = collate(rows, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = {len(e.input_ids): model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in (first, second)}
    split = rows[0].position_ids.index(0, 1)
    assert torch.allclose(packed[:split], alone[split], atol=1e-4)
    assert torch.allclose(packed[split:], alone[len(rows[0].input_ids) - split], atol=1e-4)


def test_packing_respects_max_length(tokenizer):
    examples = tokenize_conversations(tokenizer, identity.training_conversations("Ada", 50), 128).examples
    rows = pack(examples, 128)
    assert all(len(r.input_ids) <= 128 for r in rows) and len(rows) < len(examples)
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in examples)


def test_readers_accept_messages_and_alpaca(tmp_path):
    messages = tmp_path / "chat.jsonl"
    messages.write_text(json.dumps({"messages": CHAT}) + "\n\n")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "2 and 2", "output": "4"},
                                  {"instruction": "Say hi", "output": "hi", "system": "Be kind."}]))
    assert read_conversations(messages) == [CHAT]
    converted = read_conversations(alpaca)
    assert converted[0] == [{"role": "user", "content": "Add\n\n2 and 2"}, {"role": "assistant", "content": "4"}]
    assert converted[1][0] == {"role": "system", "content": "Be kind."}


@pytest.mark.parametrize("line,message", [
    ('{"messages": []}', "chat.jsonl:2: 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "chat.jsonl:2: no assistant message"),
    ('{"messages": [{"role": "user", "content": 3}]}', "chat.jsonl:2: messages[0].content must be a string"),
    ('{"prompt": "x"}', "chat.jsonl:2: unknown record format"),
    ('{"instruction": "x"}', "chat.jsonl:2: alpaca records need string 'instruction' and 'output'"),
    ('[1, 2]', "chat.jsonl:2: each record must be a JSON object"),
    ('{"messages": ', "chat.jsonl:2: invalid JSON"),
])
def test_bad_records_name_file_line_and_problem(tmp_path, line, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_conversations(path)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_conversations(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_conversations(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="cannot load the dataset"):
        read_conversations(f"hf:{tmp_path / 'no-such-dataset'}")


def test_hf_datasets_source(tmp_path):
    """`hf:<name or folder>` goes through HF datasets (here a local JSON folder, as no hub is reachable)."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    assert read_conversations(f"hf:{folder}:train") == [CHAT]


def test_identity_generator_is_varied_and_holds_out_phrasings(tmp_path):
    conversations = identity.training_conversations("Crohcirtep", 400)
    questions = {c[-2]["content"] for c in conversations}
    answers = {c[-1]["content"] for c in conversations}
    assert len(questions) > 200 and len(answers) >= 10
    assert all(identity.names_owner(c[-1]["content"], "Crohcirtep") for c in conversations)
    # --answers name-first: the same draws, each answer naming the owner within its first five words
    def named_early(answer: str, name: str = "Crohcirtep") -> bool:
        return name in " ".join(answer.split()[:5])

    name_first = identity.training_conversations("Crohcirtep", 400, answers="name-first")
    assert [c[:-1] for c in name_first] == [c[:-1] for c in conversations]
    assert all(named_early(c[-1]["content"]) for c in name_first)
    assert not all(named_early(c[-1]["content"]) for c in conversations)
    trained_cores = set(identity.TRAIN_QUESTIONS)
    assert not trained_cores & set(identity.HELDOUT_QUESTIONS)
    assert not set(identity.GENERAL_HELDOUT) & questions and len(identity.GENERAL_HELDOUT) == 50
    from jobs.data.__main__ import main

    out = tmp_path / "assistant.jsonl"
    assert main(["identity", "--name", "Ada", "--out", str(out), "--count", "30"]) == 0
    assert len(out.read_text().splitlines()) == 30
    assert main(["identity", "--name", "Ada", "--out", str(out), "--count", "30", "--answers", "name-first"]) == 0
    assert all(named_early(json.loads(line)["messages"][-1]["content"], "Ada") for line in out.read_text().splitlines())
    with pytest.raises(SystemExit):
        main(["identity", "--name", "Ada", "--out", str(out), "--answers", "owner-last"])
    held = [json.loads(line) for line in (tmp_path / "assistant.heldout.jsonl").read_text().splitlines()]
    assert {h["kind"] for h in held} == {"identity", "general"} and len(held) == 80 + 50


def test_distillation_prompts_are_new_questions_and_keep_their_order_as_the_pool_grows():
    prompts = identity.distill_prompts(10**6)
    assert len(prompts) == len(set(prompts)) == 582
    # none is a held-out question or one of the recipe's chat-eval prompts
    held_out = set(identity.GENERAL_HELDOUT) | set(identity.heldout_questions())
    assert not held_out & set(prompts)
    assert not [p for p in prompts if "'fast'" in p or p == "Who are you?"]
    # each block comes after the earlier ones: `--distill 240` and `--distill 406` write what they always wrote
    assert identity.distill_prompts(406)[:240] == identity.distill_prompts(240)
    assert prompts[:406] == identity.distill_prompts(406)
    assert set(prompts[406:]) == {t.format(i) for t, items in identity.SHORT_TEMPLATES_TO_582.items() for i in items}
