"""Hugging Face output: adapters in PEFT format, full models, and adapter merges."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """Inputs that cannot be merged or saved (missing folders, mismatched base)."""


def save_hf(cfg, model, weights: dict, tokenizer, out: Path) -> None:
    """Write an adapter (lora/qlora) or a full model (full) from gathered `weights`, plus the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def is_hf_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))


def is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """base (full precision, not 4-bit) + LoRA adapter → one standard HF folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out = Path(base), Path(adapter), Path(out)
    if not is_hf_model_folder(base):
        raise ExportError(f"{base}: not a Hugging Face model folder (config.json + weights)")
    if not is_adapter_folder(adapter):
        raise ExportError(f"{adapter}: not a PEFT adapter folder (adapter_config.json)")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=DTYPES[dtype])
    if getattr(model.config, "quantization_config", None):
        raise ExportError(f"{base}: is a quantized model; merge into the full-precision base instead")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(str(out))
    log.info("merged %s + %s -> %s (%s)", base, adapter, out, dtype)
    return out
