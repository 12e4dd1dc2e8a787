"""Fine-tune a causal LM on Ray Train: LoRA, QLoRA (bitsandbytes 4/8-bit) or full fine-tuning, with DDP,
DeepSpeed ZeRO-2/3 or FSDP2 across the workers of `scaling`.

  python -m jobs.finetune --config jobs/configs/assistant_cpu.yaml [key.sub=value ...]
  ray job submit --working-dir . -- python -m jobs.finetune --config jobs/configs/<recipe>.yaml

Runs on the Ray cluster in RAY_ADDRESS, else on the local head (`python -m cluster.local up`), else on a
Ray it starts for itself. Everything is checked (config keys, combinations, model folder, data files,
tokenised size) before any worker starts. Output under <output.dir>/<output.name>/: checkpoints/,
metrics.jsonl, chat_eval.jsonl, tensorboard/, and at the end adapter/ (PEFT) and merged/ (full HF
model) for LoRA/QLoRA, or model/ for full fine-tuning. Re-running the same command resumes from the last
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

from jobs.data.records import DataError, read_conversations
from jobs.export.hf import ExportError, is_hf_model_folder, merge_adapter
from jobs.finetune.config import (
    ConfigError,
    FinetuneConfig,
    check_dtype,
    check_supported,
    load_config,
    resolved_dtype,
)

log = logging.getLogger("tuneserve.finetune")


def prepare_rows(cfg: FinetuneConfig, model_path: str) -> tuple[list, dict]:
    """Read, tokenise (assistant-only labels) and pack the training data in the driver."""
    from transformers import AutoTokenizer

    from jobs.data.tokenize import pack, tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        raise DataError(f"{model_path}: the tokenizer has no chat template to render conversations with")
    conversations = [c for source in cfg.data.train for c in read_conversations(source)]
    data = tokenize_conversations(tokenizer, conversations, cfg.data.max_length)
    if not data.examples:
        raise DataError(f"no example has a supervised (assistant) token left after truncation to "
                        f"{cfg.data.max_length} tokens ({data.dropped} dropped); raise data.max_length")
    rows = pack(data.examples, cfg.data.max_length, cfg.data.shuffle_seed) if cfg.data.packing else data.examples
    stats = {"conversations": len(conversations), "examples": len(data.examples), "dropped": data.dropped,
             "truncated": data.truncated, "rows": len(rows), "tokens": sum(len(e.input_ids) for e in data.examples)}
    return rows, stats


# What a checkpoint's state depends on: resuming under a changed one would fail inside the workers.
STATE_SHAPING = ("model", "lora", "quant", "strategy")


def claim_run_dir(cfg: FinetuneConfig, run_dir: Path) -> None:
    """A re-run with the same output.dir/output.name resumes, so it must be the same recipe (steps, data
    and learning rate may change; the model, method and sharding may not)."""
    shape = {key: getattr(cfg, key).model_dump() for key in STATE_SHAPING}
    shape["num_workers"] = cfg.scaling.num_workers
    marker = run_dir / "recipe.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        changed = sorted(k for k in shape if before.get(k) != shape[k])
        if changed:
            raise ConfigError(f"{run_dir} holds a run of a different recipe ({', '.join(changed)} changed), "
                              "which cannot resume from its checkpoints; choose another output.name or delete it")
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(shape, indent=1))


def plan_steps(cfg: FinetuneConfig, rows: int) -> tuple[int, int]:
    per_step = cfg.scaling.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum
    steps_per_epoch = rows // per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"the data gives {rows} rows, fewer than one optimizer step needs "
                          f"({cfg.scaling.num_workers} workers x micro_batch_size {cfg.train.micro_batch_size} x "
                          f"grad_accum {cfg.train.grad_accum} = {per_step}); lower grad_accum or add data")
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    return steps_per_epoch, total


def run(cfg: FinetuneConfig, dry_run: bool = False) -> dict:
    from cluster.model_cache import resolve_model_path

    check_supported(cfg)
    model_path = resolve_model_path(cfg.model.path)
    if not is_hf_model_folder(Path(model_path)):
        raise ConfigError(f"model.path {cfg.model.path!r}: not a Hugging Face model folder "
                          "(needs config.json and *.safetensors or *.bin)")
    rows, data_stats = prepare_rows(cfg, model_path)
    steps_per_epoch, total_steps = plan_steps(cfg, len(rows))
    log.info("data: %s; %d steps (%d per epoch)", json.dumps(data_stats), total_steps, steps_per_epoch)

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.local import connect
    from cluster.resources import cluster_has_gpus

    connect(logging_level=logging.WARNING)
    use_gpu = cluster_has_gpus() if cfg.scaling.use_gpu == "auto" else cfg.scaling.use_gpu
    check_dtype(cfg, use_gpu)
    dtype = resolved_dtype(cfg, use_gpu)
    if dry_run:
        return {"data": data_stats, "total_steps": total_steps, "use_gpu": use_gpu, "dtype": dtype}

    run_dir = cfg.run_dir
    claim_run_dir(cfg, run_dir)
    plan = {"model_path": model_path, "dtype": dtype, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "run_dir": str(run_dir)}
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "plan": plan, "rows": ray.put(rows)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.output.name, storage_path=str(run_dir.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                             worker_runtime_env={"env_vars": worker_env(use_gpu)}),
    )
    started = time.perf_counter()
    result = trainer.fit()
    wall_s = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    drop_untracked_checkpoints(run_dir, [c.path for c, _ in result.best_checkpoints or []])
    summary = finish(cfg, model_path, Path(result.checkpoint.path), run_dir, dtype)
    summary.update({"wall_s": round(wall_s, 1), "total_steps": total_steps, "data": data_stats, "dtype": dtype,
                    "use_gpu": use_gpu, "checkpoint": result.checkpoint.path})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def drop_untracked_checkpoints(run_dir: Path, kept: list[str]) -> None:
    """Ray Train keeps the last `checkpoint.keep`, but leaves on disk the one a worker-group restart
    resumed from; remove every checkpoint folder it no longer tracks."""
    kept_names = {Path(path).name for path in kept}
    for folder in run_dir.glob("checkpoint_*"):
        if folder.is_dir() and kept_names and folder.name not in kept_names:
            shutil.rmtree(folder, ignore_errors=True)


def _train_loop(loop_config: dict) -> None:
    from jobs.finetune.loop import train_loop

    train_loop(loop_config)


def worker_env(use_gpu: bool) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if use_gpu:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # less fragmentation as shapes vary
    else:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed: do not probe for CUDA
    return env


def finish(cfg: FinetuneConfig, model_path: str, checkpoint: Path, run_dir: Path, dtype: str) -> dict:
    """Copy the final weights out of the last checkpoint; merge adapters into the base."""
    out: dict = {}
    final = run_dir / ("model" if cfg.model.method == "full" else "adapter")
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(checkpoint / "hf", final)
    out["model" if cfg.model.method == "full" else "adapter"] = str(final)
    if cfg.model.method != "full" and cfg.output.merge:
        merged = merge_adapter(model_path, final, run_dir / "merged", cfg.output.merge_dtype or dtype)
        out["merged"] = str(merged)
    from jobs.finetune.loop import read_metrics

    metrics = read_metrics(run_dir)
    if metrics:
        out["first_loss"], out["final_loss"] = metrics[0]["loss"], metrics[-1]["loss"]
        speeds = [m["tokens_per_s"] for m in metrics[1:]] or [metrics[0]["tokens_per_s"]]
        out["tokens_per_s"] = round(sum(speeds) / len(speeds), 1)
        if "peak_mem_gib" in metrics[-1]:
            out["peak_mem_gib"] = max(m.get("peak_mem_gib", 0) for m in metrics)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (see jobs/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides, e.g. train.max_steps=20 lora.r=8 scaling.num_workers=2")
    parser.add_argument("--dry-run", action="store_true", help="check everything, print the plan, train nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        summary = run(cfg, dry_run=args.dry_run)
    except (ConfigError, DataError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
