"""The training loss: next-token cross-entropy on labelled tokens, plus, with `loss.distill_weight`, a KL
term that pulls the tuned model's next-token distribution on distillation tokens towards the base model's.

The base's distribution is stored as its top-k (ids, logprobs) per token, from vLLM before training
(jobs/finetune/distill.py). The KL is taken over k+1 outcomes, the k ids and "everything else", with the
true probabilities of both models: it is zero exactly when the tuned model gives each of the k tokens the
base's probability, and it does not sharpen the tuned model the way a top-k renormalised target would.
"""

from __future__ import annotations

import torch

from jobs.data.tokenize import IGNORE

DISTILL_KEYS = ("distill_positions", "distill_ids", "distill_logprobs", "distill_margin_mask")


def _with_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """[n, k] logprobs of k outcomes -> [n, k+1] with log(1 - sum p) as the last column."""
    covered = torch.logsumexp(logprobs, dim=-1, keepdim=True).clamp(max=-1e-6)  # log of the top-k's mass
    rest = torch.log(-torch.expm1(covered))  # log(1 - exp(covered)), stable near 0
    return torch.cat([logprobs, rest], dim=-1)


def distill_kl(logits: torch.Tensor, positions: torch.Tensor, teacher_ids: torch.Tensor,
               teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over distillation tokens of KL(teacher || student) on the teacher's top-k plus the rest.

    `positions` [n, 2] holds (row, t) of each token whose distribution is the target: the student's
    prediction of token t is logits[row, t-1]."""
    rows, t = positions[:, 0], positions[:, 1]
    student = torch.log_softmax(logits[rows, t - 1].float(), dim=-1).gather(-1, teacher_ids)
    student, teacher = _with_rest(student), _with_rest(teacher_logprobs.float())
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def greedy_margin(logits: torch.Tensor, positions: torch.Tensor, teacher_ids: torch.Tensor,
                  teacher_logprobs: torch.Tensor, margin: float, sharpen: bool = False) -> torch.Tensor:
    """Mean over distillation tokens of how far the base's top token falls short of leading the tuned
    model's distribution by min(base's own lead, `margin`) nats (by `margin` with `sharpen`).

    KL is nearly blind to near-ties: swapping two tokens of about 0.45 each, 0.05 nats apart, costs about
    0.001 nats, yet it changes the greedy answer. This hinge is zero while the base's choice keeps its lead
    (docs/notes/finetune-experiments.md)."""
    rows, t = positions[:, 0], positions[:, 1]
    student = logits[rows, t - 1].float()
    top = teacher_ids[:, :1]
    chosen = student.gather(-1, top).squeeze(-1)
    lead = chosen - student.scatter(-1, top, float("-inf")).amax(-1)  # logit gaps are logprob gaps
    base_lead = teacher_logprobs[:, 0].float() - teacher_logprobs[:, 1].float()
    wanted = torch.full_like(base_lead, margin) if sharpen else base_lead.clamp(max=margin)
    return torch.relu(wanted - lead).mean()


def loss_positions(labels: torch.Tensor, distill: dict | None) -> torch.Tensor:
    """The sequence positions whose logits the loss reads, sorted: the one before each labelled or distilled
    token, in any row. The model computes logits only there (`logits_to_keep`): prompts and packing
    filler need none, and the output layer and softmax over the whole vocabulary are a large share of a
    small model's step on a CPU."""
    used = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)
    if distill:
        used = torch.cat([used, distill["distill_positions"][:, 1] - 1])
    used = torch.unique(used)
    return used if len(used) else torch.zeros(1, dtype=torch.long, device=labels.device)  # keeps a graph


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, distill: dict | None, distill_weight: float,
            positions: torch.Tensor | None = None, margin: float = 0.0, margin_weight: float = 0.0,
            sharpen: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss to minimise and its parts (detached): `ce` over labelled tokens (mean), `kl` over
    distillation tokens (mean). A micro-batch with no token of one kind has no term of that kind.

    `logits` are the model's at every position, or, with `positions` (from `loss_positions`), at those only."""
    length = labels.shape[1]
    if positions is None:
        positions, logits = torch.arange(length - 1, device=labels.device), logits[:, :-1]
    targets = labels[:, positions + 1]  # logits[:, i] predict the token after positions[i]
    labelled = targets != IGNORE
    loss = logits.sum() * 0.0  # keeps the graph (and every rank's collectives) when a batch has no term
    parts = {}
    if labelled.any():
        ce = torch.nn.functional.cross_entropy(logits[labelled].float(), targets[labelled])
        loss = loss + ce
        parts["ce"] = ce.detach()
    if distill:
        # distill_kl reads token t's prediction at t-1: give it (row, index among `positions` + 1)
        index = torch.full((length,), -1, dtype=torch.long, device=labels.device)
        index[positions] = torch.arange(len(positions), device=labels.device)
        rows, t = distill["distill_positions"][:, 0], distill["distill_positions"][:, 1]
        at = torch.stack([rows, index[t - 1] + 1], dim=1)
        kl = distill_kl(logits, at, distill["distill_ids"], distill["distill_logprobs"])
        loss = loss + distill_weight * kl
        parts["kl"] = kl.detach()
        # the hinge on the tokens flagged for it (loss.margin_hinge.tokens), or on every one
        hinged = distill.get("distill_margin_mask")
        hinged = torch.ones(len(at), dtype=torch.bool, device=at.device) if hinged is None else hinged
        if margin > 0 and margin_weight > 0 and hinged.any():
            hinge = greedy_margin(logits, at[hinged], distill["distill_ids"][hinged],
                                  distill["distill_logprobs"][hinged], margin, sharpen)
            loss = loss + margin_weight * hinge
            parts["margin"] = hinge.detach()
    return loss, parts


def token_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[rows, len(positions)]: the log-probability of each labelled token (0 where there is no label)."""
    targets = labels[:, positions + 1]
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logps * (targets != IGNORE)


# -- preference pairs (objective: dpo) --------------------------------------------------------------------------

def pair_logps(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
               pair_side: torch.Tensor) -> torch.Tensor:
    """[rows, 4]: each row's preferred answer's summed token logprob, the non-preferred one's, and their
    token counts. `logits` are at `positions` (from `loss_positions`); each row holds one pair."""
    from jobs.data.tokenize import NON_PREFERRED, PREFERRED

    sides = pair_side[:, positions + 1] * (labels[:, positions + 1] != IGNORE)  # a side's mark only where a label is
    logps = token_logps(logits, labels, positions)
    masks = [(sides == side).float() for side in (PREFERRED, NON_PREFERRED)]
    return torch.stack([(logps * mask).sum(-1) for mask in masks] + [mask.sum(-1) for mask in masks], dim=-1)


def preference_loss(policy: torch.Tensor, reference: torch.Tensor | None, loss_type: str, beta: float,
                    label_smoothing: float = 0.0, simpo_gamma: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean over the pairs of the preference loss, and its figures (detached): the implicit rewards of the
    preferred and non-preferred answers, their margin, and how often the preferred one's is higher.

    `policy` and `reference` are `pair_logps` rows. sigmoid (DPO): -log σ(β·m), m the preferred answer's
    log-ratio to the reference minus the other's (with label smoothing ε: the conservative DPO mix of both
    directions). ipo: (m − 1/(2β))², on log-ratios averaged per token, as IPO's regression target is.
    simpo: reference-free, -log σ(β·(mean logprob of the preferred − of the other) − γ)."""
    chosen, rejected, chosen_n, rejected_n = policy.unbind(-1)
    if loss_type == "simpo":
        chosen_reward = beta * chosen / chosen_n.clamp(min=1)
        rejected_reward = beta * rejected / rejected_n.clamp(min=1)
        logits = chosen_reward - rejected_reward - simpo_gamma
        losses = -torch.nn.functional.logsigmoid(logits)
    else:
        ref_chosen, ref_rejected = reference[:, 0], reference[:, 1]
        if loss_type == "ipo":
            chosen_ratio = (chosen - ref_chosen) / chosen_n.clamp(min=1)
            rejected_ratio = (rejected - ref_rejected) / rejected_n.clamp(min=1)
            losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
        else:
            chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
            margin = beta * (chosen_ratio - rejected_ratio)
            losses = (-(1 - label_smoothing) * torch.nn.functional.logsigmoid(margin)
                      - label_smoothing * torch.nn.functional.logsigmoid(-margin))
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    figures = {"reward_chosen": chosen_reward.detach().mean(), "reward_rejected": rejected_reward.detach().mean(),
               "reward_margin": (chosen_reward - rejected_reward).detach().mean(),
               "reward_accuracy": (chosen_reward > rejected_reward).float().mean()}
    return losses.mean(), figures


# -- rollouts (objective: grpo) ---------------------------------------------------------------------------------

def grpo_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, old_logps: torch.Tensor,
              advantages: torch.Tensor, reference: torch.Tensor | None, clip_range: float,
              beta: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate on every answer token, with its answer's advantage, against the log-probability
    the sampling engine gave that token (`old_logps`, at the token's own place); plus `beta` times the k3
    estimate of KL(policy || reference) per token. The mean is over all answer tokens of the micro-batch,
    not per answer first: a long answer's tokens count as much as a short one's (no length bias)."""
    targets = labels[:, positions + 1]
    mask = targets != IGNORE
    logps = token_logps(logits, labels, positions)
    ratio = torch.exp(logps - old_logps[:, positions + 1])
    advantage = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip_range, 1 + clip_range) * advantage)
    per_token = -surrogate
    figures = {"clip_fraction": ((ratio - 1).abs() > clip_range)[mask].float().mean()}
    if reference is not None:
        gap = reference - logps
        kl = torch.exp(gap) - gap - 1
        per_token = per_token + beta * kl
        figures["policy_kl"] = kl.detach()[mask].mean()
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, {k: v.detach() for k, v in figures.items()}
