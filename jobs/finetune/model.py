"""Build the model for one method: full (all weights train), LoRA (adapters on a frozen base) or QLoRA
(adapters on a bitsandbytes 4-bit/8-bit base)."""

from __future__ import annotations

import logging

import torch

from jobs.export.hf import DTYPES
from jobs.finetune import attention
from jobs.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)


# LoRA targets per architecture when target_modules is "auto": every linear projection of the blocks.
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


def lora_targets(cfg: FinetuneConfig, model_type: str) -> list[str] | str:
    targets = cfg.lora.target_modules
    if targets == "auto":
        return LORA_TARGETS.get(model_type, "all-linear")
    return targets


def quantization_config(cfg: FinetuneConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if cfg.quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=dtype)


def enable_checkpointing(model, every: int) -> None:
    """Activation checkpointing on one decoder layer in every `every`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0


def build_model(cfg: FinetuneConfig, model_path: str, dtype_name: str, device: torch.device):
    """The trainable model on `device`; base weights frozen for LoRA/QLoRA."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[dtype_name]
    if cfg.model.attn_implementation == attention.NAME:
        attention.register()
    kwargs = {"dtype": dtype, "attn_implementation": cfg.model.attn_implementation}
    if cfg.model.method == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg, dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # training: no KV cache (and packed-sequence masks need none)
    if cfg.model.method != "qlora":
        model.to(device)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model, cfg.model.checkpoint_every)
    if cfg.model.method == "full":
        return model

    from peft import LoraConfig, get_peft_model

    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings still need grads to flow into checkpoints
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=lora_targets(cfg, model.config.model_type), task_type="CAUSAL_LM")
    # peft keeps the adapters in fp32 (exact updates) over a bf16/4-bit base; the frozen base is not
    # upcast (peft's prepare_model_for_kbit_training would upcast embeddings and norms to fp32).
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %.2fM trainable parameters (targets %s)", cfg.model.method, trainable / 1e6, lora.target_modules)
    return model
