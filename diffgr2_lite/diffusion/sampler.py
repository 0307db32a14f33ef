"""The block-diffusion decoder: block by block, a KV cache for the prompt and finished blocks, threshold commits.

For each block of B positions, start from an all-``<mask>`` canvas and repeat:

1. one forward of the canvas (the cache holds everything before the block; the block sees itself fully);
2. for every masked position take the most likely token and its probability (the token shift: position j's
   prediction comes from position j-1, the first one from the last position before the block);
3. commit every masked position whose probability is >= tau, and always the single most confident one,
   so a block takes between 1 and B steps (optionally only inside the first unfinished sub-block, left to right).

When the block is full, its keys and values are computed once more from the *final* tokens and appended to the
cache (the ones computed while positions were masked are never kept). With ``fused=True`` that write shares a forward
with the first step of the next block: 2B query tokens, k forwards for a block decoded in k steps instead of k+1.
Decoding stops after a block in which every row has written ``<eos>``.

Every committed token records the step at which it was committed (``commit_step``, 0-based within its block), which
is all that is needed to rebuild the canvas it was committed from (OPD and RL's trajectory replay do exactly that).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import cache_kwargs
from .masks import block_causal_mask, to_4d


def truncate_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of a DynamicCache (works across transformers 5.x)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def cache_len(cache) -> int:
    return cache.get_seq_length()


@dataclass
class DecodeResult:
    tokens: torch.Tensor           # [N, nb*B] committed tokens (<eos> beyond a row's end)
    commit_step: torch.Tensor      # [N, nb*B] step (within its block) at which each token was committed
    steps: torch.Tensor            # [N, nb] steps each block took for each row
    forwards: int                  # model calls after the prompt's prefill
    block_size: int

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "forwards": self.forwards, "commit_step": self.commit_step,
                "steps": self.steps, "block_size": self.block_size}


def _choose(logits: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its probability) per position: argmax, or a sample at ``temperature``."""
    probs = torch.softmax(logits.float() / max(temperature, 1e-6) if temperature > 0 else logits.float(), -1)
    if temperature > 0:
        tok = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])
    else:
        tok = probs.argmax(-1)
    return tok, probs.gather(-1, tok[..., None]).squeeze(-1)


def commit_rule(conf: torch.Tensor, committed: torch.Tensor, tau: float, sub_block: int | None = None) -> torch.Tensor:
    """Positions to commit now: masked with confidence >= tau, plus the most confident masked one per row.

    With ``sub_block`` (Fast-dLLM v2's sub-blocks) only the first sub-block of that many positions that still has a
    masked position is open: a block is then filled left to right in chunks, in confidence order inside each chunk,
    while attention still spans the whole block. Rows with nothing left to commit commit nothing.
    """
    open_ = ~committed
    if sub_block:
        chunk = torch.arange(conf.shape[-1], device=conf.device) // sub_block
        first_open = open_.int().argmax(-1, keepdim=True) // sub_block      # argmax: the first open position
        open_ = open_ & (chunk == first_open)
    conf = torch.nan_to_num(conf, nan=-1.0).masked_fill(~open_, -2.0)   # an open position always beats a closed one
    commit = (conf >= tau) & open_
    best = conf.argmax(-1, keepdim=True)
    has_open = open_.any(-1, keepdim=True)
    commit.scatter_(-1, best, commit.gather(-1, best) | has_open)
    return commit & open_


class _Forward:
    """One block-step forward: query tokens at absolute positions [start, start+q) over a prefix cache."""

    def __init__(self, model, use_cache: bool, prompt_len: int, block_size: int):
        self.model, self.use_cache, self.P, self.B = model, use_cache, prompt_len, block_size

    def __call__(self, cache, seq: torch.Tensor, start: int, query: torch.Tensor, keep: int, mask_q: torch.Tensor):
        """Run ``query`` [N, q] at positions start.. ; the cache ends up holding ``keep`` positions. Returns logits.

        ``mask_q`` [q, start+q] is the query part of the attention mask. Without a cache the whole prefix
        ``seq[:, :start]`` is recomputed (the reference path that tests compare the cached one against).
        """
        n, q = query.shape
        pos = torch.arange(start, start + q, device=query.device)[None].expand(n, -1)
        if self.use_cache:
            out = self.model(input_ids=query, **cache_kwargs(self.model, cache), attention_mask=to_4d(mask_q, n),
                             position_ids=pos, use_cache=True)
            truncate_cache(cache, keep)
            return out.logits
        full = torch.cat([seq[:, :start], query], 1)
        L = full.shape[1]
        prefix_mask = block_causal_mask(self.P, L - self.P, self.B).to(query.device)[:start]
        mask = torch.cat([prefix_mask[:, :L], mask_q], 0)
        pos_full = torch.arange(L, device=query.device)[None].expand(n, -1)
        out = self.model(input_ids=full, attention_mask=to_4d(mask, n), position_ids=pos_full)
        return out.logits[:, start:]


@torch.no_grad()
def diffusion_decode(model, prompt: torch.Tensor, max_blocks: int, block_size: int, mask_id: int, eos_id: int,
                     tau: float = 1.0, temperature: float = 0.0, fused: bool = True, use_cache: bool = True,
                     generator=None, sub_block: int | None = None) -> DecodeResult:
    """Decode up to ``max_blocks`` blocks of ``block_size`` tokens after each (fixed-length) prompt.

    ``sub_block``: commit left to right in chunks of that many positions (see :func:`commit_rule`)."""
    from transformers import DynamicCache

    n, P = prompt.shape
    B, dev = block_size, prompt.device
    fwd = _Forward(model, use_cache, P, B)
    cache = DynamicCache() if use_cache else None
    seq = prompt
    out = model(input_ids=prompt, **cache_kwargs(model, cache), use_cache=use_cache) if use_cache else model(input_ids=prompt)
    last_logits = out.logits[:, -1]                                        # predicts the first completion token
    all_tokens, all_steps, steps_per_block = [], [], []
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    forwards = 0
    ones = torch.ones(B, B, dtype=torch.bool, device=dev)
    pending = None                                                          # final tokens of the previous block
    for b in range(max_blocks):
        start = P + b * B
        canvas = torch.full((n, B), mask_id, dtype=torch.long, device=dev)
        committed = finished[:, None].expand(n, B).clone()                  # ended rows: the block is all <eos>
        canvas[committed] = eos_id
        step_of = torch.zeros(n, B, dtype=torch.long, device=dev)
        steps = torch.zeros(n, dtype=torch.long, device=dev)
        k = 0
        while not bool(committed.all()):
            if pending is not None:                                         # fused: write block b-1, step block b
                prev_start = start - B
                q = torch.cat([pending, canvas], 1)
                m = torch.zeros(2 * B, prev_start + 2 * B, dtype=torch.bool, device=dev)
                m[:, :prev_start] = True
                m[:B, prev_start:prev_start + B] = ones
                m[B:, prev_start:] = True
                logits = fwd(cache, seq, prev_start, q, keep=start, mask_q=m)
                seq = torch.cat([seq, pending], 1)
                last_logits = logits[:, B - 1]
                logits = logits[:, B:]
                pending = None
            else:
                m = torch.ones(B, start + B, dtype=torch.bool, device=dev)
                logits = fwd(cache, seq, start, canvas, keep=start, mask_q=m)
            forwards += 1
            pred_logits = torch.cat([last_logits[:, None], logits[:, :B - 1]], 1)
            tok, conf = _choose(pred_logits, temperature, generator)
            commit = commit_rule(conf, committed, tau, sub_block)
            canvas = torch.where(commit, tok, canvas)
            step_of = torch.where(commit, torch.full_like(step_of, k), step_of)
            steps += (~committed).any(-1).long()
            committed |= commit
            k += 1
        all_tokens.append(canvas)
        all_steps.append(step_of)
        steps_per_block.append(steps)
        finished |= (canvas == eos_id).any(-1)
        if bool(finished.all()) or b == max_blocks - 1:
            break
        if fused:
            pending = canvas
        else:                                                               # write the final block on its own
            m = torch.ones(B, start + B, dtype=torch.bool, device=dev)
            logits = fwd(cache, seq, start, canvas, keep=start + B, mask_q=m)
            seq = torch.cat([seq, canvas], 1)
            last_logits = logits[:, -1]
            forwards += 1
    return DecodeResult(torch.cat(all_tokens, 1), torch.cat(all_steps, 1), torch.stack(steps_per_block, 1),
                        forwards, B)


def rebuild_canvas(tokens: torch.Tensor, commit_step: torch.Tensor, step: int, mask_id: int) -> torch.Tensor:
    """The canvas of a block at ``step``: tokens committed before that step, ``<mask>`` elsewhere."""
    return torch.where(commit_step < step, tokens, torch.full_like(tokens, mask_id))
