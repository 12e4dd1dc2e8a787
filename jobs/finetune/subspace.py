"""The directions each adapter reads (`lora.input_share`; docs/notes/finetune-experiments.md has the measurements).

An adapter changes a projection's output for every input that has a component along its `lora_A` rows. With
`input_share` = f, each adapted projection's `lora_A` reads its input only through f·d directions: those where
the recipe's own data (the identity conversations) has the most input energy relative to the general text the
model must keep (the base's answers to the distillation prompts). They are the top generalized eigenvectors of
the two input covariances under the base, so the adapter sees its own data at full strength and general text
much weaker: on SmolLM2 with f = 0.01 the held-out general answers keep 0.2% of their energy in those
directions and the held-out identity questions 1%.

The bases are computed once, before training, in a Ray task (on a GPU when the cluster has one), and kept in
the run's storage folder with the recipe's fingerprint, so every worker and every resumed attempt trains with
the same ones. In training `lora_A`'s weight is parametrised as W @ Q Qᵀ (torch's parametrize); checkpoints
keep W for resuming, and the exported adapter holds the effective weight, so it is a plain PEFT LoRA that
merges and serves as any other.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import torch

from cluster.storage import Location
from jobs.finetune.config import FinetuneConfig

log = logging.getLogger("tuneserve.finetune")
BASES_FILE = "input_bases.pt"
WHITENING_FLOOR = 1e-3  # × the mean eigenvalue of the general covariance: directions general text never uses
BATCH_TOKENS = 8192


def input_covariances(model, sequences: list[list[int]], module_names: set[str], device) -> dict[str, torch.Tensor]:
    """Σ x xᵀ (float64) of the input of each named module, over every token of the sequences, under `model`.
    Batched by length with right padding, which causal attention keeps out of the real tokens."""
    sums: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor] = []  # the current batch's real-token mask

    def record(name):
        def hook(_module, inputs):
            x = inputs[0][keep[0]].float()
            sums[name] = sums.get(name, 0) + (x.T @ x).double()
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if n in module_names]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    try:
        with torch.no_grad():
            start = 0
            while start < len(order):
                end = start + 1  # as many of the next (longer) sequences as fit BATCH_TOKENS at the last one's length
                while end < len(order) and (end - start + 1) * len(sequences[order[end]]) <= BATCH_TOKENS:
                    end += 1
                batch = [sequences[i] for i in order[start:end]]
                width = max(map(len, batch))
                ids = torch.tensor([s + [0] * (width - len(s)) for s in batch], device=device)
                mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=device)
                keep[:] = [mask.bool()]
                model(input_ids=ids, attention_mask=mask)
                start = end
    finally:
        for handle in handles:
            handle.remove()
    return sums


def contrast_bases(general: dict[str, torch.Tensor], own: dict[str, torch.Tensor], share: float
                   ) -> dict[str, torch.Tensor]:
    """Per module, an orthonormal basis (d × k, k = share·d) of the directions with the largest ratio of `own`
    energy to `general` energy: the top generalized eigenvectors, after whitening by the general covariance."""
    bases = {}
    for name, g in general.items():
        d = g.shape[0]
        g = g / g.trace() * d  # scale-free: mean eigenvalue 1
        whiten = torch.linalg.inv(torch.linalg.cholesky(g + WHITENING_FLOOR * torch.eye(d, dtype=g.dtype)))
        _, directions = torch.linalg.eigh(whiten @ own[name] @ whiten.T)  # ascending
        count = max(1, round(share * d))
        basis, _ = torch.linalg.qr(whiten.T @ directions[:, -count:])
        bases[name] = basis.float()
    return bases


def module_names(cfg: FinetuneConfig, model) -> set[str]:
    """The base model's modules that the recipe's LoRA adapts (the names peft matches)."""
    from jobs.finetune.model import lora_targets

    targets = lora_targets(cfg, model.config.model_type)
    if isinstance(targets, str):  # "all-linear"
        return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    return {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets}


def compute_bases(cfg: FinetuneConfig, model_ref: str, own: list[list[int]], general: list[list[int]],
                  on_gpu: bool) -> dict[str, torch.Tensor]:
    """Load the base (full precision, as the teacher does) on this node and compute the bases."""
    from transformers import AutoModelForCausalLM

    from cluster.model_cache import resolve_model_path

    threads = cfg.train.threads_on_this_node()  # Ray gives a task one thread per CPU it asked for
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if on_gpu else "cpu")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_ref),
                                                 dtype=torch.bfloat16 if on_gpu else torch.float32).to(device).eval()
    names = module_names(cfg, model)
    general_sums = input_covariances(model, general, names, device)
    own_sums = {n: c.cpu() for n, c in input_covariances(model, own, names, device).items()}
    return contrast_bases({n: c.cpu() for n, c in general_sums.items()}, own_sums, cfg.lora.input_share)


def fingerprint(cfg: FinetuneConfig, own: list[list[int]], general: list[list[int]]) -> str:
    key = json.dumps([cfg.model.path, cfg.lora.input_share, cfg.lora.target_modules, own, general])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def input_bases(cfg: FinetuneConfig, run: Location, own: list[list[int]], general: list[list[int]],
                on_gpu: bool) -> str:
    """Make (or reuse) the run's bases; returns their storage URI, for the workers."""
    import ray

    stored = run.join(BASES_FILE)
    key = fingerprint(cfg, own, general)
    if stored.is_file() and torch.load(io.BytesIO(stored.read_bytes()), weights_only=True)["fingerprint"] == key:
        log.info("adapter input bases: reusing %s", stored.uri)
        return stored.uri
    started = time.perf_counter()
    task = ray.remote(compute_bases).options(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if on_gpu else 0)
    bases = ray.get(task.remote(cfg, cfg.model.path, own, general, on_gpu))
    buffer = io.BytesIO()
    torch.save({"fingerprint": key, "bases": bases}, buffer)
    stored.write_bytes(buffer.getvalue())
    log.info("adapter input bases: %d modules, %d of %d directions each (first), from %d own and %d general "
             "sequences, in %.0f s", len(bases), *next(iter(bases.values())).shape[::-1], len(own), len(general),
             time.perf_counter() - started)
    return stored.uri


def read_bases(uri: str) -> dict[str, torch.Tensor]:
    from cluster.storage import locate

    return torch.load(io.BytesIO(locate(uri).read_bytes()), weights_only=True)["bases"]


class ThroughBasis(torch.nn.Module):
    """lora_A's weight W read as W Q Qᵀ: the adapter sees only its input's component in span(Q)."""

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight @ self.basis.to(weight.dtype)) @ self.basis.T.to(weight.dtype)


def restrict(model, bases: dict[str, torch.Tensor]) -> int:
    """Parametrise every lora_A of a peft model by its module's basis; returns how many."""
    from torch.nn.utils import parametrize

    count = 0
    for name, module in model.named_modules():
        if name.endswith(".lora_A.default"):
            base_name = name.removeprefix("base_model.model.").removesuffix(".lora_A.default")
            parametrize.register_parametrization(module, "weight",
                                                 ThroughBasis(bases[base_name].to(module.weight.device)))
            count += 1
    if count != len(bases):
        raise RuntimeError(f"the input bases name {len(bases)} modules, the adapter has {count} lora_A")
    return count


ORIGINAL = ".parametrizations.weight.original"


def effective_state(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trainable-weights dict with each parametrised lora_A weight as its effective value, under the plain
    name PEFT saves and loads."""
    out = {}
    for name, value in state.items():
        if name.endswith(ORIGINAL):
            path = name.removesuffix(ORIGINAL)
            out[path + ".weight"] = model.get_submodule(path).weight.detach().cpu()
        else:
            out[name] = value
    return out
