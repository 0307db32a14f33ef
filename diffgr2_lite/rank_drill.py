"""Rank drill: training rows whose check is drawn at random, so that counting the ranks cannot be memorised.

After the check (every candidate's tags and points) and the pick, the trace writes every candidate's **rank**: the
pick is ``#1``, any other candidate is one more than the number of others ahead of it (more points, or as many and
earlier in the retriever's order). Ranks are a function of the check's points and the pick alone. A model trained on
the teacher's rows sees each training prompt's point pattern many times over 16 epochs, and it can learn the ranks
of the patterns it has seen instead of the count: real prompts mostly have one or two candidates with points, and
a free-running model that miscounts writes a duplicated candidate (notebook 02's failure table: every invalid
answer of the reasoning model carries broken ranks).

A drilled row keeps its prompt and pick, and replaces each candidate's check entry (tag columns and points) with an
entry drawn at random from any row of the batch; the ranks and the answer are then recomputed from the new points,
exactly as the teacher ranks (:meth:`data.teacher.Teacher.ranking`), the answer's SIDs copied from the prompt. The
new check says nothing true about the prompt, so its tokens (and the pick) carry **no loss**: the model is never
taught to write a wrong check, only to count and copy from whatever check is in its context. Drawn afresh at every
step, the point patterns never repeat, as relabelling (:mod:`copy_warmup`) makes the SID codes never repeat.

Everything is done on the device, with no read-back to the host, as a :class:`~diffgr2_lite.batches.DeviceBatches`
transform. It relies on the trace's fixed width: the check, pick, ranks and answer sit at the same completion
positions in every reasoning row (:class:`TraceLayout`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .text import ANSWER, label_token, label_token_ids


PICK_KEY = 1 << 30          # the pick's sort key: above any candidate's points * N + N


@dataclass(frozen=True)
class TraceLayout:
    """Completion positions of a fixed-width trace: each candidate's check entry, the pick, the ranks, the answer."""

    check_word: int        # index of the word "check"
    entry_width: int       # label, tag columns, points, ';'
    pick_word: int         # index of the word "pick" (the decision is the next token)
    ranks_word: int        # index of the word "ranks" (the N ranks follow)
    answer_at: int         # index of <answer> (N items of label + SID follow)
    n_candidates: int
    sid_len: int

    @classmethod
    def from_completion(cls, words: list[str], n_candidates: int, sid_len: int) -> "TraceLayout":
        """Read the layout off one reasoning completion (a list of words); a clear error when it is not one."""
        need = ("check", "pick", "ranks", ANSWER)
        missing = [w for w in need if w not in words]
        if missing:
            raise ValueError(f"a rank drill needs a trace with a check, pick and ranks; missing {missing}")
        check = words.index("check")
        first, second = label_token(0), label_token(1)
        width = words.index(second, check) - words.index(first, check)
        layout = cls(check, width, words.index("pick"), words.index("ranks"), words.index(ANSWER), n_candidates,
                     sid_len)
        if layout.entries_end > layout.pick_word or words[check + 1] != first:
            raise ValueError("the check does not have one fixed-width entry per candidate")
        return layout

    @property
    def entries_end(self) -> int:
        return self.check_word + 1 + self.n_candidates * self.entry_width

    def entry_positions(self) -> list[list[int]]:
        """Per candidate, the positions of its tag columns and points (label and ';' excluded)."""
        start = self.check_word + 1
        return [[start + k * self.entry_width + j for j in range(1, self.entry_width - 1)]
                for k in range(self.n_candidates)]

    def answer_positions(self) -> list[list[int]]:
        """Per answer item, the positions of its label and SID codes."""
        item = 1 + self.sid_len
        return [[self.answer_at + 1 + k * item + j for j in range(item)] for k in range(self.n_candidates)]


def drill_ranks(prompt: torch.Tensor, completion: torch.Tensor, weight: torch.Tensor, *, layout: TraceLayout,
                eligible_ids: tuple[int, int], points_of: torch.Tensor, label_pos_of: torch.Tensor,
                label_ids: torch.Tensor, rank_ids: torch.Tensor, sid_positions: torch.Tensor, share: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drill a ``share`` of the rows (see the module docstring). Returns the new (completion, weight).

    ``points_of`` / ``label_pos_of``: per token id, the number it writes / the candidate position of a label (-1 for
    any other token); ``label_ids`` / ``rank_ids``: the tokens ``[1]``..``[N]`` / ``#1``..``#N``; ``sid_positions``:
    the prompt positions of each candidate's SID [N, sid_len]; ``eligible_ids``: the ids of "check" and "ranks",
    which mark a reasoning row. Rows that are not drawn, or are no reasoning row, come back unchanged.
    """
    n_rows, n = completion.shape[0], layout.n_candidates
    dev = completion.device
    if completion.shape[1] < layout.answer_at + 1 + n * (1 + layout.sid_len):
        return completion, weight                                   # too short to hold a trace: a direct batch
    eligible = (completion[:, layout.check_word] == eligible_ids[0]) & \
               (completion[:, layout.ranks_word] == eligible_ids[1])
    chosen = eligible & (torch.rand(n_rows, generator=generator, device=dev) < share)

    entry_pos = torch.tensor(layout.entry_positions(), device=dev)                      # [N, E]
    entries = completion[:, entry_pos]                                                  # [B, N, E]
    src_row = torch.randint(0, n_rows, (n_rows, n), generator=generator, device=dev)
    src_pos = torch.randint(0, n, (n_rows, n), generator=generator, device=dev)
    drawn = entries[src_row, src_pos]                                                   # [B, N, E]
    drawn = torch.where(eligible[src_row][..., None], drawn, entries)                   # only real entries

    # the teacher's ranking: the pick first, then by points, ties in the retriever's order
    points = points_of[drawn[..., -1]].clamp(min=0)                                     # [B, N]
    pick = label_pos_of[completion[:, layout.pick_word + 1]].clamp(min=0)               # [B]
    position = torch.arange(n, device=dev)
    key = points * n + (n - 1 - position)
    key = torch.where(position == pick[:, None], PICK_KEY, key)
    order = key.argsort(dim=1, descending=True)                                         # [B, N] positions, best first
    place = order.argsort(dim=1)                                                        # [B, N] rank - 1 per position

    new = completion.clone()
    new[:, entry_pos] = drawn
    ranks_at = torch.arange(layout.ranks_word + 1, layout.ranks_word + 1 + n, device=dev)
    new[:, ranks_at] = rank_ids[place]
    sids = prompt[:, sid_positions]                                                     # [B, N, L]
    items = torch.cat([label_ids[order][..., None], sids.gather(1, order[..., None].expand_as(sids))], -1)
    answer_pos = torch.tensor(layout.answer_positions(), device=dev)
    new[:, answer_pos] = items

    silent = torch.zeros_like(weight[0], dtype=torch.bool)
    silent[layout.check_word + 1: layout.entries_end] = True                             # the drawn check
    silent[layout.pick_word + 1] = True                                                  # the decision
    new_weight = torch.where(silent, torch.zeros_like(weight), weight)
    return (torch.where(chosen[:, None], new, completion),
            torch.where(chosen[:, None], new_weight, weight))


def rank_drill_transform(tokenizer, fmt, reference_words: list[str], share: float, seed: int = 0, device="cpu"):
    """A :class:`~diffgr2_lite.batches.DeviceBatches` transform drilling a ``share`` of each batch's rows
    (:func:`drill_ranks`); ``reference_words``: one reasoning completion, for the layout. None when ``share`` is 0."""
    from .batches import Batch

    if share <= 0:
        return None
    layout = TraceLayout.from_completion(reference_words, fmt.n_candidates, fmt.sid_len)
    dev = torch.device(device)
    vocab = tokenizer.get_vocab()
    points_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
    label_pos_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for word, i in vocab.items():
        if word.isdigit():
            points_of[i] = int(word)
    labels = label_token_ids(tokenizer, fmt.n_candidates)
    label_pos_of[labels] = torch.arange(fmt.n_candidates)
    ranks = tokenizer.convert_tokens_to_ids([f"#{k + 1}" for k in range(fmt.n_candidates)])
    if tokenizer.unk_token_id in ranks:
        raise ValueError("the vocabulary has no rank tokens #1..#N: a rank drill needs traces with ranks")
    tensors = dict(points_of=points_of.to(dev), label_pos_of=label_pos_of.to(dev),
                   label_ids=torch.tensor(labels, device=dev), rank_ids=torch.tensor(ranks, device=dev),
                   sid_positions=torch.tensor(fmt.candidate_sid_positions, device=dev))
    ids = tuple(tokenizer.convert_tokens_to_ids(["check", "ranks"]))
    gen = torch.Generator(device=dev).manual_seed(seed)

    def transform(b: Batch) -> Batch:
        completion, weight = drill_ranks(b.prompt, b.completion, b.weight, layout=layout, eligible_ids=ids,
                                         share=share, generator=gen, **tensors)
        return Batch(b.prompt, completion, weight, b.is_answer, b.length)

    return transform


def chain(*transforms):
    """Transforms applied one after another (None entries skipped); None when there are none."""
    live = [t for t in transforms if t is not None]
    if not live:
        return None
    if len(live) == 1:
        return live[0]

    def run(b):
        for t in live:
            b = t(b)
        return b

    return run


def augmentations(profile, ex, seed: int, drill: bool = True):
    """The row augmentations of SFT (``drill``) and CFT (``drill=False``, see :func:`cft._fit_cft`): the profile's
    rank drill (reasoning rows only), then its relabelled and colliding shares
    (:func:`copy_warmup.relabel_transform`). None when there are none."""
    from .copy_warmup import relabel_transform
    from .train import process_device

    dev = process_device(profile.device)
    drilled = None
    if drill and profile.rank_drill_share > 0:
        reference = ex.splits["train"][0]["completion"].split()
        drilled = rank_drill_transform(ex.tokenizer, ex.fmt, reference, profile.rank_drill_share, seed + 1000, dev)
    return chain(drilled, relabel_transform(ex.tokenizer, ex.fmt, profile.relabel_share, seed, dev,
                                            profile.collide_share))
