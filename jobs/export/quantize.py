"""Quantize a model with llm-compressor into a compressed-tensors folder that vLLM serves as it is.

    python -m jobs.export quantize --model runs/finetune/<run>/merged --method w4a16-gptq \\
        --calibration data/assistant.jsonl --out runs/quantized/<run>-w4a16

Why llm-compressor: it is vLLM's own quantization library, it writes compressed-tensors (the format vLLM
loads natively on GPUs and on the CPU backend), and it has GPTQ, AWQ, SmoothQuant-style W8A8 and FP8 in one
API. GPTQModel writes GPTQ/AWQ folders too, but needs torch >= 2.14 and transformers >= 5.20, newer than
the serving stack.

llm-compressor pins compressed-tensors and transformers versions other than vLLM's, so it cannot share
vLLM's environment. The heavy step runs as a Ray task in its own runtime environment: Ray builds a
virtualenv on top of this one with the pinned packages below (once per node, cached), so that the job runs
the same way as a plain program, through `ray job submit`, and on a GPU worker of a cluster.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tuneserve.quantize")

# method -> (what it is, whether it uses calibration data)
METHODS = {
    "w4a16-gptq": ("4-bit integer weights, 16-bit activations, GPTQ (error-compensating rounding)", True),
    "w4a16-awq": ("4-bit integer weights, 16-bit activations, AWQ (activation-aware scales; needs a GPU)", True),
    "w8a8-int8": ("8-bit integer weights (GPTQ) and dynamic per-token 8-bit activations", True),
    "fp8": ("fp8 weights and dynamic per-token fp8 activations (no calibration needed)", False),
}
# Methods whose quantizer cannot run on a CPU: llm-compressor 0.14's AWQ pins its cached activations in
# accelerator memory, and on a machine without one fails mid-run with "Cannot access accelerator device
# when none is available" (measured on SmolLM2, docs/quantize.md).
NEEDS_GPU = {"w4a16-awq"}

# The quantizer's own environment, layered by Ray over this one (--no-deps: everything else is shared).
QUANTIZER_PACKAGES = [
    "llmcompressor==0.14.0.1",
    "compressed-tensors==0.19.0",
    "transformers==5.17.0",
    "huggingface-hub==1.33.0",
    "auto-round==0.16.1",
    "nvidia-ml-py==13.615.71",
]
QUANTIZER_ENV = {"pip": {"packages": QUANTIZER_PACKAGES, "pip_check": False,
                         "pip_install_options": ["--no-deps", "--disable-pip-version-check"]}}


class QuantizeError(ValueError):
    """An input the job refuses before any heavy work: the message names it."""


@dataclass
class QuantizeSpec:
    model: str  # as the user gave it: a storage URI or `default` is fetched on the task's node
    method: str
    calibration: list  # conversations, rendered with the model's chat template on the task's node
    out: str  # a storage URI or path
    max_length: int = 512
    device: str = "cpu"
    group_size: int = 0  # 4-bit methods: 0 picks the largest of 128/64/32 that divides every layer


def _model_config(model: str) -> dict:
    """The model's config.json, read where the model is (a storage URI is not fetched for this), after
    checking that it is a HF model folder."""
    from cluster import storage
    from cluster.model_cache import resolve_model_path

    try:
        where = storage.locate(model) if storage.is_uri(model) else storage.locate(
            str(Path(resolve_model_path(model)).resolve()))
        names = where.listdir() if where.is_dir() else []
    except (storage.StorageError, OSError) as exc:
        raise QuantizeError(f"--model {model}: {exc}") from exc
    if "config.json" not in names or not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise QuantizeError(f"--model {model}: not a Hugging Face model folder (config.json and *.safetensors "
                            f"or *.bin expected in {where.uri})")
    try:
        return json.loads(where.join("config.json").read_text())
    except ValueError as exc:
        raise QuantizeError(f"--model {model}: config.json is not valid JSON ({exc})") from exc


def check_inputs(model: str, method: str, calibration: str | None, samples: int, out: str, device: str,
                 gpus_available: float) -> list:
    """Every refusal the job can make before quantizing; returns the calibration conversations."""
    from cluster.storage import StorageError, locate
    from jobs.data.records import DataError, read_conversations

    if method not in METHODS:
        raise QuantizeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method in NEEDS_GPU and gpus_available < 1:
        raise QuantizeError(f"--method {method} needs a GPU to quantize and this Ray cluster has none; use "
                            "w4a16-gptq (the same 4-bit format) on CPUs, or run on a cluster with a GPU worker")
    if method in NEEDS_GPU and device != "cuda":
        raise QuantizeError(f"--method {method} runs its quantizer on a GPU: add --device cuda")
    if device == "cuda" and gpus_available < 1:
        raise QuantizeError(f"--device cuda: this Ray cluster has no GPU (method {method}); use --device cpu "
                            "or run on a cluster with a GPU worker")
    if samples < 1:
        raise QuantizeError("--samples must be at least 1")
    quantized = _model_config(model).get("quantization_config")
    if quantized:
        raise QuantizeError(f"--model {model}: already quantized ({quantized.get('quant_method', 'unknown')}); "
                            "start from full-precision weights")
    conversations: list = []
    if METHODS[method][1]:
        if not calibration:
            raise QuantizeError(f"--calibration is required for {method}: a few hundred of your own chat "
                                "records (the fine-tune's data) or hf:<dataset>")
        try:
            conversations = read_conversations(calibration)[:samples]
        except DataError as exc:
            raise QuantizeError(f"--calibration: {exc}") from exc
    try:  # a probe file: an output that cannot be written fails now, not after the quantization
        probe = locate(out).join(".tuneserve-write-probe")
        probe.write_text("probe")
        probe.delete()
    except (StorageError, OSError) as exc:
        raise QuantizeError(f"--out {out}: cannot write there ({exc})") from exc
    return conversations


def pick_group_size(model) -> int:
    """4-bit groups must divide every quantized layer's input width (SmolLM2's 576 is not a multiple of 128)."""
    import torch

    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    for size in (128, 64, 32):
        if all(width % size == 0 for width in widths):
            return size
    raise QuantizeError(f"no 4-bit group size of 128/64/32 divides the layer widths {sorted(widths)}")


def recipe(method: str, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    ignore = ["lm_head"]
    if method in ("w4a16-gptq", "w4a16-awq"):
        symmetric = method == "w4a16-gptq"  # AWQ's scales pair with zero points
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group",
                                   group_size=group_size)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        if method == "w4a16-gptq":
            from llmcompressor.modifiers.quantization import GPTQModifier

            return GPTQModifier(config_groups=groups, ignore=ignore)
        from llmcompressor.modifiers.awq import AWQModifier

        return AWQModifier(config_groups=groups, ignore=ignore)
    if method == "w8a8-int8":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)


def quantize(spec: QuantizeSpec) -> dict:
    """The heavy step, in the quantizer's environment: load, calibrate, compress, save, upload."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.model_cache import resolve_model_path
    from cluster.storage import locate

    started = time.monotonic()
    folder = resolve_model_path(spec.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map=spec.device)
    group_size = spec.group_size or (pick_group_size(model) if spec.method.startswith("w4a16") else 0)
    kwargs = {}
    if spec.calibration:  # as the model sees chat in serving: through its chat template
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in spec.calibration]
        kwargs = {"dataset": Dataset.from_dict({"text": texts}), "num_calibration_samples": len(texts),
                  "max_seq_length": spec.max_length}
    oneshot(model=model, recipe=recipe(spec.method, group_size), tokenizer=tokenizer, **kwargs)
    with tempfile.TemporaryDirectory(prefix="tuneserve-quantized-") as scratch:
        folder = Path(scratch) / "model"
        model.save_pretrained(folder, save_compressed=True)
        tokenizer.save_pretrained(folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        summary = {"method": spec.method, "group_size": group_size or None, "samples": len(spec.calibration),
                   "max_length": spec.max_length, "seconds": round(time.monotonic() - started, 1),
                   "size_bytes": size, "source": spec.model}
        (folder / "quantize.json").write_text(json.dumps(summary, indent=1))
        target = locate(spec.out)
        target.upload(folder)
    return {**summary, "out": target.uri}


def run(model: str, method: str, calibration: str | None, samples: int, out: str, max_length: int = 512,
        device: str = "cpu", group_size: int = 0, num_cpus: float = 1) -> dict:
    """Check everything, then quantize in a Ray task of the quantizer's environment (on a GPU for cuda)."""
    from cluster.local import connect
    from cluster.storage import is_uri

    connect(logging_level=logging.WARNING)  # before ray is imported: it keeps a local head's 127.0.0.1
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    conversations = check_inputs(model, method, calibration, samples, out, device, gpus)
    log.info("quantizing %s with %s (%s) on %d calibration samples; output %s", model, method,
             METHODS[method][0], len(conversations), out)
    local_folder = not (model == "default" or is_uri(model))
    spec = QuantizeSpec(model=str(Path(model).resolve()) if local_folder else model, method=method,
                        calibration=conversations, out=out, max_length=max_length,
                        device=device, group_size=group_size)
    options = {"runtime_env": QUANTIZER_ENV, "num_gpus": 1 if device == "cuda" else 0, "num_cpus": num_cpus}
    if local_folder:  # a folder of this machine only: quantize here
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    task = ray.remote(quantize).options(**options)
    summary = ray.get(task.remote(spec))
    log.info("wrote %s: %.1f MB in %.0f s", summary["out"], summary["size_bytes"] / 1e6, summary["seconds"])
    return summary

