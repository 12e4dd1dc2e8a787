"""`python -m jobs.export quantize`: every bad input is refused, by name, before any quantization starts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jobs.export.quantize import QuantizeError, check_inputs
from tests.conftest import REPO_ROOT


def _model_folder(tmp_path, quantized: str | None = None, name: str = "model"):
    folder = tmp_path / name
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"]}
    if quantized:
        config["quantization_config"] = {"quant_method": quantized}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _chat_file(tmp_path, lines: list[str]):
    path = tmp_path / "calibration.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})


def test_good_inputs_pass_and_samples_are_capped(tmp_path):
    conversations = check_inputs(_model_folder(tmp_path), "w4a16-gptq", _chat_file(tmp_path, [GOOD] * 5), 3,
                                 str(tmp_path / "out"), "cpu", 0)
    assert len(conversations) == 3 and conversations[0][1] == {"role": "assistant", "content": "Hello!"}
    # AWQ's quantizer runs on a GPU: with one in the cluster it is asked for, and then accepted
    with pytest.raises(QuantizeError, match="add --device cuda"):
        check_inputs(_model_folder(tmp_path, name="c"), "w4a16-awq", _chat_file(tmp_path, [GOOD]), 1,
                     str(tmp_path / "out3"), "cpu", 1)
    assert len(check_inputs(_model_folder(tmp_path, name="d"), "w4a16-awq", _chat_file(tmp_path, [GOOD]), 1,
                            str(tmp_path / "out4"), "cuda", 1)) == 1
    # fp8 takes no calibration data
    assert check_inputs(_model_folder(tmp_path, name="b"), "fp8", None, 1, str(tmp_path / "out2"), "cpu", 0) == []
    assert not (tmp_path / "out" / ".tuneserve-write-probe").exists()  # the write probe cleans up


@pytest.mark.parametrize("case, needle", [
    ("not_a_model", "--model .*: not a Hugging Face model folder"),
    ("quantized", "--model .*: already quantized \\(awq\\)"),
    ("empty_calibration", "--calibration: .*calibration.jsonl: no records"),
    ("malformed_calibration", "--calibration: .*calibration.jsonl:2: invalid JSON"),
    ("bad_record", "--calibration: .*calibration.jsonl:1: no assistant message"),
    ("no_calibration", "--calibration is required for w8a8-int8"),
    ("unwritable_out", "--out .*: cannot write there"),
    ("cuda_without_gpu", "--device cuda: this Ray cluster has no GPU"),
    ("awq_without_gpu", "--method w4a16-awq needs a GPU to quantize and this Ray cluster has none"),
    ("unknown_method", "--method 'int3': choose one of w4a16-gptq, w4a16-awq, w8a8-int8, fp8"),
])
def test_bad_inputs_are_refused_before_any_work(tmp_path, case, needle):
    model, method, device = _model_folder(tmp_path), "w8a8-int8", "cpu"
    calibration, out = _chat_file(tmp_path, [GOOD]), str(tmp_path / "out")
    if case == "not_a_model":
        model = str(tmp_path)
    elif case == "quantized":
        model = _model_folder(tmp_path, quantized="awq", name="q")
    elif case == "empty_calibration":
        calibration = _chat_file(tmp_path, [])
    elif case == "malformed_calibration":
        calibration = _chat_file(tmp_path, [GOOD, "{not json"])
    elif case == "bad_record":
        calibration = _chat_file(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "Hi"}]})])
    elif case == "no_calibration":
        calibration = None
    elif case == "unwritable_out":
        (tmp_path / "a-file").write_text("x")
        out = str(tmp_path / "a-file" / "out")
    elif case == "cuda_without_gpu":
        device = "cuda"
    elif case == "awq_without_gpu":
        method = "w4a16-awq"
    elif case == "unknown_method":
        method = "int3"
    with pytest.raises(QuantizeError, match=needle):
        check_inputs(model, method, calibration, 8, out, device, 0)


def test_the_command_line_names_an_unknown_method():
    done = subprocess.run([sys.executable, "-m", "jobs.export", "quantize", "--model", "default", "--method", "int3",
                           "--out", "x"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'int3'" in done.stderr


def _answer_nll(client, model: str, tokenizer, pairs: list[tuple[str, str]]) -> float:
    from jobs.evaluate.quality import served_answer_nll

    total, count = served_answer_nll(client, model, tokenizer, pairs)
    return total / count


# The bound on the answer-perplexity change of w8a8-int8 (GPTQ, 32 calibration conversations) against the
# fp32 model, both as the app serves them (the quantized one in bf16, as CPU int8 kernels need). Measured
# with jobs.evaluate.quality on 20 GSM8K answers: +3.7% from 64 conversations (docs/quantize.md); 8% leaves
# room for the smaller calibration set here.
PPL_CHANGE_BOUND = 0.08


def test_quantize_then_serve_through_the_app(server, tmp_path):
    """The job end to end: quantize SmolLM2 (w8a8-int8, GPTQ, in the quantizer's own Ray runtime env) from
    chat data, serve the folder through the app next to the fp32 model, compare them on GSM8K answers."""
    import math

    from openai import OpenAI
    from ray import serve
    from transformers import AutoTokenizer

    from cluster.model_cache import ensure_default_model
    from jobs.evaluate.gsm8k import DEFAULT_GSM8K
    from jobs.export.quantize import run
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig, ModelConfig
    from tests.conftest import MODEL_ID, TEST_KEY

    train = [json.loads(line) for line in (DEFAULT_GSM8K.parent / "train.jsonl").read_text().splitlines()[:32]]
    calibration = _chat_file(tmp_path, [json.dumps({"messages": [
        {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}) for r in train])
    out = tmp_path / "smollm2-w8a8"
    # No CPU reserved: the session's engines hold the head's CPUs, and a task waiting for one would hang.
    summary = run("default", "w8a8-int8", calibration, 32, str(out), max_length=256, num_cpus=0)
    folder_config = json.loads((out / "config.json").read_text())
    assert folder_config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert summary["samples"] == 32 and (out / "quantize.json").is_file()
    fp32_bytes = sum(f.stat().st_size for f in ensure_default_model().glob("*.safetensors"))
    assert summary["size_bytes"] < 0.5 * fp32_bytes  # int8 layers; the tied embedding stays full width

    config = AppConfig(models=[ModelConfig(id="smollm2-w8a8", path=str(out), max_model_len=1024,
                                           resources={"num_cpus": 0})],
                       ingress={"usage_store": {"path": None}}, adapter_registry={"path": None})
    serve.run(build_from_config(config), name="quantized", route_prefix="/quantized")
    try:
        quantized = OpenAI(base_url=f"{server}/quantized/v1", api_key="unused", max_retries=0, timeout=300)
        # It answers; whether the answer is still the base's is what the perplexity below measures (a 135M
        # model in int8 and bf16 changes many greedy answers: docs/quantize.md).
        choice = quantized.chat.completions.create(
            model="smollm2-w8a8", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0).choices[0]
        assert choice.message.content.strip() and choice.finish_reason in ("stop", "length"), choice
        tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
        test = [json.loads(line) for line in DEFAULT_GSM8K.read_text().splitlines()[:20]]
        pairs = [(r["question"], r["answer"]) for r in test]
        base = OpenAI(base_url=f"{server}/v1", api_key=TEST_KEY, max_retries=0, timeout=300)
        base_ppl = math.exp(_answer_nll(base, MODEL_ID, tokenizer, pairs))
        quant_ppl = math.exp(_answer_nll(quantized, "smollm2-w8a8", tokenizer, pairs))
        change = quant_ppl / base_ppl - 1
        print(f"GSM8K answer perplexity on 20 answers: fp32 {base_ppl:.4f}, w8a8 {quant_ppl:.4f}, "
              f"change {change:+.2%}")
        assert abs(change) <= PPL_CHANGE_BOUND, (base_ppl, quant_ppl)
        assert quant_ppl != base_ppl  # the quantized weights are what answered
    finally:
        serve.delete("quantized")
