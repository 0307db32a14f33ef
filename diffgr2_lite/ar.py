"""The autoregressive GR2 re-ranker: supervised fine-tuning and batched decoding with a KV cache.

SFT minimises GR2's decoupled loss on the completion only (see :mod:`diffgr2_lite.batches`). Decoding is greedy
(or sampled) token by token with a KV cache; in *constrained* mode the answer is forced to be a permutation of the
candidates by masking, at each answer position, every token that would repeat a candidate or leave the candidate set:
at a label only the labels not yet written, at a SID code only the next code of the labelled candidate
("left-to-right masking": easy for an AR decoder, which writes the answer in order; a parallel decoder cannot do it).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from .progress import tqdm

from .batches import Batch, iterate_batches
from .model import cache_kwargs
from .text import ANSWER, END_ANSWER


# ----------------------------------------------------------------------------------------------- training
def completion_logits(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Logits that predict each completion token: position i-1 predicts token i (the AR token shift).

    Only the completion positions go through the output layer (the prompt's logits are never needed).
    """
    ids = torch.cat([prompt, completion], 1)
    hidden = model.model(input_ids=ids).last_hidden_state
    p = prompt.shape[1]
    return model.lm_head(hidden[:, p - 1:p - 1 + completion.shape[1]])


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * CE_i / sum_i w_i (tokens with weight 0, e.g. padding, contribute nothing)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(weight)
    return (ce * weight).sum() / weight.sum().clamp(min=1e-8)


def sft_loss(model, batch: Batch) -> torch.Tensor:
    return weighted_ce(completion_logits(model, batch.prompt, batch.completion), batch.completion, batch.weight)


class BestState:
    """A copy of the weights with the best validation score so far; ``restore`` puts them back at the end."""

    def __init__(self, ties_to_later: bool = False):
        self.best, self.state, self.ties_to_later = -float("inf"), None, ties_to_later

    def update(self, model, score: float) -> None:
        if score > self.best or (self.ties_to_later and score == self.best):
            self.best = score
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def maybe_validate(validate, model, step: int, total: int, every: int, history: dict, keeper: BestState | None):
    """Every ``every`` steps and at the last: score the model (in eval mode), record it, let ``keeper`` keep the best."""
    if validate is None or not (step % every == 0 or step == total):
        return
    was_training = model.training
    model.eval()
    score = float(validate(model))
    model.train(was_training)
    history["val_step"].append(step)
    history["val"].append(score)
    if keeper is not None:
        keeper.update(model, score)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def autocast(device):
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def train(model, train_ds, tokenizer, *, loss_fn=sft_loss, epochs: float, lr: float, batch_size: int,
          lambda_r: float, lambda_o: float, device, seed: int = 0, multiple_of: int = 1,
          validate=None, validate_every: int | None = None, desc: str = "SFT", weight_decay: float = 0.01) -> dict:
    """A plain training loop: AdamW, warm-up + cosine schedule, bf16 autocast on GPU, best-validation checkpoint.

    ``loss_fn(model, batch)`` is the objective (AR SFT here, the masked-diffusion loss for CFT). ``validate(model)``
    returns a score to maximise (validation NDCG@3); the best state is restored at the end.
    """
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(train_ds) / batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = max(1, total // 20)
    validate_every = validate_every or steps_per_epoch
    history = {"step": [], "loss": [], "val_step": [], "val": []}
    keeper, step, t0 = BestState(ties_to_later=True), 0, time.time()   # ties: the longer-trained model
    bar = tqdm(total=total, desc=desc, mininterval=1)
    epoch = 0
    while step < total:
        for batch in iterate_batches(train_ds, batch_size, shuffle=True, seed=seed + epoch, tokenizer=tokenizer,
                                     lambda_r=lambda_r, lambda_o=lambda_o, multiple_of=multiple_of):
            if step >= total:
                break
            batch = batch.to(device)
            for g in opt.param_groups:
                g["lr"] = lr * cosine_lr(step, total, warmup)
            with autocast(device):
                loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            history["step"].append(step)
            history["loss"].append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
            maybe_validate(validate, model, step, total, validate_every, history, keeper)
        epoch += 1
    bar.close()
    keeper.restore(model)
    model.eval()
    history.update(best_val=keeper.best, steps=total, seconds=time.time() - t0)
    return history


# ----------------------------------------------------------------------------------------------- decoding
class AnswerConstraint:
    """Left-to-right masking that keeps an AR answer a permutation of the candidates (vectorised over the batch).

    Free until ``<answer>`` is written. Inside the answer, items are ``[k] SID``: a label slot allows only the labels
    of candidates not yet written, and each SID slot allows only the next code of the candidate that label names (an
    exact copy). After the N-th item only ``</answer>``, then only ``<eos>``. If the budget runs short, ``<answer>`` is
    forced.
    """

    def __init__(self, cand_ids: torch.Tensor, tokenizer, budget: int):
        from .text import label_token

        self.c = cand_ids                                  # [B, N, L] token ids of the candidates' SIDs
        b, n, self.L = cand_ids.shape
        dev = cand_ids.device
        self.labels = torch.tensor(tokenizer.convert_tokens_to_ids([label_token(k) for k in range(n)]), device=dev)
        self.answer_id = tokenizer.convert_tokens_to_ids(ANSWER)
        self.end_id = tokenizer.convert_tokens_to_ids(END_ANSWER)
        self.eos_id = tokenizer.eos_token_id
        self.phase = torch.zeros(b, dtype=torch.long, device=dev)   # 0 reasoning, 1 answer, 2 closed, 3 done
        self.pos = torch.zeros(b, dtype=torch.long, device=dev)     # tokens written inside the answer
        self.used = torch.zeros(b, n, dtype=torch.bool, device=dev)
        self.current = torch.zeros(b, dtype=torch.long, device=dev)  # the candidate whose SID is being written
        self.budget, self.t = budget, 0
        self.item_len = self.L + 1
        self.answer_len = n * self.item_len + 2            # items, </answer>, <eos>

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        b, n = self.used.shape
        rows = torch.arange(b, device=logits.device)
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        in_answer = (self.phase == 1) & (self.pos < n * self.item_len)
        slot = self.pos % self.item_len
        at_label = in_answer & (slot == 0)
        label_ok = ~self.used & at_label[:, None]                                   # [B, N]
        allowed[rows[:, None].expand(b, n)[label_ok], self.labels.expand(b, n)[label_ok]] = True
        at_code = in_answer & (slot > 0)
        code = self.c[rows, self.current, (slot - 1).clamp(min=0)]
        allowed[rows[at_code], code[at_code]] = True
        closing = (self.phase == 1) & (self.pos >= n * self.item_len)
        allowed[closing, self.end_id] = True
        allowed[self.phase >= 2, self.eos_id] = True
        free = self.phase == 0
        if self.budget - self.t <= self.answer_len + 1:                         # too little room left: answer now
            allowed[free, self.answer_id] = True
            free = torch.zeros_like(free)
        allowed[free] = True
        allowed[free, self.eos_id] = False                                      # no ending before an answer
        allowed[free, self.end_id] = False
        return logits.masked_fill(~allowed, float("-inf"))

    def update(self, tok: torch.Tensor) -> None:
        n = self.used.shape[1]
        self.t += 1
        in_answer = (self.phase == 1) & (self.pos < n * self.item_len)
        is_label = (tok[:, None] == self.labels[None]) & (in_answer & (self.pos % self.item_len == 0))[:, None]
        self.current = torch.where(is_label.any(1), is_label.float().argmax(1), self.current)
        self.used |= is_label
        self.pos += in_answer.long()
        self.phase = torch.where((self.phase == 0) & (tok == self.answer_id), torch.ones_like(self.phase), self.phase)
        self.phase = torch.where((self.phase == 1) & (tok == self.end_id), torch.full_like(self.phase, 2), self.phase)
        self.phase = torch.where((self.phase == 2) & (tok == self.eos_id), torch.full_like(self.phase, 3), self.phase)


def pick(logits: torch.Tensor, temperature: float, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def ar_decode(model, prompt: torch.Tensor, max_new: int, eos_id: int, constraint: AnswerConstraint | None = None,
              temperature: float = 0.0, generator=None) -> dict:
    """Batched decoding with a KV cache: one forward for the prompt, then one per token. Stops when all rows ended.

    Returns ``tokens`` [B, T] (``<eos>`` after the end), ``forwards`` (model calls after the prompt).
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1]
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    tokens, forwards = [], 0
    for t in range(max_new):
        if constraint is not None:
            logits = constraint.mask(logits)
        nxt = pick(logits, temperature, generator)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        tokens.append(nxt)
        if constraint is not None:
            constraint.update(nxt)
        done |= nxt == eos_id
        if bool(done.all()) or t == max_new - 1:
            break
        out = model(input_ids=nxt[:, None], **cache_kwargs(model, cache), use_cache=True)
        forwards += 1
        logits = out.logits[:, -1]
    return {"tokens": torch.stack(tokens, 1), "forwards": forwards}


def candidate_token_ids(rows, example_set, tokenizer, device) -> torch.Tensor:
    """[B, N, L] token ids of each row's candidate SIDs (for constrained decoding)."""
    ids = [[tokenizer.convert_tokens_to_ids(list(example_set.sid_words(c))) for c in r["candidates"]] for r in rows]
    return torch.tensor(ids, dtype=torch.long, device=device)


def max_completion_len(ds) -> int:
    return max(len(c) for c in ds["completion_ids"])
