"""How the model is distributed: DDP, DeepSpeed ZeRO-2/3 or FSDP2.

The training loop is the same for all; a strategy differs only where it must: wrapping the model,
backward/step (with gradient accumulation), and saving/loading state. `full_state_dict` gathers the
trainable weights (or the whole model) on rank 0 for the Hugging Face export.
"""

from __future__ import annotations

import contextlib
import math
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from jobs.finetune.config import FinetuneConfig
from jobs.finetune.losses import (
    DISTILL_KEYS,
    grpo_loss,
    lm_loss,
    loss_positions,
    pair_logps,
    preference_loss,
    token_logps,
)


def lr_lambda(cfg: FinetuneConfig, total_steps: int):
    warmup = math.ceil(cfg.optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.optim.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def half_dtype(model: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def load_state(path: Path, device=None) -> dict:
    """Training state saved by `save`: tensors, numbers, strings and containers only. The checkpoint comes
    from shared storage, so it is read with torch's weights-only unpickler: a crafted pickle there is
    refused, never run on the training nodes."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RuntimeError(f"{path}: refused, it holds more than training state (weights-only load: "
                           f"{str(exc).splitlines()[0][:300]})") from None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class Strategy:
    """DDP (also plain single-worker training)."""

    name = "ddp"

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module, device: torch.device, total_steps: int):
        self.cfg = cfg
        self.device = device
        self.half_dtype = half_dtype(model)
        self.base = model  # the unwrapped (peft or HF) model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.model = self._wrap(model)

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if _world() == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def forward(self, batch: dict, hinge_on: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and its parts (detached: `ce`, and with distillation `kl`, and `margin` where
        the greedy-margin hinge is on and had tokens; for preference pairs the rewards). Every strategy shares
        this forward."""
        if "pair_side" in batch:
            return self._preference_forward(batch)
        if "advantages" in batch:
            return self._rollout_forward(batch)
        distill = {key: batch.pop(key) for key in DISTILL_KEYS if key in batch}
        with self.autocast():
            labels = batch.pop("labels")
            positions = loss_positions(labels, distill)
            logits = self.model(**batch, use_cache=False, logits_to_keep=positions).logits
            hinge = self.cfg.loss.margin_hinge
            return lm_loss(logits, labels, distill, self.cfg.loss.distill_weight, positions,
                           margin=hinge.nats if hinge else 0.0,
                           margin_weight=hinge.weight if hinge and hinge_on else 0.0)

    def _preference_forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """objective dpo: each row one pair. The reference's log-probabilities come first, from the same
        weights with the adapter disabled and no graph; then the policy's, with one."""
        dpo = self.cfg.dpo
        pair_side, labels = batch.pop("pair_side"), batch.pop("labels")
        positions = loss_positions(labels, None)
        reference = None
        with self.autocast():
            if dpo.loss_type != "simpo":
                with torch.no_grad(), self.base.disable_adapter():
                    logits = self.model(**batch, use_cache=False, logits_to_keep=positions).logits
                    reference = pair_logps(logits, labels, positions, pair_side)
            logits = self.model(**batch, use_cache=False, logits_to_keep=positions).logits
            policy = pair_logps(logits, labels, positions, pair_side)
        return preference_loss(policy, reference, dpo.loss_type, dpo.beta, dpo.label_smoothing, dpo.simpo_gamma)

    def _rollout_forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """objective grpo: each row one sampled answer. With grpo.beta, the reference's log-probabilities
        first (the adapter disabled, no graph), then the policy's."""
        grpo = self.cfg.grpo
        old_logps, advantages, labels = batch.pop("old_logps"), batch.pop("advantages"), batch.pop("labels")
        positions = loss_positions(labels, None)
        reference = None
        with self.autocast():
            if grpo.beta > 0:
                with torch.no_grad(), self.base.disable_adapter():
                    logits = self.model(**batch, use_cache=False, logits_to_keep=positions).logits
                    reference = token_logps(logits, labels, positions)
            logits = self.model(**batch, use_cache=False, logits_to_keep=positions).logits
        return grpo_loss(logits, labels, positions, old_logps, advantages, reference, grpo.clip_range, grpo.beta)

    def autocast(self):
        """bf16/fp16 matmuls on GPUs for fp32 adapters over a half-precision base; nothing on CPU (fp32)."""
        if self.device.type != "cuda" or self.half_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.half_dtype)

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        scaled = loss / self.cfg.train.grad_accum
        if last_micro_step or _world() == 1:
            scaled.backward()
        else:
            with self.model.no_sync():  # all-reduce once per optimizer step
                scaled.backward()

    def step(self) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def generation(self):
        """Context for `generate()` on `self.base` (all ranks): nothing to do unless weights are sharded."""
        return contextlib.nullcontext()

    # -- state ---------------------------------------------------------------------------------------

    def trainable_state(self) -> dict:
        return {n: p.detach().cpu() for n, p in self.base.named_parameters() if p.requires_grad}

    def save(self, folder: Path) -> None:
        """Rank 0 writes trainable weights + optimizer + scheduler (DDP replicas are identical)."""
        if _rank() == 0:
            torch.save({"trainable": self.trainable_state(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / "train_state.pt")

    def load(self, folder: Path) -> None:
        state = load_state(folder / "train_state.pt", self.device)
        missing = self.base.load_state_dict(state["trainable"], strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"checkpoint has unknown weights: {missing.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict | None:
        """Trainable weights (adapters) or, for full fine-tuning, every weight; on rank 0, else None."""
        if _rank() != 0:
            return None
        if self.cfg.model.method == "full":
            return {k: v.detach().cpu() for k, v in self.base.state_dict().items()}
        from jobs.finetune.subspace import effective_state

        return effective_state(self.base, self.trainable_state())  # lora.input_share: lora_A as it acts


class DeepSpeedStrategy(Strategy):
    """ZeRO-2 or ZeRO-3, optionally offloading to CPU. With `deepspeed_optimizer: torch` the optimizer is
    torch's AdamW, so DeepSpeed compiles no ops (its fused CPU Adam takes minutes to build once)."""

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module, device: torch.device, total_steps: int):
        import deepspeed

        self.cfg = cfg
        self.device = device
        self.half_dtype = half_dtype(model)
        self.base = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        stage = 3 if cfg.strategy.name == "zero3" else 2
        zero: dict = {"stage": stage}
        if cfg.strategy.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        if stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "gradient_clipping": cfg.optim.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        optimizer = None
        o = cfg.optim
        if cfg.strategy.deepspeed_optimizer == "torch":
            optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        else:
            ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas),
                                                                  "weight_decay": o.weight_decay}}
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps)))
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=self.params, optimizer=optimizer, lr_scheduler=scheduler,
            config=ds_config)

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        self.model.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
        self.model.step()  # an optimizer step only at the accumulation boundary

    def step(self) -> float:
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load(self, folder: Path) -> None:
        path, _ = self.model.load_checkpoint(str(folder / "deepspeed"), tag="state")
        if path is None:
            raise RuntimeError(f"no DeepSpeed state under {folder}")

    def full_state_dict(self) -> dict | None:
        if self.cfg.strategy.name == "zero3":
            state = self.model._zero3_consolidated_16bit_state_dict()  # collective; full dict on rank 0
        else:
            state = {k: v.detach().cpu() for k, v in self.base.state_dict().items()} if _rank() == 0 else None
        if state is None or _rank() != 0:
            return None
        if self.cfg.model.method == "full":
            return {k: v.cpu() for k, v in state.items()}
        trainable = {n for n, p in self.base.named_parameters() if p.requires_grad}
        return {k: v.cpu() for k, v in state.items() if k in trainable}


class FSDP2Strategy(Strategy):
    """FSDP2 (`fully_shard` per decoder layer, then the root); state through torch.distributed.checkpoint."""

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        # FSDP2 shards each module's parameters as one group of a single dtype: adapters take the base's.
        frozen = next((p.dtype for p in model.parameters() if not p.requires_grad), None)
        for param in model.parameters():
            if frozen is not None and param.dtype != frozen:
                param.data = param.data.to(frozen)
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(model)
        return model

    def __init__(self, cfg: FinetuneConfig, model: torch.nn.Module, device: torch.device, total_steps: int):
        self.cfg = cfg
        self.device = device
        self.half_dtype = half_dtype(model)
        self.base = self.model = self._wrap(model)  # shard first: the optimizer must see the DTensors
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))

    @contextlib.contextmanager
    def generation(self):
        """`generate()` enters the wrapped model below the root (peft calls the inner model), so the root's
        own shard (embeddings, head, final norm) is gathered by hand; layers gather in their own hooks."""
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()

    def backward(self, loss: torch.Tensor, last_micro_step: bool) -> None:
        self.model.set_requires_gradient_sync(last_micro_step)
        (loss / self.cfg.train.grad_accum).backward()

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=str(folder / "dcp"))
        if _rank() == 0:
            torch.save({"scheduler": self.scheduler.state_dict()}, folder / "scheduler.pt")

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(load_state(folder / "scheduler.pt")["scheduler"])

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if _rank() != 0:
            return None
        if self.cfg.model.method == "full":
            return state
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in trainable}


STRATEGIES = {"ddp": Strategy, "zero2": DeepSpeedStrategy, "zero3": DeepSpeedStrategy, "fsdp2": FSDP2Strategy}


def build_strategy(cfg: FinetuneConfig, model: torch.nn.Module, device: torch.device, total_steps: int) -> Strategy:
    return STRATEGIES[cfg.strategy.name](cfg, model, device, total_steps)
