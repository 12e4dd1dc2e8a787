"""A model folder for throughput benchmarks with dummy weights (`load_format=dummy`): a Llama config of a
chosen shape plus the SmolLM2 tokenizer (vocab 49152). Never use it for accuracy figures.

    python -m jobs.bench.dummy_model --shape llama3-8b --tokenizer <smollm2 folder> --out /tmp/llama3-8b-dummy

`--random-weights` also writes random bf16 weights (made on the GPU when there is one), for jobs that
load weights from disk, such as fine-tuning throughput runs.

`--quantized w4a16|w8a8` declares compressed-tensors quantized linear layers in config.json, as
`jobs.export quantize` writes them (w4a16: 4-bit groups of 128; w8a8: int8 per channel, int8 activations
per token). vLLM then builds the quantized layers and fills them with dummy values: the speed and memory of
a quantized model without quantizing 16 GB of random weights first.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPES = {
    # Llama-3-8B: 32 layers, hidden 4096, GQA 32/8, MLP 14336 (vocab cut to the SmolLM2 tokenizer's 49152).
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8},
    # A ~1.8B Llama shape.
    "llama-1.8b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "num_key_value_heads": 8},
}
def _compressed_tensors(weights: dict, activations: dict | None, format: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": format, "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {},
            "config_groups": {"group_0": {"targets": ["Linear"], "format": format, "weights": weights,
                                          "input_activations": activations, "output_activations": None}}}


QUANTIZED = {
    "w4a16": _compressed_tensors({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                  "group_size": 128, "dynamic": False, "actorder": None}, None, "pack-quantized"),
    "w8a8": _compressed_tensors({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                                 "dynamic": False},
                                {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                 "dynamic": True}, "int-quantized"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_random_weights(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def write_dummy_model(shape: str, tokenizer_dir: Path, out: Path, random_weights: bool = False,
                      quantized: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
              "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    if quantized:
        if random_weights:
            raise ValueError("a --quantized folder has no weights: serve it with load_format=dummy")
        config["quantization_config"] = QUANTIZED[quantized]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    if random_weights and not any(out.glob("*.safetensors")):
        write_random_weights(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench.dummy_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--tokenizer", required=True, help="folder with the SmolLM2 tokenizer files")
    parser.add_argument("--out", required=True)
    parser.add_argument("--random-weights", action="store_true", help="also write random bf16 weights")
    parser.add_argument("--quantized", choices=sorted(QUANTIZED), default=None,
                        help="declare compressed-tensors quantized layers (dummy weights only)")
    args = parser.parse_args(argv)
    print(write_dummy_model(args.shape, Path(args.tokenizer), Path(args.out), args.random_weights, args.quantized))


if __name__ == "__main__":
    main()
