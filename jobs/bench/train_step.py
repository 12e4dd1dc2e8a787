"""Fine-tune step time, two ways of computing the same step side by side in one process (`--compare`):

- `logits`: the output layer over every position against only where the loss reads it. The strategies compute
  logits only at `loss_positions` (the position before each labelled or distilled token) through transformers'
  `logits_to_keep`; before, the model computed them at every position and the loss picked its tokens afterwards.
  On a small model the output layer (576 x 49,152 for SmolLM2-135M) and the softmax over the vocabulary are a
  large share of a step on a CPU.
- `attention`: transformers' sdpa, with the L x L block-diagonal mask it makes for a packed row, against
  `packed_sdpa` (jobs/finetune/attention.py), one causal SDPA per packed example. Both compute only the
  needed logits.

Both contenders run forward and backward on the same packed rows of the recipe, with the recipe's model (LoRA as
configured), alternately (A B B A ...), so that a change in the machine's speed falls on both.

    python -m jobs.bench.train_step --config jobs/configs/assistant_cpu.yaml \\
        --targets runs/finetune/assistant-cpu/distill_targets.json.gz --rows 8 --compare attention

`--targets` adds the run's stored distillation examples (and greedy openings), as the job does; without it
the rows hold the identity data only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the fine-tune recipe (YAML)")
    parser.add_argument("--targets", help="a run's distill_targets.json.gz (local path or storage URI)")
    parser.add_argument("--rows", type=int, default=8, help="packed rows each contender trains on (default 8)")
    parser.add_argument("--compare", choices=["logits", "attention"], default="logits",
                        help="all logits vs the needed ones (default), or sdpa vs packed_sdpa")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, a.b=value, as for jobs.finetune")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from cluster.model_cache import resolve_model_path
    from cluster.storage import locate
    from jobs.data.tokenize import collate, pack, padding_id
    from jobs.finetune.__main__ import prepare_examples
    from jobs.finetune import attention
    from jobs.finetune.config import load_config
    from jobs.finetune.distill import stored_examples
    from jobs.finetune.loop import worker_rows
    from jobs.finetune.losses import DISTILL_KEYS, lm_loss, loss_positions
    from jobs.finetune.model import build_model

    cfg = load_config(args.config, args.overrides)
    threads = cfg.train.threads_on_this_node()
    if threads:
        torch.set_num_threads(threads)
    model_path = resolve_model_path(cfg.model.path)
    examples, _ = prepare_examples(cfg, model_path)
    if args.targets:
        stored = json.loads(gzip.decompress(locate(args.targets).read_bytes()))
        examples += stored_examples(cfg, stored["targets"], stored.get("openings", []))
    rows = pack(examples, cfg.data.max_length, cfg.data.shuffle_seed)
    rows = worker_rows(rows, 0, cfg.data.shuffle_seed, 0, 1, args.rows + 1)  # the loop's first rows; one warms up
    attention.register()
    model = build_model(cfg, model_path, "float32", torch.device("cpu"))
    model.train()
    weight = cfg.loss.distill_weight

    def split(batch: dict) -> tuple[dict, torch.Tensor, dict]:  # the model's inputs, labels, distillation targets
        distill = {key: batch[key] for key in DISTILL_KEYS if key in batch}
        inputs = {key: value for key, value in batch.items() if key != "labels" and key not in distill}
        return inputs, batch["labels"], distill

    pad_id = padding_id(AutoTokenizer.from_pretrained(model_path))
    batches = [split(collate([row], pad_id, multiple=64)) for row in rows]  # as the loop collates them

    names = {"logits": ("all positions", "needed positions"), "attention": ("sdpa", attention.NAME)}[args.compare]

    def step(batch: tuple[dict, torch.Tensor, dict], second: bool) -> float:
        """One forward and backward: the first contender, or the second with `second`."""
        inputs, labels, distill = batch
        needed_only = second or args.compare == "attention"
        if args.compare == "attention":
            model.set_attn_implementation(names[second])
        started = time.perf_counter()
        if needed_only:
            positions = loss_positions(labels, distill)
            logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
            loss, _ = lm_loss(logits, labels, distill, weight, positions)
        else:
            loss, _ = lm_loss(model(**inputs, use_cache=False).logits, labels, distill, weight)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    times = {name: [] for name in names}
    step(batches[0], False), step(batches[0], True)  # warm-up
    needed = total = 0
    for index, batch in enumerate(batches[1:]):
        order = [False, True] if index % 2 == 0 else [True, False]
        for second in order:
            times[names[second]].append(step(batch, second))
        _, labels, distill = batch
        needed += len(loss_positions(labels, distill))
        total += labels.shape[1]
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
        "compare": args.compare, "model": cfg.model.path, "method": cfg.model.method, "rows": args.rows,
        "row_tokens": cfg.data.max_length,
        "needed_share": round(needed / total, 3),
        **{f"{name} s/row (median)": round(statistics.median(values), 3) for name, values in times.items()},
        **{f"{name} s (total)": round(sum(values), 1) for name, values in times.items()},
    }
    result["speedup"] = round(sum(times[names[0]]) / sum(times[names[1]]), 3)
    result["per_row_s"] = {name: [round(value, 2) for value in values] for name, values in times.items()}
    print(json.dumps(result))
    print(f"| contender | s per row (median) | total s ({args.rows} rows) |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {sum(values):.1f} |")
    print(f"logits needed at {result['needed_share']:.0%} of positions; {names[0]} / {names[1]}: "
          f"{result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
