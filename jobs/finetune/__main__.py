"""Fine-tune a causal LM on Ray Train: LoRA, QLoRA (bitsandbytes 4/8-bit) or full fine-tuning, with DDP,
DeepSpeed ZeRO-2/3 or FSDP2 across the workers of `scaling`, on demonstrations (supervised) or on preference
pairs (`objective: dpo`).

  python -m jobs.finetune --config jobs/configs/assistant_cpu.yaml [key.sub=value ...]
  ray job submit --working-dir . -- python -m jobs.finetune --config jobs/configs/<recipe>.yaml

Runs on the Ray cluster in RAY_ADDRESS, else on the local head (`python -m cluster.local up`), else on a
Ray it starts for itself. Everything is checked (config keys, combinations, storage, model, data files,
tokenised size) before any worker starts.

Inputs and outputs live in storage (TUNESERVE_STORAGE: the project folder on one machine, s3:// or gs://
on a cluster whose nodes share no disk): relative data paths and output.dir are read and written there.
Output under <output.dir>/<output.name>/: checkpoint_*/, metrics.jsonl, chat_eval.jsonl, tensorboard/,
attempts.jsonl (the nodes each worker group ran on and the step it resumed from), and at the end
adapter/ (PEFT) and merged/ (full HF model) for LoRA/QLoRA, or model/ for full fine-tuning, and
summary.json. Re-running the same command resumes from the last checkpoint in storage. With a `publish:`
section the adapter is then evaluated and, if it passes the gate, served by the running service
(jobs/finetune/publish.py); exit code 3 when the gate refuses it.
`python -m jobs.export pull <output.name>` copies a run to this machine.

TUNESERVE_MAX_STEPS=N, in the environment of the job's driver (for `ray job submit`: the cluster's nodes),
makes a smoke run of a recipe that sets no train.max_steps: at most N optimizer steps, and the base answers
only the distillation prompts N steps can draw (the adapter's input directions, too, come from about as many
examples). The recipe's keys are unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from cluster import storage
from cluster.storage import Location
from jobs.data.records import DataError, read_conversations, read_preferences
from jobs.export.hf import ExportError, is_hf_model_folder, merge_adapter
from jobs.finetune.config import (
    ConfigError,
    FinetuneConfig,
    TrainPlan,
    check_dtype,
    check_supported,
    load_config,
    resolved_dtype,
    rows_per_step,
    smoke_steps,
)
from jobs.finetune.distill import distill_examples, read_distill_prompts
from jobs.finetune.publish import PublishError

log = logging.getLogger("tuneserve.finetune")


def prepare_examples(cfg: FinetuneConfig, model_path: str) -> tuple[list, dict]:
    """Read and tokenise (assistant-only labels) the training data in the driver."""
    from transformers import AutoTokenizer

    from jobs.data.tokenize import tokenize_conversations, tokenize_preferences

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.chat_template:
        raise DataError(f"{model_path}: the tokenizer has no chat template to render conversations with")
    if cfg.objective == "grpo":  # prompts: the rollout engine answers them during training
        from jobs.finetune.rollout import read_rl_prompts, tokenize_prompts

        prompts, dropped = tokenize_prompts(cfg, tokenizer, read_rl_prompts(cfg))
        if not prompts:
            raise DataError(f"every prompt leaves fewer than 16 tokens of data.max_length={cfg.data.max_length} "
                            "for its answer; raise data.max_length")
        return prompts, {"prompts": len(prompts) + dropped, "dropped": dropped,
                         "tokens": sum(len(p["prompt_ids"]) for p in prompts)}
    if cfg.objective == "dpo":  # preference pairs: one row each, both answers in it
        pairs = [p for source in cfg.data.train for p in read_preferences(source)]
        data = tokenize_preferences(tokenizer, pairs, cfg.data.max_length)
        read = {"pairs": len(pairs)}
    else:
        conversations = [c for source in cfg.data.train for c in read_conversations(source)]
        data = tokenize_conversations(tokenizer, conversations, cfg.data.max_length)
        read = {"conversations": len(conversations)}
    if not data.examples:
        raise DataError(f"no example has a supervised (assistant) token left after truncation to "
                        f"{cfg.data.max_length} tokens ({data.dropped} dropped); raise data.max_length")
    stats = {**read, "examples": len(data.examples), "dropped": data.dropped,
             "truncated": data.truncated, "tokens": sum(len(e.input_ids) for e in data.examples)}
    return data.examples, stats


def to_rows(cfg: FinetuneConfig, examples: list) -> list:
    from jobs.data.tokenize import pack

    if cfg.objective in ("dpo", "grpo"):  # a row is one pair, or one prompt (its answers come in training)
        return examples
    return pack(examples, cfg.data.max_length, cfg.data.shuffle_seed) if cfg.data.packing else examples


# What a checkpoint's state depends on: resuming under a changed one would fail inside the workers.
STATE_SHAPING = ("model", "lora", "quant", "strategy")


def claim_run_dir(cfg: FinetuneConfig, run: Location) -> None:
    """A re-run with the same output.dir/output.name resumes, so it must be the same recipe (steps, data
    and learning rate may change; the model, method and sharding may not)."""
    shape = {key: getattr(cfg, key).model_dump() for key in STATE_SHAPING}
    shape["num_workers"] = cfg.scaling.num_workers
    marker = run.join("recipe.json")
    if marker.is_file():
        before = json.loads(marker.read_text())
        changed = sorted(k for k in shape if before.get(k) != shape[k])
        if changed:
            raise ConfigError(f"{run.uri} holds a run of a different recipe ({', '.join(changed)} changed), "
                              "which cannot resume from its checkpoints; choose another output.name or delete it")
    marker.write_text(json.dumps(shape, indent=1))


def plan_steps(cfg: FinetuneConfig, rows: int) -> tuple[int, int]:
    per_step = rows_per_step(cfg)
    steps_per_epoch = rows // per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"the data gives {rows} rows, fewer than one optimizer step needs "
                          f"({cfg.scaling.num_workers} workers x micro_batch_size {cfg.train.micro_batch_size} x "
                          f"grad_accum {cfg.train.grad_accum} = {per_step}); lower grad_accum or add data")
    total = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    return steps_per_epoch, min(total, smoke_steps(cfg) or total)


def run(cfg: FinetuneConfig, dry_run: bool = False) -> dict:
    from cluster.model_cache import resolve_model_path

    check_supported(cfg)
    run = storage.check(cfg.run_location().uri)  # unreachable or wrong storage fails here, naming the URI
    model_path = resolve_model_path(cfg.model.path)  # the driver's copy, for the tokenizer and the merge
    if not is_hf_model_folder(Path(model_path)):
        raise ConfigError(f"model.path {cfg.model.path!r}: not a Hugging Face model folder "
                          "(needs config.json and *.safetensors or *.bin)")
    examples, data_stats = prepare_examples(cfg, model_path)
    rows = to_rows(cfg, examples)
    data_stats["rows"] = len(rows)
    steps_per_epoch, total_steps = plan_steps(cfg, len(rows))
    distill_prompts = read_distill_prompts(cfg)  # checked here; the base answers them once Ray is up
    if smoke_steps(cfg):
        log.warning("TUNESERVE_MAX_STEPS: a smoke run of %d steps%s", total_steps,
                    f", on the first {len(distill_prompts)} distillation prompts" if distill_prompts else "")
    if distill_prompts:
        data_stats["distill_prompts"] = len(distill_prompts)
    log.info("data: %s; %d steps (%d per epoch)%s", json.dumps(data_stats), total_steps, steps_per_epoch,
             " before the distillation examples" if distill_prompts else "")

    from cluster.local import connect

    connect(logging_level=logging.WARNING)  # before ray is imported: it keeps a local head's 127.0.0.1
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.resources import cluster_has_gpus

    use_gpu = cluster_has_gpus() if cfg.scaling.use_gpu == "auto" else cfg.scaling.use_gpu
    check_dtype(cfg, use_gpu)
    dtype = resolved_dtype(cfg, use_gpu)
    if dry_run:  # without the distillation examples: the base makes them at the start of a real run
        return {"data": data_stats, "total_steps": total_steps, "use_gpu": use_gpu, "dtype": dtype,
                "run": run.uri}

    claim_run_dir(cfg, run)
    if distill_prompts:  # the base's answers and targets join the data (then the step count is final)
        distilled = distill_examples(cfg, run, use_gpu)
        rows = to_rows(cfg, examples + distilled)
        steps_per_epoch, total_steps = plan_steps(cfg, len(rows))
        data_stats.update(rows=len(rows), distill_examples=len(distilled),
                          distill_tokens=sum(e.distilled for e in distilled))
        log.info("data with distillation: %s; %d steps (%d per epoch)", json.dumps(data_stats), total_steps,
                 steps_per_epoch)
    # Workers get the model's reference, not the driver's folder: each node resolves it into its own cache.
    plan = TrainPlan(model=cfg.model.path, dtype=dtype, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                     run_uri=run.uri)
    if cfg.lora.input_share:  # the directions each lora_A reads, from the data and the base's answers
        from jobs.finetune.distill import answer_sequences
        from jobs.finetune.subspace import input_bases

        own = [e.input_ids for e in examples]
        if smoke_steps(cfg):  # a smoke run reads directions from about as many examples as its steps draw
            own = own[:smoke_steps(cfg) * rows_per_step(cfg) * math.ceil(len(own) / len(rows))]
        plan.input_bases = input_bases(cfg, run, own, answer_sequences(cfg, run), use_gpu)
    loop_config = {"cfg": cfg.model_dump(), "plan": asdict(plan), "rows": ray.put(rows)}
    if cfg.objective == "grpo":  # the engine that samples the policy's answers, for the whole run
        from jobs.finetune.rollout import start_engine

        loop_config["engine"] = start_engine(cfg, dtype, use_gpu)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    parent = run.path.rsplit("/", 1)[0]
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources, placement_strategy=cfg.scaling.placement),
        # Local storage as a plain path (Ray Train's own local handling); object stores with our filesystem.
        run_config=RunConfig(name=cfg.output.name, storage_path=parent,
                             storage_filesystem=None if run.is_local else run.fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                             worker_runtime_env={"env_vars": worker_env(use_gpu)}),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        if "engine" in loop_config:
            ray.kill(loop_config["engine"])  # frees its memory (and GPU) before the merge
    wall_s = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    drop_untracked_checkpoints(run, [c.path for c, _ in result.best_checkpoints or []])
    summary = finish(cfg, model_path, run.at(result.checkpoint.path), run, dtype)
    summary.update({"wall_s": round(wall_s, 1), "total_steps": total_steps, "data": data_stats, "dtype": dtype,
                    "use_gpu": use_gpu, "run": run.uri, "checkpoint": result.checkpoint.path})
    run.join("summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.publish is not None:  # evaluate, and register with the running service if the gate passes
        from jobs.finetune.publish import publish

        summary["publish"] = publish(cfg, summary)
    return summary


def drop_untracked_checkpoints(run: Location, kept: list[str]) -> None:
    """Ray Train keeps the last `checkpoint.keep`, but leaves in storage the one a worker-group restart
    resumed from; remove every checkpoint folder it no longer tracks."""
    kept_names = {path.rstrip("/").rsplit("/", 1)[-1] for path in kept}
    for name in run.listdir():  # folders only: checkpoint_manager_snapshot.json is how a re-run resumes
        folder = run.join(name)
        if name.startswith("checkpoint_") and kept_names and name not in kept_names and folder.is_dir():
            folder.delete()


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


def finish(cfg: FinetuneConfig, model_path: str, checkpoint: Location, run: Location, dtype: str) -> dict:
    """Copy the final weights out of the last checkpoint; merge adapters into the base (on the driver's
    node, then into storage). Paths in the summary are local folders for local storage, else URIs."""
    out: dict = {}
    kind = "model" if cfg.model.method == "full" else "adapter"
    final = run.join(kind)
    checkpoint.join("hf").copy_to(final)
    out[kind] = final.path if final.is_local else final.uri
    if cfg.model.method != "full" and cfg.output.merge:
        merged = run.join("merged")
        with tempfile.TemporaryDirectory(prefix="tuneserve-merge-") as tmp:
            adapter = Path(final.path) if final.is_local else final.download(Path(tmp) / "adapter")
            target = Path(merged.path) if merged.is_local else Path(tmp) / "merged"
            merge_adapter(model_path, adapter, target, cfg.output.merge_dtype or dtype)
            if not merged.is_local:
                merged.upload(target)
        out["merged"] = merged.path if merged.is_local else merged.uri
    from jobs.finetune.loop import read_metrics

    metrics = read_metrics(run)
    if metrics:
        out["first_loss"], out["final_loss"] = metrics[0]["loss"], metrics[-1]["loss"]
        speeds = [m["tokens_per_s"] for m in metrics[1:]] or [metrics[0]["tokens_per_s"]]
        out["tokens_per_s"] = round(sum(speeds) / len(speeds), 1)
        if "peak_mem_gib" in metrics[-1]:
            out["peak_mem_gib"] = max(m.get("peak_mem_gib", 0) for m in metrics)
    attempts = run.join("attempts.jsonl")
    if attempts.is_file():
        out["attempts"] = [json.loads(line) for line in attempts.read_text().splitlines() if line]
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
    except PublishError as exc:  # trained and saved; not published
        return exc.exit_code()
    except (ConfigError, DataError, ExportError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
