"""Tokenised examples as tensors: a fixed-length prompt, a completion, and per-token loss weights.

Shared by AR SFT and every diffusion stage. The completion's weights carry GR2's decoupled objective::

    L = -(lambda_r * sum log p(reasoning tokens) + lambda_o * sum log p(answer tokens)) / (number of weighted tokens)

Reasoning is everything up to ``</think>``; the answer is ``<answer> ... </answer> <eos>``. The prompt never has a
weight. The *decision* (the label after ``pick``, or the first label of a direct answer) is further multiplied by the
row's ``decision_weight``: 0 for reading examples, whose pick is drawn at random (see data/examples.py).
Completions are padded with ``<eos>`` (AR ignores everything after the first one; the block-diffusion model
learns to fill the rest of its last block with it, which is how a parallel decoder says "finished").

Training reads batches from :class:`DeviceBatches`: the whole training set padded once and kept on the device, so a
step indexes tensors instead of collating Python lists. (:func:`iterate_batches` collates on the host; the speed
benchmark keeps it as the "before" reference.)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
    """Add ``prompt_ids`` and ``completion_ids`` columns (one ``datasets.map``), and ``direct_ids`` when the split
    has the answer-only completion ``completion_direct``.

    The new fingerprint is named here (from the split's own, the vocabulary's and the columns'), so that
    ``datasets`` does not hash the tokenizer object inside ``fn`` to make one (several seconds on the full
    profile)."""
    import hashlib

    from .text import vocab_fingerprint

    columns = {"prompt_ids": "prompt", "completion_ids": column}
    if column != "completion_direct" and "completion_direct" in ds.column_names:
        columns["direct_ids"] = "completion_direct"

    def fn(batch):
        return {name: encode(tokenizer, batch[src]) for name, src in columns.items()}

    key = (f"encode v1|{ds._fingerprint}|{vocab_fingerprint(tokenizer)}|unk {tokenizer.unk_token_id}|"
           f"{sorted(columns.items())}")                                 # v1: bump when encode() changes
    return ds.map(fn, batched=True, desc=f"tokenising {column}",
                  new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])


def make_batch(rows, tokenizer, lambda_r: float = 1.0, lambda_o: float = 1.0, multiple_of: int = 1,
               min_len: int = 0) -> Batch:
    """Stack rows (dicts with ``prompt_ids`` and ``completion_ids``) into a :class:`Batch`.

    Per row: the completion up to and including its first ``<eos>`` is real; the reasoning before ``<answer>`` weighs
    ``lambda_r``, ``<answer>`` to that ``<eos>`` weighs ``lambda_o`` (and is the answer), and the decision (the token
    after ``pick`` in a trace, else the one after ``<answer>``) is further scaled by the row's ``decision_weight``.
    Built with whole-array operations (a training set of 28,000 rows is one call when :class:`DeviceBatches` is
    built)."""
    eos, answer = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER)
    pick = tokenizer.convert_tokens_to_ids("pick")
    prompts = [r["prompt_ids"] for r in rows]
    if len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts in a batch must have the same length (the prompt format is fixed-length)")
    comps = [r["completion_ids"] for r in rows]
    n, lens = len(rows), np.array([len(c) for c in comps])
    c_len = max(int(lens.max()), min_len)
    c_len = -(-c_len // multiple_of) * multiple_of
    pos = np.arange(c_len)
    real = pos < lens[:, None]                                         # [n, C]: the row's own tokens
    comp = np.full((n, c_len), eos, dtype=np.int64)
    comp[real] = np.fromiter((t for c in comps for t in c), dtype=np.int64, count=int(lens.sum()))

    def first(hit, default):
        """Per row, the first position where ``hit`` (among the row's own tokens), else ``default``."""
        hit = hit & real
        return np.where(hit.any(1), hit.argmax(1), default)

    end = first(comp == eos, lens - 1) + 1                             # up to and including the first <eos>
    start = first(comp == answer, end)                                 # the answer starts at <answer>
    weight = np.where(pos < start[:, None], np.float32(lambda_r),
                      np.where(pos < end[:, None], np.float32(lambda_o), np.float32(0))).astype(np.float32)
    is_answer = (pos >= start[:, None]) & (pos < end[:, None])
    decision = first(comp == pick, first(comp == answer, -2)) + 1      # after pick, else after <answer>; -1: none
    rows_with = np.flatnonzero((decision >= 0) & (decision < end))
    scale = np.array([float(rows[i].get("decision_weight", 1.0)) for i in rows_with], dtype=np.float32)
    weight[rows_with, decision[rows_with]] *= scale
    return Batch(torch.tensor(np.asarray(prompts, dtype=np.int64)), torch.from_numpy(comp),
                 torch.from_numpy(weight), torch.from_numpy(is_answer), torch.from_numpy(end))


def training_dicts(rows) -> list[dict]:
    """A tokenised ``datasets.Dataset`` as the list of dicts batching reads (only the columns it needs); a list of
    dicts is returned as it is."""
    if hasattr(rows, "select_columns"):
        cols = [c for c in ("prompt_ids", "completion_ids", "decision_weight") if c in rows.column_names]
        return rows.select_columns(cols).to_list()
    return rows


def iterate_batches(ds, batch_size: int, shuffle: bool, seed: int, **kw):
    """Yield :class:`Batch` objects over a tokenised dataset (length-bucketed when shuffling: less padding)."""
    import numpy as np

    rows = training_dicts(ds)
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


# ----------------------------------------------------------------------------------------------- on the device
def length_buckets(lengths, buckets: int) -> list:
    """Split rows into at most ``buckets`` groups of consecutive lengths with the least padding in total.

    Each group is padded to its longest row, so the cost of a split is sum over groups of rows x longest length;
    dynamic programming over the sorted distinct lengths finds the cheapest. Returns the row indices of each group,
    shortest group first.
    """
    import numpy as np

    lengths = np.asarray(lengths)
    values, counts = np.unique(lengths, return_counts=True)
    u, k = len(values), max(1, min(buckets, len(values)))
    before = np.concatenate([[0], np.cumsum(counts)])                  # rows with a length below values[i]
    inf = float("inf")
    cost = np.full((k + 1, u + 1), inf)                                 # cost[g, j]: first j values in g groups
    cut = np.zeros((k + 1, u + 1), dtype=int)
    cost[0, 0] = 0.0
    for g in range(1, k + 1):
        for j in range(1, u + 1):
            for i in range(j):                                          # the last group holds values i..j-1
                c = cost[g - 1, i] + (before[j] - before[i]) * values[j - 1]
                if c < cost[g, j]:
                    cost[g, j], cut[g, j] = c, i
    g = int(np.argmin(cost[1:, u])) + 1
    bounds, j = [], u
    while g > 0:
        i = cut[g, j]
        bounds.append((values[i], values[j - 1]))
        j, g = i, g - 1
    return [np.nonzero((lengths >= lo) & (lengths <= hi))[0] for lo, hi in reversed(bounds)]


class DeviceBatches:
    """A training set held on the device as padded tensors, yielding shuffled fixed-shape :class:`Batch` es.

    Built once: the rows (``prompt_ids``, ``completion_ids``; a tokenised ``datasets.Dataset`` or a list of dicts)
    are split into ``buckets`` groups by completion length (:func:`length_buckets`: the least padding), and each group
    becomes one :func:`make_batch` on the device (completions ``<eos>``-padded to the group's longest, rounded up to
    ``multiple_of``), plus one *padding row* (weight 0, length 0: every loss here ignores it). A step then only
    indexes these tensors, and there are only ``buckets`` shapes (good for ``torch.compile``).

    Epoch ``e`` draws, from a torch generator seeded ``seed + e``: a permutation of each group, cut into *global
    batches* of ``batch_size * grad_accum * world`` rows (the last of a group filled with padding rows), then the
    order of all global batches. Process ``rank`` takes micro-batches ``j * world + rank`` (``j < grad_accum``) of each
    global batch: the processes partition it, and one process with ``grad_accum * world`` micro-batches sees exactly
    the same rows. Every row appears once per epoch. Iterating yields this process's micro-batches, epoch after
    epoch, without end; ``len`` is the number of global batches (optimizer steps) per epoch.

    ``transform(batch) -> batch`` (optional) runs on every micro-batch on the device (e.g. data augmentation).
    """

    def __init__(self, rows, tokenizer, *, batch_size: int, lambda_r: float = 1.0, lambda_o: float = 1.0,
                 multiple_of: int = 1, buckets: int = 1, seed: int = 0, device="cpu", grad_accum: int = 1,
                 rank: int = 0, world: int = 1, transform=None):
        import numpy as np

        rows = training_dicts(rows)
        if not rows:
            raise ValueError("no training rows")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        lengths = np.array([-(-len(r["completion_ids"]) // multiple_of) * multiple_of for r in rows])
        self.device = torch.device(device)
        self.groups = []
        for idx in length_buckets(lengths, buckets):
            b = make_batch([rows[int(i)] for i in idx], tokenizer, lambda_r, lambda_o, multiple_of)
            pad = Batch(b.prompt[:1], torch.full_like(b.completion[:1], tokenizer.eos_token_id),
                        torch.zeros_like(b.weight[:1]), torch.zeros_like(b.is_answer[:1]),
                        torch.zeros_like(b.length[:1]))
            self.groups.append(Batch(*(torch.cat([t, p]).to(self.device) for t, p in zip(_fields(b), _fields(pad)))))
        self.sizes = [len(g) - 1 for g in self.groups]                 # real rows; index sizes[g] is the padding row
        self.batch_size, self.grad_accum, self.rank, self.world = batch_size, grad_accum, rank, world
        self.seed, self.transform = seed, transform

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    def __len__(self) -> int:
        return sum(-(-n // self.global_batch) for n in self.sizes)

    def resized(self, batch_size: int | None = None, grad_accum: int | None = None) -> "DeviceBatches":
        """The same tensors with another micro-batch size or accumulation (nothing is rebuilt)."""
        import copy

        out = copy.copy(self)
        out.batch_size = batch_size or self.batch_size
        out.grad_accum = grad_accum or self.grad_accum
        return out

    def epoch(self, e: int):
        """This process's micro-batches of epoch ``e``, in order."""
        gen = torch.Generator().manual_seed(self.seed + e)
        G = self.global_batch
        plan = []                                                       # (group, its global batches [k, G])
        for g, n in enumerate(self.sizes):
            perm = torch.cat([torch.randperm(n, generator=gen), torch.full(((-n) % G,), n)])
            plan.append(perm.to(self.device).view(-1, G))               # one host-to-device copy per group and epoch
        order = [(g, k) for g, p in enumerate(plan) for k in range(p.shape[0])]
        for i in torch.randperm(len(order), generator=gen).tolist():
            g, k = order[i]
            for j in range(self.grad_accum):
                s = (j * self.world + self.rank) * self.batch_size
                yield self.take(g, plan[g][k, s:s + self.batch_size])

    def take(self, group: int, idx: torch.Tensor) -> Batch:
        """The rows ``idx`` (a device tensor) of a length group, as a :class:`Batch` (then ``transform``)."""
        b = Batch(*(t[idx] for t in _fields(self.groups[group])))
        return self.transform(b) if self.transform is not None else b

    def __iter__(self):
        e = 0
        while True:
            yield from self.epoch(e)
            e += 1


def _fields(b: Batch):
    return b.prompt, b.completion, b.weight, b.is_answer, b.length


def chain_transforms(*transforms):
    """Batch transforms applied one after another (None entries skipped); None when there are none."""
    live = [t for t in transforms if t is not None]
    if len(live) <= 1:
        return live[0] if live else None

    def run(b: Batch) -> Batch:
        for t in live:
            b = t(b)
        return b

    return run
