"""Copy warm-up: teach a from-scratch model to copy candidate SIDs before it learns to rank them.

GR2 mid-trains its 8B backbone on semantic IDs before SFT. Our ~14M-parameter model starts from random weights, and
the first skill a valid answer needs is *copying*: after writing ``<a_178>`` it must find the candidate that starts
with ``<a_178>`` in the prompt and write that candidate's next code, and so on. This is an induction-head circuit,
and a small model finds it only after many steps. Two things make it hard here:

* codes collide: among the 20 items of a prompt, several share a first-level code, so after ``<a_178>`` the next
  code is ambiguous (a genuine choice when both items are candidates; an out-of-set ID when one is a history item);
* one wrong code makes the whole ranking invalid, so per-token copy accuracy must be close to 100%.

The warm-up task: every training prompt, with an answer that is its 10 candidates in a *fresh random order* each
time. The order is unpredictable, so the only way to lower the loss is to copy. Half the rows (``copy_structured``)
take the shape of the teacher's answers instead: a random handful of candidates first, then the others in prompt
order, which trains skipping what is already written (the first full run with random orders alone still wrote
duplicates in that part of its answers). Batches are drawn on the device
from two tensors (prompts and candidate codes): no Python collation, so thousands of steps cost about a minute on a
GPU.

A perfect copier still pays for the order: on a fully random row the ``k``-th SID's first code is one of
``11 - k`` equally likely candidates, so its loss per answer token cannot go below ``log(10!) / answer_len``
(:func:`copy_floor`).
:func:`copy_accuracy` measures what matters for validity: how often the codes after a SID's first are right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .text import ANSWER, END_ANSWER


def copy_floor(n_candidates: int, answer_len: int) -> float:
    """Mean loss per answer token of a perfect copier when the order is uniformly random: log(n!) / answer_len."""
    return math.lgamma(n_candidates + 1) / answer_len


def random_answers(cand_ids: torch.Tensor, tokenizer, generator: torch.Generator | None = None,
                   structured: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``<answer> SID x N </answer> <eos>`` with the candidates of each row in a random order. ``cand_ids``: [B, N, L].

    A ``structured`` share of rows instead gets "k random picks, then the others in prompt order" (k uniform in
    0..N-1): the shape of the teacher's answers (picks, then the rest as retrieved), which needs the skill SFT
    answers fail at most: writing the rest in order while skipping what was already written.
    Returns (answers [B, N*L+3], fully_random [B] bool).
    """
    b, n, L = cand_ids.shape
    dev = cand_ids.device
    order = torch.rand(b, n, generator=generator, device=dev).argsort(1)
    fully_random = torch.rand(b, generator=generator, device=dev) >= structured
    k = torch.randint(0, n, (b,), generator=generator, device=dev)
    k = torch.where(fully_random, torch.full_like(k, n), k)
    rank = order.argsort(1)                                         # rank[c] = where candidate c sits in ``order``
    key = torch.where(rank < k[:, None], rank, n + torch.arange(n, device=dev))
    order = key.argsort(1)                                          # the first k of ``order``, then the rest by index
    sids = cand_ids.gather(1, order[:, :, None].expand(b, n, L)).flatten(1)

    def col(token_id):
        return torch.full((b, 1), token_id, dtype=torch.long, device=dev)

    open_, close = tokenizer.convert_tokens_to_ids(ANSWER), tokenizer.convert_tokens_to_ids(END_ANSWER)
    return torch.cat([col(open_), sids, col(close), col(tokenizer.eos_token_id)], 1), fully_random


def copy_positions(n_candidates: int, sid_len: int, device=None) -> torch.Tensor:
    """[answer_len] bool: the answer positions whose token is a copy (every SID code after the first)."""
    inner = torch.arange(n_candidates * sid_len, device=device) % sid_len != 0
    false = torch.zeros(1, dtype=torch.bool, device=device)
    return torch.cat([false, inner, false, false])


def copy_stats(logits: torch.Tensor, answers: torch.Tensor, sid_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token accuracy at copy positions, fraction of rows with every copy right) as device scalars, greedy argmax."""
    n = (answers.shape[1] - 3) // sid_len
    where = copy_positions(n, sid_len, answers.device)
    right = logits.argmax(-1) == answers
    acc = (right & where).sum() / (where.sum() * right.shape[0])
    return acc, (right | ~where).all(1).float().mean()


def copy_accuracy(logits: torch.Tensor, answers: torch.Tensor, sid_len: int) -> tuple[float, float]:
    """:func:`copy_stats` as numbers."""
    acc, whole = copy_stats(logits, answers, sid_len)
    return acc.item(), whole.item()


class CopyTask:
    """The copy task as a sampler on the device: :meth:`batches` draws prompts and fresh random answers.

    A batch is (prompts, answers, fully_random): which rows have fully random orders (only those are bounded by
    :func:`copy_floor`). Nothing here reads a value back to the host, so a training step never waits for the GPU."""

    def __init__(self, prompts: torch.Tensor, cand_ids: torch.Tensor, tokenizer, device, seed: int = 0,
                 structured: float = 0.0):
        self.prompts, self.cand_ids = prompts.to(device), cand_ids.to(device)
        self.structured = structured
        self.tokenizer, self.device, self.seed = tokenizer, device, seed
        self.sid_len = cand_ids.shape[2]
        self.floor = copy_floor(cand_ids.shape[1], cand_ids.shape[1] * self.sid_len + 3)

    def batches(self, n: int, rank: int = 0):
        """Endless batches of ``n`` rows, drawn with a generator seeded ``seed + rank`` (each process its own)."""
        gen = torch.Generator(device=self.prompts.device).manual_seed(self.seed + rank)
        while True:
            idx = torch.randint(len(self.prompts), (n,), generator=gen, device=self.prompts.device)
            answers, fully_random = random_answers(self.cand_ids[idx], self.tokenizer, gen, self.structured)
            yield self.prompts[idx], answers, fully_random


def copy_loss_fn(sid_len: int):
    """``loss_fn(model, batch)`` of the copy task for :meth:`~diffgr2_lite.train.Trainer.fit`: the mean answer-token
    cross-entropy, with the loss of the fully random rows and the copy accuracies to log."""
    from .ar import completion_logits

    def loss_fn(model, batch):
        prompts, answers, fully_random = batch
        logits = completion_logits(model, prompts, answers)
        ce = F.cross_entropy(logits.float().flatten(0, 1), answers.flatten(), reduction="none").view_as(answers)
        acc, whole = copy_stats(logits.detach(), answers, sid_len)
        rand = fully_random.float()[:, None]
        random_order = (ce.detach() * rand).sum() / (rand.sum() * ce.shape[1])          # nan when no row is random
        return {"loss": ce.mean(), "random_order_loss": random_order, "copy_acc": acc, "all_copied": whole}

    return loss_fn


def train_copy(model, task: CopyTask, *, steps: int, batch_size: int, lr: float, log_every: int = 50,
               desc: str = "SID copy warm-up", compile="auto") -> dict:
    """AdamW with warm-up + cosine decay on the copy task, through the one training loop (:mod:`diffgr2_lite.train`).

    Returns, every ``log_every`` steps, the mean loss, the loss of the fully random rows and the copy accuracies, and
    the floor a perfect copier would reach. ``batch_size`` rows per process and step.
    """
    from .train import Trainer

    trainer = Trainer(model, lr=lr, total_steps=steps, weight_decay=0.01, log_every=log_every, device=task.device,
                      compile=compile, desc=desc)
    hist = trainer.fit(task.batches(batch_size, trainer.rank), copy_loss_fn(task.sid_len), keep_best=False)
    hist["floor"] = task.floor
    return hist


# ----------------------------------------------------------------------------------------------- relabelling
def relabel_sids(prompt: torch.Tensor, completion: torch.Tensor, ranges: list[tuple[int, int]],
                 generator: torch.Generator | None = None, share: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rename every SID code of a row through one random bijection per level, in the prompt and completion alike.

    ``ranges``: (first token id, count) of each SID level (:func:`text.sid_token_ranges`). A ``share`` of the rows is
    relabelled (the others are returned unchanged). The ranking, the labels and every word stay the same; only which
    codes name which item changes, so a row can no longer be answered from memory of its items: the model must copy.
    """
    n = prompt.shape[0]
    ids = torch.cat([prompt, completion], 1)
    out = ids.clone()
    rows = torch.rand(n, generator=generator, device=ids.device) < share
    for first, count in ranges:
        perm = torch.rand(n, count, generator=generator, device=ids.device).argsort(1) + first
        in_level = (ids >= first) & (ids < first + count) & rows[:, None]
        out = torch.where(in_level, perm.gather(1, (ids - first).clamp(0, count - 1)), out)
    return out[:, :prompt.shape[1]], out[:, prompt.shape[1]:]


# ----------------------------------------------------------------------------------------------- the gate
@torch.no_grad()
def answer_validity(model, rows: list[dict], example_set, device, batch_size: int = 256) -> dict:
    """Free-running validity of the answer alone: given the prompt and the teacher's trace up to ``<answer>``, decode
    the rest greedily (no constraint) and parse it.

    Returns ``valid`` (share of valid permutations) and ``follows`` (share whose ranking is exactly the one the
    trace's check and pick determine). This isolates writing the answer from reasoning: the copy skill the warm-up
    must reach before SFT starts.
    """
    from .ar import ar_decode, autocast
    from .text import decode_tokens, parse_ranking

    tok = example_set.tokenizer
    answer_id = tok.convert_tokens_to_ids(ANSWER)
    prefixes = [r["prompt_ids"] + r["completion_ids"][: r["completion_ids"].index(answer_id) + 1] for r in rows]
    answer_len = example_set.fmt.answer_len
    valid = follows = 0
    for length in sorted({len(p) for p in prefixes}):                 # fixed-width traces: one group in practice
        group = [i for i, p in enumerate(prefixes) if len(p) == length]
        for s in range(0, len(group), batch_size):
            idx = group[s:s + batch_size]
            x = torch.tensor([prefixes[i] for i in idx], dtype=torch.long, device=device)
            with autocast(device):
                out = ar_decode(model, x, answer_len - 1, tok.eos_token_id)["tokens"]
            for i, ids in zip(idx, out.tolist()):
                parsed = parse_ranking([ANSWER, *decode_tokens(tok, ids)], example_set.candidate_sids(rows[i]))
                valid += parsed.valid
                follows += parsed.valid and parsed.ranking == list(rows[i]["teacher_ranking"])
    n = max(1, len(rows))
    return {"valid": valid / n, "follows": follows / n, "n": len(rows)}
