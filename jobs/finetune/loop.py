"""The training loop each Ray Train worker runs: one loop for every method and strategy.

Resume: the latest checkpoint reported through `ray.train.report` (after a worker-group restart or a
re-submit with the same output.dir/output.name) restores weights, optimizer, scheduler and the step;
the data order is a pure function of (seed, epoch), so the loop skips exactly the rows already seen.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.storage import Location, locate
from jobs.data.tokenize import Example, collate, padding_id
from jobs.finetune.config import FinetuneConfig, TrainPlan

log = logging.getLogger("tuneserve.finetune")


def worker_rows(rows: list[Example], epoch: int, seed: int, rank: int, world: int, per_worker: int) -> list[Example]:
    """This worker's rows for one epoch: a seeded shuffle, then an equal contiguous-stride share."""
    order = list(range(len(rows)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [rows[i] for i in order[rank::world][:per_worker]]


def chat_eval(model, tokenizer, prompts: list[str], max_tokens: int, device: torch.device) -> list[dict]:
    """Greedy answers to the sample prompts (the seed's evaluate-chat hook). All ranks run it: sharded
    models (ZeRO-3, FSDP2) need every rank in each forward."""
    answers = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=padding_id(tokenizer),
                                 use_cache=True, synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
            answers.append({"prompt": prompt, "answer": tokenizer.decode(out[0, ids.shape[1]:],
                                                                          skip_special_tokens=True).strip()})
    model.train(was_training)
    return answers


def read_metrics(run: Location | str | Path) -> list[dict]:
    """The per-step lines MetricsSink wrote to <run>/metrics.jsonl, in order."""
    run = run if isinstance(run, Location) else locate(str(run))
    return [json.loads(line) for line in run.join("metrics.jsonl").read_text().splitlines() if line]


class MetricsSink:
    """Rank 0: a JSONL line per logged step, TensorBoard scalars, and the chat answers, kept in storage.

    Object stores cannot append, so each file is rewritten whole after each line (they stay small). A
    resumed run keeps the lines up to the step it resumed from. TensorBoard writes to a local folder that
    is uploaded at each checkpoint and at the end (in place when the storage is local)."""

    def __init__(self, run: Location, tensorboard: bool, start_step: int):
        self.run = run
        self.lines = {name: [line for line in self._existing(name) if line["step"] <= start_step]
                      for name in ("metrics.jsonl", "chat_eval.jsonl")}
        self.writer = None
        self._tb_local = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to metrics.jsonl only")
            else:
                if run.is_local:
                    folder = Path(run.join("tensorboard").path)
                else:
                    self._tb_local = tempfile.TemporaryDirectory(prefix="tuneserve-tb-")
                    folder = Path(self._tb_local.name)
                    if run.join("tensorboard").exists():  # earlier attempts' event files
                        run.join("tensorboard").download(folder)
                self.writer = SummaryWriter(str(folder))

    def _existing(self, name: str) -> list[dict]:
        target = self.run.join(name)
        return [json.loads(line) for line in target.read_text().splitlines() if line] if target.is_file() else []

    def _append(self, name: str, line: dict) -> None:
        self.lines[name].append(line)
        self.run.join(name).write_text("".join(json.dumps(item) + "\n" for item in self.lines[name]))

    def log(self, step: int, values: dict) -> None:
        self._append("metrics.jsonl", {"step": step, **values})
        if self.writer:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def log_chat(self, step: int, answers: list[dict]) -> None:
        self._append("chat_eval.jsonl", {"step": step, "answers": answers})
        if self.writer:
            self.writer.add_text("chat_eval", "\n\n".join(f"**{a['prompt']}** {a['answer']}" for a in answers), step)

    def sync(self) -> None:
        """Push TensorBoard's local files to storage (at checkpoints and at the end)."""
        if self.writer:
            self.writer.flush()
            if self._tb_local is not None:
                self.run.join("tensorboard").upload(Path(self._tb_local.name))

    def close(self) -> None:
        self.sync()
        if self.writer:
            self.writer.close()
        if self._tb_local is not None:
            self._tb_local.cleanup()


def record_attempt(run: Location, start_step: int, world: int) -> None:
    """Every rank's node IP, gathered to rank 0 and appended to <run>/attempts.jsonl: where this worker
    group ran and the step it started from (0, or the checkpoint it resumed)."""
    import ray.util

    ip = ray.util.get_node_ip_address()
    ips = [None] * world
    if world > 1:
        dist.all_gather_object(ips, ip)
    else:
        ips = [ip]
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    target = run.join("attempts.jsonl")
    before = target.read_text() if target.is_file() else ""
    target.write_text(before + json.dumps({"start_step": start_step, "node_ips": ips, "time": time.time()}) + "\n")


@dataclass
class StepFigures:
    """One optimizer step's figures on one worker, summed over the workers by `reduced`."""

    loss: float = 0.0  # mean over the step's micro-batches
    tokens: float = 0.0  # padding not counted; the loop reports those since the last logged step
    kl: float = 0.0  # distillation KL, mean over the micro-batches that had distillation tokens
    kl_workers: float = 0.0  # workers whose step had any (so the mean is over those)
    margin: float = 0.0  # the greedy-margin hinge, likewise
    margin_workers: float = 0.0
    # objective dpo: the implicit rewards of the preferred and non-preferred answers, their margin, and the
    # share of pairs whose preferred answer has the higher reward; means over the micro-batches
    reward_chosen: float = 0.0
    reward_rejected: float = 0.0
    reward_margin: float = 0.0
    reward_accuracy: float = 0.0
    pair_workers: float = 0.0
    # objective grpo: the sampled answers' mean reward and its spread within a group, their length, the share
    # of answer tokens whose ratio to the sampling policy was clipped, and the KL to the base (grpo.beta)
    reward: float = 0.0
    reward_std: float = 0.0
    answer_tokens: float = 0.0
    clip_fraction: float = 0.0
    policy_kl: float = 0.0
    reward_errors: float = 0.0  # reward calls that raised or returned no finite number (scored 0); a sum
    rollout_s: float = 0.0  # where a step's time goes: sampling (the engine), scoring + training, the sync
    train_s: float = 0.0
    sync_s: float = 0.0
    rollout_workers: float = 0.0

    def reduced(self, world: int, device: torch.device) -> "StepFigures":
        if world == 1:
            return self
        packed = torch.tensor(list(astuple(self)), device=device)
        dist.all_reduce(packed)
        return StepFigures(*packed.tolist())

    def logged(self, world: int, window_s: float) -> dict:
        values = {"loss": round(self.loss / world, 5), "tokens_per_s": round(self.tokens / window_s, 1)}
        if self.kl_workers:  # distillation: KL(base || tuned), averaged over the workers that had any
            values["distill_kl"] = round(self.kl / self.kl_workers, 5)
        if self.margin_workers:
            values["distill_margin"] = round(self.margin / self.margin_workers, 5)
        if self.pair_workers:
            for name in PAIR_FIGURES:
                values[name] = round(getattr(self, name) / self.pair_workers, 5)
        if self.rollout_workers:
            for name in ROLLOUT_FIGURES:
                values[name] = round(getattr(self, name) / self.rollout_workers, 5)
            values["reward_errors"] = int(self.reward_errors)
        return values


PAIR_FIGURES = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")
ROLLOUT_FIGURES = ("reward", "reward_std", "answer_tokens", "clip_fraction", "policy_kl", "rollout_s", "train_s",
                   "sync_s")


def _mean(values: list[torch.Tensor]) -> float:
    return torch.stack(values).mean().item() if values else 0.0


def _set_up_worker(cfg: FinetuneConfig, context) -> torch.device:
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = cfg.train.threads_on_this_node(context.get_local_world_size())
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    return device


def _load_model(cfg: FinetuneConfig, plan: TrainPlan, device: torch.device):
    from transformers import AutoTokenizer

    from cluster.model_cache import resolve_model_path
    from jobs.finetune.model import build_model

    model_path = resolve_model_path(plan.model)  # this node's copy: nodes share no disk
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = build_model(cfg, model_path, plan.dtype, device)
    if plan.input_bases:  # lora.input_share: each lora_A reads its input through the run's bases
        from jobs.finetune.subspace import read_bases, restrict

        restricted = restrict(model, read_bases(plan.input_bases))
        log.info("lora_A of %d modules restricted to the run's input bases", restricted)
    model.train()
    return model, tokenizer


def _resume(strategy) -> int:
    """The step of the latest checkpoint Ray Train reported (weights, optimizer and scheduler restored), or 0."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as folder:
        strategy.load(Path(folder))
        step = json.loads((Path(folder) / "progress.json").read_text())["step"]
    log.info("resumed from step %d", step)
    return step


def _train_step(cfg: FinetuneConfig, strategy, rows: list[Example], pad_id: int, width: int | None,
                device: torch.device, hinge_on: bool) -> tuple[StepFigures, float]:
    """One optimizer step over `rows` (grad_accum micro-batches of micro_batch_size rows): this worker's
    figures and the gradient norm."""
    micro = cfg.train.micro_batch_size
    losses, kls, margins, tokens = [], [], [], 0
    pairs: dict[str, list[torch.Tensor]] = {name: [] for name in PAIR_FIGURES}
    for i in range(cfg.train.grad_accum):
        chunk = rows[i * micro:(i + 1) * micro]
        tokens += sum(len(row.input_ids) for row in chunk)  # padding not counted
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id, width=width, multiple=64).items()}
        loss, parts = strategy.forward(batch, hinge_on=hinge_on)
        strategy.backward(loss, last_micro_step=i == cfg.train.grad_accum - 1)
        losses.append(loss.detach())
        if "kl" in parts:
            kls.append(parts["kl"])
        if "margin" in parts:  # only micro-batches with tokens the hinge is on
            margins.append(parts["margin"])
        for name in PAIR_FIGURES:
            if name in parts:
                pairs[name].append(parts[name])
    grad_norm = strategy.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so that tokens/s counts this step's GPU work, not a later one's
    figures = StepFigures(loss=_mean(losses), tokens=float(tokens), kl=_mean(kls), kl_workers=float(bool(kls)),
                          margin=_mean(margins), margin_workers=float(bool(margins)),
                          pair_workers=float(bool(pairs["reward_margin"])),
                          **{name: _mean(values) for name, values in pairs.items()})
    return figures, grad_norm


def train_loop(loop_config: dict) -> None:
    import ray
    import ray.train

    from jobs.finetune.strategies import build_strategy

    cfg = FinetuneConfig.model_validate(loop_config["cfg"])
    plan = TrainPlan(**loop_config["plan"])
    rows: list = ray.get(loop_config["rows"])  # Examples; for grpo, the prompts
    engine = loop_config.get("engine")  # grpo: the rollout engine actor
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _set_up_worker(cfg, context)
    model, tokenizer = _load_model(cfg, plan, device)
    total_steps, steps_per_epoch = plan.total_steps, plan.steps_per_epoch
    strategy = build_strategy(cfg, model, device, total_steps)
    start_step = _resume(strategy)
    run = locate(plan.run_uri)
    record_attempt(run, start_step, world)
    if engine is not None and start_step:  # a resumed run: the engine samples from the restored policy
        _publish_policy(strategy, tokenizer, engine, start_step, run, rank)
    sink = MetricsSink(run, cfg.monitor.tensorboard, start_step) if rank == 0 else None
    worker_rows_per_step = cfg.train.grad_accum * cfg.train.micro_batch_size  # config.rows_per_step: all workers
    pad_id = padding_id(tokenizer)
    width = cfg.data.max_length if cfg.data.packing and device.type == "cuda" else None  # static shapes on GPU
    progress = None
    if rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="fine-tune", unit="step", mininterval=2)
    hinge = cfg.loss.margin_hinge
    hinge_from = int(hinge.start * total_steps) if hinge else 0  # a step count, so a resumed run agrees
    window_tokens, window_s = 0.0, 0.0  # tokens/s over compute time only (not evaluation or checkpoints)
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        mine = worker_rows(rows, epoch, cfg.data.shuffle_seed, rank, world, steps_per_epoch * worker_rows_per_step)
        for step_in_epoch in range(offset, min(steps_per_epoch, offset + total_steps - step)):
            started = time.perf_counter()
            first = step_in_epoch * worker_rows_per_step
            step_rows = mine[first:first + worker_rows_per_step]
            if engine is not None:
                from jobs.finetune.rollout import rollout_step

                rolled, grad_norm = rollout_step(cfg, strategy, engine, step_rows, pad_id, device, step)
                synced = time.perf_counter()
                _publish_policy(strategy, tokenizer, engine, step + 1, run, rank)
                own = StepFigures(**rolled, sync_s=time.perf_counter() - synced)
            else:
                own, grad_norm = _train_step(cfg, strategy, step_rows, pad_id, width, device, hinge_on=step >= hinge_from)
            step += 1
            window_tokens += own.tokens  # this worker's step
            window_s += time.perf_counter() - started
            figures = replace(own, tokens=window_tokens).reduced(world, device)
            if rank == 0:
                progress.update(1)
            if step % cfg.monitor.log_every == 0 or step == total_steps:
                values = {**figures.logged(world, window_s), "lr": strategy.lr(), "grad_norm": round(grad_norm, 4),
                          "epoch": round(step / steps_per_epoch, 3)}
                if device.type == "cuda":
                    values["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                if rank == 0:
                    sink.log(step, values)
                    progress.set_postfix(loss=values["loss"], tok_s=values["tokens_per_s"])
                window_tokens, window_s = 0.0, 0.0
            if cfg.monitor.eval_every and (step % cfg.monitor.eval_every == 0 or step == total_steps):
                _chat_eval_step(cfg, strategy, tokenizer, device, step, sink)
            if step % cfg.checkpoint.every_steps == 0 or step == total_steps:
                if rank == 0:
                    sink.sync()
                report_checkpoint(strategy, step, {"loss": figures.loss / world}, rank, tokenizer,
                                  final=step == total_steps)
    if rank == 0:
        progress.close()
        sink.close()


def _publish_policy(strategy, tokenizer, engine, step: int, run: Location, rank: int) -> None:
    """grpo: the policy after `step` steps onto the rollout engine, before any rank samples again."""
    from jobs.finetune.rollout import publish_policy

    publish_policy(strategy, tokenizer, engine, step, run, rank)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _chat_eval_step(cfg: FinetuneConfig, strategy, tokenizer, device: torch.device, step: int,
                    sink: MetricsSink | None) -> None:
    """The sample prompts' greedy answers at this step (every rank generates; rank 0 keeps them)."""
    with strategy.generation():
        answers = chat_eval(strategy.base, tokenizer, cfg.monitor.eval_prompts, cfg.monitor.eval_max_tokens, device)
    if sink is not None:
        sink.log_chat(step, answers)
        for a in answers:
            log.info("chat eval step %d | %s -> %s", step, a["prompt"], a["answer"])


def report_checkpoint(strategy, step: int, metrics: dict, rank: int, tokenizer, final: bool) -> None:
    """Every rank writes its part into a local folder and reports it; Ray Train merges the folders into
    one checkpoint under the run's storage and keeps the last `checkpoint.keep`."""
    import ray.train

    from jobs.export.hf import save_hf

    with tempfile.TemporaryDirectory(prefix="tuneserve-ckpt-") as tmp:
        folder = Path(tmp)
        strategy.save(folder)
        weights = strategy.full_state_dict()  # collective for sharded strategies
        if rank == 0:
            save_hf(strategy.cfg, strategy.base, weights, tokenizer, folder / "hf")
            (folder / "progress.json").write_text(json.dumps({"step": step, "final": final}))
        has_files = any(folder.iterdir())
        ray.train.report({"step": step, **metrics},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
