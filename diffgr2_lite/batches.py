"""Tokenised examples as tensors: a fixed-length prompt, a completion, and per-token loss weights.

Shared by AR SFT and every diffusion stage. The completion's weights carry GR2's decoupled objective::

    L = -(lambda_r * sum log p(reasoning tokens) + lambda_o * sum log p(answer tokens)) / (number of weighted tokens)

Reasoning is everything up to ``</think>``; the answer is ``<answer> ... </answer> <eos>``. The prompt never has a
weight. The *decision* (the label after ``pick``, or the first label of a direct answer) is further multiplied by the
row's ``decision_weight``: 0 for reading examples, whose pick is drawn at random (see data/examples.py).
Completions are padded with ``<eos>`` (AR ignores everything after the first one; the block-diffusion model
learns to fill the rest of its last block with it, which is how a parallel decoder says "finished").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import ANSWER, encode


@dataclass
class Batch:
    prompt: torch.Tensor          # [B, P] long
    completion: torch.Tensor      # [B, C] long, <eos>-padded
    weight: torch.Tensor          # [B, C] float: lambda_r / lambda_o on real tokens, 0 on padding after the first <eos>
    is_answer: torch.Tensor       # [B, C] bool
    length: torch.Tensor          # [B] completion length up to and including the first <eos>

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.prompt, self.completion, self.weight, self.is_answer, self.length)))

    def __len__(self) -> int:
        return self.prompt.shape[0]


def tokenize_split(ds, tokenizer, column: str = "completion"):
    """Add ``prompt_ids`` and ``completion_ids`` columns (a ``datasets.map``, cached by the library)."""

    def fn(batch):
        return {"prompt_ids": encode(tokenizer, batch["prompt"]), "completion_ids": encode(tokenizer, batch[column])}

    return ds.map(fn, batched=True, desc=f"tokenising {column}")


def make_batch(rows, tokenizer, lambda_r: float = 1.0, lambda_o: float = 1.0, multiple_of: int = 1,
               min_len: int = 0) -> Batch:
    """Stack rows (dicts with ``prompt_ids`` and ``completion_ids``) into a :class:`Batch`."""
    eos, answer = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER)
    pick = tokenizer.convert_tokens_to_ids("pick")
    prompts = [r["prompt_ids"] for r in rows]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts in a batch must have the same length (the prompt format is fixed-length)")
    comps = [list(r["completion_ids"]) for r in rows]
    c_len = max(max(len(c) for c in comps), min_len)
    c_len = -(-c_len // multiple_of) * multiple_of
    comp = torch.full((len(rows), c_len), eos, dtype=torch.long)
    weight = torch.zeros(len(rows), c_len)
    is_answer = torch.zeros(len(rows), c_len, dtype=torch.bool)
    length = torch.zeros(len(rows), dtype=torch.long)
    for i, c in enumerate(comps):
        comp[i, :len(c)] = torch.tensor(c)
        end = c.index(eos) + 1 if eos in c else len(c)
        start = c.index(answer) if answer in c else end
        weight[i, :start] = lambda_r
        weight[i, start:end] = lambda_o
        is_answer[i, start:end] = True
        decision = decision_index(c, pick, answer)
        if decision is not None and decision < end:
            weight[i, decision] *= float(rows[i].get("decision_weight", 1.0))
        length[i] = end
    return Batch(torch.tensor(prompts, dtype=torch.long), comp, weight, is_answer, length)


def decision_index(completion: list[int], pick_id: int, answer_id: int) -> int | None:
    """Where the decision is written: the token after ``pick`` in a trace, else the first token of the answer."""
    if pick_id in completion:
        return completion.index(pick_id) + 1
    if answer_id in completion:
        return completion.index(answer_id) + 1
    return None


def iterate_batches(ds, batch_size: int, shuffle: bool, seed: int, **kw):
    """Yield :class:`Batch` objects over a tokenised dataset (length-bucketed when shuffling: less padding)."""
    import numpy as np

    if hasattr(ds, "select_columns"):
        cols = [c for c in ("prompt_ids", "completion_ids", "decision_weight") if c in ds.column_names]
        rows = ds.select_columns(cols).to_list()
    else:
        rows = ds
    n = len(rows)
    order = np.arange(n)
    if shuffle:
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        # bucket: sort chunks of 50 batches by length, then shuffle the batches
        lens = np.array([len(r["completion_ids"]) for r in rows])
        chunk = batch_size * 50
        order = np.concatenate([o[np.argsort(lens[o], kind="stable")] for o in np.array_split(order, max(1, n // chunk))])
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
        rng.shuffle(batches)
    else:
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for idx in batches:
        yield make_batch([rows[int(i)] for i in idx], **kw)
