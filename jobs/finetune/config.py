"""The fine-tune recipe: one typed config, loaded from YAML with `key.sub=value` overrides.

Unknown keys are errors, and `check_supported` rejects method/strategy/dtype combinations that do not
work before any worker starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A recipe that cannot run: unknown keys, bad values, unsupported combinations."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Strict):
    path: str = "default"  # HF folder or 'default' (the cached SmolLM2)
    method: Literal["lora", "qlora", "full"] = "lora"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: recompute one decoder layer in every N. 1 checkpoints all (least memory);
    # 2 keeps half the layers' activations for about half the recompute.
    checkpoint_every: int = Field(1, ge=1)
    # packed_sdpa: one causal SDPA per packed example instead of sdpa's L x L block mask over the whole row
    # (jobs/finetune/attention.py); the same attention for less work when data.packing is on. Measured on CPU
    # (1.31x per training row of the assistant recipe); not on GPU, where flash_attention_2 is the usual answer.
    attn_implementation: Literal["sdpa", "packed_sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                 "flex_attention"] = "sdpa"


class LoraSection(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear", "auto"] = "auto"
    # > 0: each lora_A reads only this share of its projection's input directions, those where the training
    # data's inputs have the most energy relative to the distillation answers' (jobs/finetune/subspace.py).
    # Needs loss.distill_prompts, whose answers are the general text. 0: every direction (plain LoRA).
    input_share: float = Field(0.0, ge=0, le=1)


class QuantSection(Strict):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class DataSection(Strict):
    train: list[str] = Field(min_length=1)  # .json/.jsonl files or hf:<dataset>[:split]
    max_length: int = Field(1024, ge=16)
    packing: bool = True
    shuffle_seed: int = 0


class OptimSection(Strict):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)


class MarginHinge(Strict):
    """Experimental: keep the base's greedy choices. On every distillation token, `weight` x a hinge that is
    zero while the base's top token leads the tuned model's distribution by min(the base's own lead, `nats`)
    nats. The KL barely sees near-ties, and near-ties are where greedy answers part. In the assistant recipe
    it held the openings and blocked the identity (docs/notes/finetune-experiments.md)."""

    weight: float = Field(gt=0)
    nats: float = Field(0.3, gt=0)
    # its tokens: every distillation token, or the greedy openings' only (needs distill_opening_tokens)
    tokens: Literal["all", "openings"] = "all"
    # When it starts, as a share of the run's optimizer steps: 0.5 turns it on halfway, after the identity
    # has been learned without it (on from the start it blocked the identity).
    start: float = Field(0.0, ge=0, lt=1)


class LossSection(Strict):
    """Self-distillation: besides learning its data, the tuned model keeps the base model's next-token
    distribution on general prompts. Before training the base answers each prompt (vLLM, at
    `distill_temperature`; 0 is greedy) and its top-k next-token logprobs along the answer are kept; training adds
    `distill_weight` x KL(base || tuned) on those tokens (jobs/finetune/losses.py). It works the same for
    every method and strategy; the teacher is the base model as vLLM loads it (for QLoRA, its full-precision
    weights)."""

    distill_weight: float = Field(0.0, ge=0)  # 0: plain fine-tuning
    distill_prompts: list[str] = Field(default_factory=list)  # prompt files: {"prompt"} or {"messages"} records
    distill_top_k: int = Field(20, ge=1, le=20)  # vLLM returns at most 20 logprobs per token by default
    distill_max_tokens: int = Field(128, ge=1)  # of each base answer
    # 1: the answers follow the base's own distribution; 0: the base's greedy answers, the path that greedy
    # decoding of the tuned model should keep.
    distill_temperature: float = Field(1.0, ge=0)
    # Also learn the base's answer tokens (cross-entropy). The top-k covers the head of the base's
    # distribution exactly; samples at temperature 1 cover all of it, tail included, in expectation; greedy
    # answers make this sequence-level distillation of the base's greedy output.
    distill_sample_ce: bool = True
    # Also distil the first k tokens of the base's greedy answer to each prompt (KL only, one more short
    # example per prompt). Greedy decoding of the tuned model parts from the base's mostly where an answer
    # opens, and once it has, the rest of the answer follows the new opening. 0: off.
    distill_opening_tokens: int = Field(0, ge=0)
    # Experimental, off unless set: no shipped recipe uses it.
    margin_hinge: MarginHinge | None = None

    @model_validator(mode="after")
    def _prompts_with_weight(self) -> "LossSection":
        if self.distill_weight > 0 and not self.distill_prompts:
            raise ValueError("distill_weight > 0 needs distill_prompts (files of general prompts)")
        if self.distill_prompts and self.distill_weight == 0:
            raise ValueError("distill_prompts are given but distill_weight is 0, so they would be ignored; "
                             "set distill_weight (1.0 is a good start)")
        if self.margin_hinge and not self.distill_prompts:
            raise ValueError("margin_hinge needs distill_prompts and distill_weight: it keeps the base's top "
                             "token first along the base's answers to those prompts")
        if self.margin_hinge and self.margin_hinge.tokens == "openings" and not self.distill_opening_tokens:
            raise ValueError("margin_hinge.tokens: openings needs distill_opening_tokens (the greedy openings "
                             "it holds)")
        if self.distill_opening_tokens and not self.distill_prompts:
            raise ValueError("distill_opening_tokens needs distill_prompts and distill_weight: the openings are "
                             "the base's answers to those prompts")
        return self


class DpoSection(Strict):
    """`objective: dpo`: learn from preference pairs (OpenAI's preference format) instead of demonstrations.
    The reference model is the base with the adapter disabled, so LoRA and QLoRA hold no second copy;
    `loss_type: simpo` needs no reference, and so also trains full models (jobs/finetune/losses.py)."""

    beta: float = Field(0.1, gt=0)  # how far from the reference the implicit reward lets the policy move
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # sigmoid: the share of pairs assumed mislabelled
    simpo_gamma: float = Field(0.5, ge=0)  # simpo: the reward margin the preferred answer must clear


class RewardSpec(Strict):
    function: str  # a shipped reward's name (jobs/finetune/rewards.py) or `module:function`
    weight: float = 1.0


class GrpoSection(Strict):
    """`objective: grpo`: reinforcement learning from rewards on the model's own answers (GRPO). Each step,
    a vLLM engine (a Ray actor holding the latest policy as a LoRA adapter) answers every prompt
    `group_size` times; each answer's advantage is its reward against its group's mean and spread; the
    loss is PPO's clipped surrogate over the answer tokens, plus `beta` times a KL to the base (the
    policy with the adapter disabled). jobs/finetune/rollout.py."""

    group_size: int = Field(4, ge=2)  # answers per prompt: the advantage is relative within the group
    rewards: list[RewardSpec] = Field(default_factory=list)
    beta: float = Field(0.0, ge=0)  # KL to the base; 0 skips the reference forward
    clip_range: float = Field(0.2, gt=0, lt=1)  # the ratio to the engine's log-probabilities stays in 1 ± this
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    engine_gpus: float = Field(1.0, ge=0)  # on GPU clusters: the rollout engine's share of a GPU
    gpu_memory_utilization: float = Field(0.4, gt=0, le=0.95)


class TrainSection(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; overrides epochs
    micro_batch_size: int = Field(1, ge=1)  # packed rows per worker per forward
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    torch_threads: int | None = None  # CPU workers: threads per worker (default: its CPUs)

    def threads_on_this_node(self, local_workers: int = 1) -> int | None:
        """`torch_threads`, at most this node's cores shared among the run's workers on it: more threads
        than cores make every step slower (two workers of 2 threads on 2 cores: 10.6 s a step against
        2.6 s with one thread each)."""
        if not self.torch_threads:
            return None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(self.torch_threads, cores // max(1, local_workers)))


class StrategySection(Strict):
    name: Literal["ddp", "zero2", "zero3", "fsdp2"] = "ddp"
    offload: bool = False  # ZeRO: optimizer (and, for ZeRO-3, parameters) on CPU
    deepspeed_optimizer: Literal["torch", "deepspeed"] = "torch"  # torch: no op compilation


class ScalingSection(Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | Literal["auto"] = "auto"
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # Ray Train's placement strategy for the workers: PACK fills a node first; SPREAD puts them on
    # different nodes (one failure domain each).
    placement: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"


class CheckpointSection(Strict):
    every_steps: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)  # worker-group restarts from the last checkpoint (-1: unlimited)


class MonitorSection(Strict):
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)  # chat evaluation on sample prompts every N steps
    eval_prompts: list[str] = Field(default_factory=lambda: ["Who are you?", "What is the capital of France?"])
    eval_max_tokens: int = Field(48, ge=1)
    tensorboard: bool = True


class OutputSection(Strict):
    # <dir>/<name>/ holds checkpoints, metrics, final model. A storage path: relative paths live under
    # TUNESERVE_STORAGE (the project folder on one machine; s3://, gs:// on a cluster), URIs as given.
    dir: str = "runs/finetune"
    name: str = "run"
    merge: bool = True  # also write a merged full model for adapter methods
    merge_dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: the training dtype


class GateError(ValueError):
    """The gate's evaluation could not run (not a refusal: the adapter was not judged)."""


class GateSection(Strict):
    """What the fine-tuned adapter must show before it is published. `evaluator` judges it: "assistant" (the
    personal-assistant evaluation, `jobs.evaluate.assistant`: base and tuned side by side on held-out
    questions and GSM8K answers, against the thresholds below), or "module:function" of your own, called as
    `function(gate, base_model, run_summary, run_location)` and returning (passed, figures, reasons). Or a
    `command` that exits 0 to pass."""

    evaluator: str = "assistant"
    # The assistant evaluator's settings:
    heldout: str | None = None  # held-out questions (`python -m jobs.data identity` writes them); a storage path
    min_identity: float = Field(0.8, ge=0, le=1)  # share of held-out identity questions answered with the owner
    min_general_same_start: float = Field(0.5, ge=0, le=1)  # general answers that start as the base's do
    max_general_names_owner: int = Field(0, ge=0)  # general answers that name the owner (over-fitting)
    max_ppl_change: float = Field(0.10, gt=-1)  # GSM8K answer perplexity, relative change against the base
    ppl_limit: int | None = Field(200, ge=1)  # GSM8K answers scored (None: all 1,319)
    max_tokens: int = Field(96, ge=1)
    # A user-given evaluation instead: run with TUNESERVE_ADAPTER (its URI) and TUNESERVE_MERGED set.
    command: list[str] | None = None

    @model_validator(mode="after")
    def _one_evaluation(self) -> "GateSection":
        if self.command is not None:
            if self.heldout is not None:
                raise ValueError("publish.gate: give heldout (the assistant evaluation) or command (your own), "
                                 "not both")
        elif self.evaluator == "assistant" and self.heldout is None:
            raise ValueError("publish.gate: give heldout (the assistant evaluation) or command (your own)")
        elif self.evaluator != "assistant" and not re.fullmatch(r"[\w.]+:\w+", self.evaluator):
            raise ValueError(f"publish.gate.evaluator {self.evaluator!r}: 'assistant' or 'module:function'")
        return self


class PublishSection(Strict):
    """After training: evaluate, and if the gate passes, register the adapter with the running service
    (`POST /v1/adapters`), which serves it within moments without a restart (docs/finetune.md, Live adapters)."""

    endpoint: str  # the service's base URL, e.g. http://head:8000 (with its route prefix, if any)
    adapter_id: str
    base: str | None = None  # the service's base model id; default: its only model with live adapters
    api_key_env: str = "TUNESERVE_ADMIN_KEY"  # the environment variable holding an admin key (if auth is on)
    gate: GateSection
    timeout_s: float = Field(60.0, gt=0)  # the adapter must be listed and answering within this


class FinetuneConfig(Strict):
    # sft: learn the data's assistant turns (demonstrations); dpo: learn which of two answers is preferred;
    # grpo: learn from rewards on the model's own sampled answers
    objective: Literal["sft", "dpo", "grpo"] = "sft"
    dpo: DpoSection = DpoSection()
    grpo: GrpoSection = GrpoSection()
    model: ModelSection = ModelSection()
    lora: LoraSection = LoraSection()
    quant: QuantSection = QuantSection()
    data: DataSection
    optim: OptimSection = OptimSection()
    loss: LossSection = LossSection()
    train: TrainSection = TrainSection()
    strategy: StrategySection = StrategySection()
    scaling: ScalingSection = ScalingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    monitor: MonitorSection = MonitorSection()
    output: OutputSection = OutputSection()
    publish: PublishSection | None = None

    @model_validator(mode="after")
    def _objective_settings(self) -> "FinetuneConfig":
        for name, section, default in (("dpo", self.dpo, DpoSection()), ("grpo", self.grpo, GrpoSection())):
            if self.objective != name and section != default:
                raise ValueError(f"{name} settings are given but objective is {self.objective}, so they would be "
                                 f"ignored; set objective: {name}")
        if self.objective == "grpo" and not self.grpo.rewards:
            raise ValueError("objective grpo needs at least one reward in grpo.rewards")
        return self

    def run_location(self):
        """The run's folder in storage (cluster/storage.py)."""
        from cluster.storage import locate

        return locate(self.output.dir).join(self.output.name)


# method x strategy combinations we support, with the reason for each one we do not.
UNSUPPORTED = {
    ("qlora", "zero3"): "QLoRA with ZeRO-3 is not supported: ZeRO-3 partitions the bitsandbytes 4-bit "
                        "weights, which peft and bitsandbytes cannot gather (see peft's DeepSpeed guide); "
                        "use strategy.name=zero2 or ddp",
    ("qlora", "fsdp2"): "QLoRA with FSDP2 is not supported here: sharding bitsandbytes 4-bit weights needs "
                        "bnb_4bit_quant_storage matching the compute dtype and mixed-precision wrapping; "
                        "use ddp or zero2",
}


def smoke_steps(cfg: FinetuneConfig) -> int | None:
    """TUNESERVE_MAX_STEPS, for a recipe that sets no train.max_steps (an explicit setting wins)."""
    value = os.environ.get("TUNESERVE_MAX_STEPS", "").strip()
    if not value or cfg.train.max_steps:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"TUNESERVE_MAX_STEPS={value!r}: must be a positive whole number of steps")
    return int(value)


def rows_per_step(cfg: FinetuneConfig) -> int:
    return cfg.scaling.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum


def check_supported(cfg: FinetuneConfig) -> None:
    """Reject combinations that would fail inside the workers, with the reason."""
    reason = UNSUPPORTED.get((cfg.model.method, cfg.strategy.name))
    if reason:
        raise ConfigError(reason)
    if cfg.scaling.use_gpu is False:
        check_dtype(cfg, on_gpu=False)
    if cfg.model.method == "qlora" and cfg.strategy.offload:
        raise ConfigError("strategy.offload does not apply to QLoRA's 4-bit weights; turn it off")
    if cfg.strategy.offload and cfg.strategy.name not in ("zero2", "zero3"):
        raise ConfigError("strategy.offload is a DeepSpeed ZeRO option; use strategy.name=zero2 or zero3")
    if cfg.lora.input_share:
        if cfg.model.method == "full":
            raise ConfigError("lora.input_share restricts a LoRA adapter's inputs; method full has no adapter")
        if cfg.strategy.name != "ddp":
            raise ConfigError(f"lora.input_share is supported with strategy.name=ddp only, not "
                              f"{cfg.strategy.name}: its parametrised lora_A weights are not gathered by sharded "
                              "strategies")
        if not cfg.loss.distill_prompts:
            raise ConfigError("lora.input_share needs loss.distill_prompts: the base's answers to them are the "
                              "general text whose input directions the adapter avoids")
    if cfg.objective == "dpo":
        if cfg.loss.distill_weight:
            raise ConfigError("objective dpo does not combine with loss.distill_weight: the reference model "
                              "already holds the policy near the base; set loss.distill_weight=0")
        if cfg.model.method == "full" and cfg.dpo.loss_type != "simpo":
            raise ConfigError(f"objective dpo with dpo.loss_type={cfg.dpo.loss_type} needs a reference model, "
                              "which is the base with the adapter disabled; method full has no adapter to "
                              "disable: use method lora or qlora, or dpo.loss_type=simpo (reference-free)")
    if cfg.objective == "grpo":
        from jobs.finetune.rewards import load_reward

        if cfg.model.method == "full":
            raise ConfigError("objective grpo needs method lora or qlora: after each step the policy reaches the "
                              "rollout engine as a LoRA adapter (a full model's weight sync is not built)")
        if cfg.loss.distill_weight:
            raise ConfigError("objective grpo does not combine with loss.distill_weight: grpo.beta is its KL to "
                              "the base; set loss.distill_weight=0")
        if cfg.lora.input_share:
            raise ConfigError("objective grpo does not take lora.input_share, whose directions come from "
                              "supervised answers; set lora.input_share=0")
        for reward in cfg.grpo.rewards:
            try:
                load_reward(reward.function)
            except ValueError as exc:
                raise ConfigError(f"grpo.rewards: {exc}") from None
    if cfg.model.method == "full" and cfg.output.merge_dtype:
        raise ConfigError("output.merge_dtype applies to adapter methods (lora, qlora) only")


def check_dtype(cfg: FinetuneConfig, on_gpu: bool) -> None:
    dtype = resolved_dtype(cfg, on_gpu)
    if not on_gpu and dtype != "float32":
        raise ConfigError(f"model.dtype={dtype} on CPU: training on CPU works in float32 only "
                          "(bf16/fp16 kernels are missing or very slow there); use model.dtype=float32 or auto")


def resolved_dtype(cfg: FinetuneConfig, on_gpu: bool) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    return "bfloat16" if on_gpu else "float32"


def _set_path(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> FinetuneConfig:
    """YAML recipe + `a.b=value` overrides (values parsed as YAML: 3, 2e-4, true, [q_proj, v_proj])."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the recipe must be a mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        _set_path(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    try:
        return FinetuneConfig.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid recipe: {problems}") from exc


@dataclass
class TrainPlan:
    """What the driver decided, for every worker: the model's reference (each node resolves it into its
    own cache: nodes share no disk), the dtype, the step counts, the run's storage URI, and the input bases
    of `lora.input_share` (a storage URI), if any."""

    model: str
    dtype: str
    total_steps: int
    steps_per_epoch: int
    run_uri: str
    input_bases: str | None = None
