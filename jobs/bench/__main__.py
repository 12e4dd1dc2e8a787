"""Benchmarks, each measuring its contenders side by side in one run:

    python -m jobs.bench serve --concurrency 8 --requests 48 --max-tokens 64
    python -m jobs.bench serve --targets vllm,tuneserve --model /path/to/hf-folder --concurrency 1,16,64
    python -m jobs.bench router --rate 100 --requests 3000 --http-ingress proxy,haproxy
    python -m jobs.bench finetune --shape llama3-8b --steps 12      (GPU: QLoRA job vs plain peft loop)
    python -m jobs.bench finetune --variant mb4:train.micro_batch_size=4 --variant no-ckpt:model.gradient_checkpointing=false
    python -m jobs.bench scaling --shape llama-1.8b --setups lora-zero2,full-zero3 --workers 1,2
    python -m jobs.bench eval --shape llama-1.8b --runs dp1,dp2,tp2       (GSM8K evaluate job, dummy weights)
    python -m jobs.bench chaos --scenarios upstream,disconnects,ingress,engine,soak --soak-requests 10000
    python -m jobs.bench prefix --routings power_of_two,round_robin,prefix --replicas 2 --sessions 16
    python -m jobs.bench quantize --contender fp32=default --contender w8a8=runs/quantized/smollm2-w8a8

Three more are modules of their own:

    python -m jobs.bench.train_step --config jobs/configs/assistant_cpu.yaml --compare logits|attention  (fine-tune step)
    python -m jobs.bench.answer_nll --limit 400 --rounds 2      (GSM8K answer NLL: vLLM prompt logprobs vs packed rows)
    python -m jobs.bench.storage_download                                       (a model from S3: 1 MiB reads vs 64 MiB)
"""

from __future__ import annotations

import argparse
import logging

from jobs.bench import chaos, eval_speed, finetune_speed, prefix_routing, quantized, router_overhead, serve_bench

# Each module adds its own command(s) and the function that runs them.
COMMAND_MODULES = (serve_bench, router_overhead, finetune_speed, eval_speed, chaos, prefix_routing, quantized)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_command(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    run = vars(args).pop("run")  # the command's function; the rest of args is what results record
    run(args)


if __name__ == "__main__":
    main()
