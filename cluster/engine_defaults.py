"""How a vLLM engine is set up on a node, for every engine we start: the app's replicas (serve_app/engine.py)
and the jobs' own engines (evaluation, distillation targets, benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# vLLM's CPU backend: a small KV cache (GiB) and no cores held back, sized for a 2-core laptop or CI box.
CPU_ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}

def multicast_off(env: dict[str, str] = os.environ) -> bool:
    """True on nodes that keep NVLink multicast off (as shared GPU hosts do)."""
    return env.get("NCCL_NVLS_ENABLE") == "0" or env.get("TORCH_SYMM_MEM_DISABLE_MULTICAST") == "1"


def tensor_parallel_defaults(tensor_parallel_size: int, env: dict[str, str] = os.environ
                             ) -> tuple[dict[str, Any], dict[str, str]]:
    """Engine kwargs and environment for a tensor-parallel engine on a node without NVLink multicast.

    vLLM 0.26's default all-reduce paths (custom all-reduce over symmetric memory, and the fused
    all-reduce+RMSNorm pass) hung or failed there with TP=2 on 2x H200; plain NCCL all-reduce works
    (docs/benchmarks.md). Elsewhere, and for one GPU, vLLM's defaults stay."""
    if tensor_parallel_size < 2 or not multicast_off(env):
        return {}, {}
    kwargs = {"disable_custom_all_reduce": True,
              "compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}}
    return kwargs, {"VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this node's CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), read from
    /proc/cpuinfo (or `cpuinfo`). There vLLM-CPU's bf16 engine serves about twice fp32's output tokens/s
    (docs/benchmarks.md). Without them bf16 is emulated with conversions, so fp32 stays the choice."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, on_gpu: bool, quantized: bool = False) -> str:
    """A model's `dtype` setting as the engine takes it. `auto`: bfloat16 on GPUs; on a CPU, bfloat16 where it has native bf16 instructions (the engine then
    runs eager, the only mode vLLM-CPU runs bf16 correctly in), else float32. Quantized weights on a CPU
    always run bfloat16: vLLM-CPU's quantized kernels take bf16 activations (its int8 GEMM refuses float32:
    "int8_scaled_mm_with_quant: expect A to be bfloat16 or half")."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if on_gpu or quantized or cpu_has_native_bf16() else "float32"
