"""The seed's plain QLoRA loop, as the baseline our fine-tune job is measured against: transformers +
peft + bitsandbytes, `prepare_model_for_kbit_training`, NF4 with double quant, LoRA on every linear
layer, batch 1 of fixed-length random token rows, gradient checkpointing, torch AdamW.

    python -m jobs.bench.qlora_baseline --model /tmp/llama3-8b-random --steps 12 --seq 1024 --rank 64

Prints one JSON line: tokens/s over the steps after warm-up, and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench.qlora_baseline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.1,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    vocab = model.config.vocab_size
    torch.cuda.reset_peak_memory_stats()
    timed_tokens, timed_s = 0, 0.0
    for step in range(args.steps):
        ids = torch.randint(0, vocab, (1, args.seq), device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            timed_tokens += args.seq
            timed_s += time.perf_counter() - started
    print(json.dumps({"contender": "plain transformers+peft", "tokens_per_s": round(timed_tokens / timed_s, 1),
                      "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))


if __name__ == "__main__":
    main()
