"""The autoregressive GR2 re-ranker: the supervised fine-tuning objective and batched decoding with a KV cache.

SFT minimises GR2's decoupled loss on the completion only (see :mod:`diffgr2_lite.batches`), through the one
training loop (:func:`diffgr2_lite.train.train_supervised`). Decoding is greedy (or sampled) token by token with a KV
cache; in *constrained* mode the answer is forced to be a permutation of the candidates by masking, at each answer
position, every token that would repeat a candidate or leave the candidate set: at a label only the labels not yet
written, at a SID code only the next code of the labelled candidate ("left-to-right masking": easy for an AR
decoder, which writes the answer in order; a parallel decoder cannot do it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batches import Batch
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


def weighted_ce_terms(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i * CE_i, sum_i w_i): the weighted cross-entropy as a sum and its weight (tokens with weight 0, e.g.
    padding, contribute nothing). The training loop divides by the weight of the whole global batch."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(weight)
    return (ce * weight).sum(), weight.sum()


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * CE_i / sum_i w_i."""
    total, w = weighted_ce_terms(logits, targets, weight)
    return total / w.clamp(min=1e-8)


def sft_terms(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """GR2's decoupled SFT loss of a batch as (sum, weight), the form :class:`~diffgr2_lite.train.Trainer` takes."""
    return weighted_ce_terms(completion_logits(model, batch.prompt, batch.completion), batch.completion, batch.weight)


def sft_loss(model, batch: Batch) -> torch.Tensor:
    total, w = sft_terms(model, batch)
    return total / w.clamp(min=1e-8)


def autocast(device):
    """bf16 autocast on CUDA, nothing elsewhere (for decoding; training uses :meth:`train.Trainer.autocast`)."""
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


# ----------------------------------------------------------------------------------------------- decoding
class AnswerConstraint:
    """Left-to-right masking that keeps an AR answer a permutation of the candidates (vectorised over the batch).

    Free until ``<answer>`` is written. Inside the answer, items are ``[k] SID``: a label slot allows only the labels
    of candidates not yet written, and each SID slot allows only the next code of the candidate that label names (an
    exact copy). After the N-th item only ``</answer>``, then only ``<eos>``. If the budget runs short, ``<answer>`` is
    forced.
    """

    def __init__(self, cand_ids: torch.Tensor, tokenizer, budget: int):
        from .text import label_token_ids

        self.c = cand_ids                                  # [B, N, L] token ids of the candidates' SIDs
        b, n, self.L = cand_ids.shape
        dev = cand_ids.device
        self.labels = torch.tensor(label_token_ids(tokenizer, n), device=dev)
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
        """Logits with every token the answer's state forbids set to -inf. Only scatters and column writes: nothing
        is read back to the host, so a decode step never waits for the GPU."""
        b, n = self.used.shape
        rows = torch.arange(b, device=logits.device)
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        in_answer = (self.phase == 1) & (self.pos < n * self.item_len)
        slot = self.pos % self.item_len
        label_ok = ~self.used & (in_answer & (slot == 0))[:, None]                  # [B, N]
        allowed.scatter_(1, self.labels.expand(b, n), label_ok)
        at_code = in_answer & (slot > 0)
        code = self.c[rows, self.current, (slot - 1).clamp(min=0)]
        allowed.scatter_(1, code[:, None], at_code[:, None])                     # codes are never labels: no clash
        allowed[:, self.end_id] |= (self.phase == 1) & (self.pos >= n * self.item_len)
        allowed[:, self.eos_id] |= self.phase >= 2
        free = self.phase == 0
        if self.budget - self.t <= self.answer_len + 1:                         # too little room left: answer now
            allowed[:, self.answer_id] |= free
            free = torch.zeros_like(free)
        allowed |= free[:, None]
        allowed[:, self.eos_id] &= ~free                                        # no ending before an answer
        allowed[:, self.end_id] &= ~free
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


def decode_budget(train_ds, slack: int = 8) -> int:
    """How many tokens a decoder may write: the longest training completion plus ``slack`` (every decoder and
    validation of the series uses this one budget)."""
    return max_completion_len(train_ds) + slack


def default_max_blocks(train_ds, block_size: int, slack: int = 8) -> int:
    """The same budget in blocks of ``block_size``, for the block-diffusion decoders (rounded up)."""
    return -(-decode_budget(train_ds, slack) // block_size)
