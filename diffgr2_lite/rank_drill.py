"""Rank drill: training rows whose check is drawn at random, so that the ranks must be counted, not recalled.

After the check (every candidate's tags and points) and the pick, the trace writes every candidate's **rank**: the
pick is ``#1``, any other candidate is one more than the number of others ahead of it (more points, or as many and
earlier in the retriever's order). Ranks are a function of the check's points and the pick alone. SFT shows the
same training checks (about 28,000 in the full profile) 16 times each, and a model can learn the ranks of the point
patterns it has seen instead of the count; a free-running model that miscounts writes a candidate twice (notebook
02's failure table: in the full run every invalid answer of the reasoning model carried broken ranks).

A drilled row keeps its prompt and pick and replaces each candidate's check entry (tag columns and points) with an
entry drawn at random from the batch's reasoning rows (a draw that lands on another kind of row keeps the
candidate's own entry); the ranks and the answer are then recounted from the new points exactly as the teacher ranks
(:meth:`data.teacher.Teacher.ranking`), the answer's SIDs copied from the prompt. The drawn check says nothing true
about the prompt, so its tokens (and the pick) carry **no loss**: the model is never taught to write a wrong check,
only to count and copy from whatever check is in its context. Drawn afresh at every step, a drilled check almost
never repeats, as relabelling (:mod:`copy_warmup`) makes the SID codes almost never repeat.

Everything runs on the device, as a :class:`~diffgr2_lite.batches.DeviceBatches` transform whose index tensors are
moved there once, so a step never waits for the host. It relies on the trace's fixed width: the check, pick, ranks
and answer sit at the same completion positions in every reasoning row (:class:`TraceLayout`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data.teacher import rank_tokens
from .text import ANSWER, END_ANSWER, label_token, label_token_ids

PICK_KEY = 1 << 30          # the pick's sort key: above any candidate's points * N + N


@dataclass(frozen=True)
class TraceLayout:
    """Completion positions of a fixed-width trace: each candidate's check entry, the pick, the ranks, the answer."""

    check_word: int        # index of the word "check" (each entry: label, tag columns, points, ';')
    entry_width: int
    pick_word: int         # index of the word "pick" (the decision is the next token)
    ranks_word: int        # index of the word "ranks" (the N ranks follow)
    answer_at: int         # index of <answer> (N items of label + SID follow, then </answer>)
    n_candidates: int
    sid_len: int

    @classmethod
    def from_completion(cls, words: list[str], n_candidates: int, sid_len: int) -> "TraceLayout":
        """Read the layout off one reasoning completion (a list of words); a clear error when it is not one."""
        missing = [w for w in ("step3", "check", "pick", "ranks", ANSWER) if w not in words]
        if missing:
            raise ValueError(f"a rank drill needs a trace with a check, pick and ranks; missing {missing}")
        check = words.index("check", words.index("step3"))      # searched from step 3: no brand can shift it
        pick = words.index("pick", check)
        first, second = label_token(0), label_token(1)
        width = words.index(second, check) - words.index(first, check)
        layout = cls(check, width, pick, words.index("ranks", pick), words.index(ANSWER, pick), n_candidates, sid_len)
        if words[check + 1] != first or layout.entries_end > pick:
            raise ValueError("the check does not have one fixed-width entry per candidate")
        if layout.end_answer >= len(words) or words[layout.end_answer] != END_ANSWER:
            raise ValueError(f"the answer is not {n_candidates} items of a label and {sid_len} SID codes")
        return layout

    @property
    def entries_end(self) -> int:
        return self.check_word + 1 + self.n_candidates * self.entry_width

    @property
    def end_answer(self) -> int:
        """Index of </answer>."""
        return self.answer_at + 1 + self.n_candidates * (1 + self.sid_len)

    def entry_positions(self) -> list[list[int]]:
        """Per candidate, the positions of its tag columns and points (label and ';' excluded)."""
        start = self.check_word + 1
        return [[start + k * self.entry_width + j for j in range(1, self.entry_width - 1)]
                for k in range(self.n_candidates)]

    def rank_positions(self) -> list[int]:
        return list(range(self.ranks_word + 1, self.ranks_word + 1 + self.n_candidates))

    def answer_positions(self) -> list[list[int]]:
        """Per answer item, the positions of its label and SID codes."""
        item = 1 + self.sid_len
        return [[self.answer_at + 1 + k * item + j for j in range(item)] for k in range(self.n_candidates)]

    def silent_positions(self) -> list[int]:
        """What a drilled row gives no loss: the drawn check (labels and ';' too) and the decision after ``pick``."""
        return [*range(self.check_word + 1, self.entries_end), self.pick_word + 1]


@dataclass
class DrillTensors:
    """What :func:`drill_ranks` indexes with, built and moved to the device once (:func:`rank_drill_transform`)."""

    layout: TraceLayout
    marks: torch.Tensor          # [4] ids of "check", "pick", "ranks", "</answer>": where a reasoning row has them
    mark_positions: torch.Tensor  # [4] their completion positions
    points_of: torch.Tensor      # [V] the number a token writes, -1 for any other token
    label_pos_of: torch.Tensor   # [V] the candidate position a label names, -1 for any other token
    label_ids: torch.Tensor      # [N] the tokens [1]..[N]
    rank_ids: torch.Tensor       # [N] the tokens #1..#N
    sid_positions: torch.Tensor  # [N, L] prompt positions of each candidate's SID
    entries: torch.Tensor        # [N, E] completion positions of each check entry's tags and points
    ranks: torch.Tensor          # [N] completion positions of the ranks
    answer: torch.Tensor         # [N, 1 + L] completion positions of each answer item
    silent: torch.Tensor         # [S] completion positions with no loss in a drilled row


def teacher_order(points: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """Candidate positions best first, as :meth:`data.teacher.Teacher.ranking` orders them: the pick, then the others
    by points, ties in the retriever's order. ``points``: [B, N] whole numbers; ``pick``: [B] positions."""
    n = points.shape[1]
    position = torch.arange(n, device=points.device)
    key = points * n + (n - 1 - position)                        # more points first; as many: the earlier first
    key = torch.where(position == pick[:, None], PICK_KEY, key)  # the pick is #1
    return key.argsort(dim=1, descending=True)


def numbers_of_tokens(tokenizer) -> torch.Tensor:
    """[V]: the whole number each token writes (``'10'`` -> 10), -1 for any other token."""
    out = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for word, i in tokenizer.get_vocab().items():
        if word.isascii() and word.isdigit():
            out[i] = int(word)
    return out


def drill_ranks(prompt: torch.Tensor, completion: torch.Tensor, weight: torch.Tensor, t: DrillTensors, share: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drill a ``share`` of the reasoning rows (see the module docstring). Returns the new (completion, weight).

    Rows that are not drawn, or are no reasoning row (a direct answer, a padding row), come back unchanged.
    """
    n_rows, n = completion.shape[0], t.layout.n_candidates
    dev = completion.device
    if completion.shape[1] <= t.layout.end_answer:
        return completion, weight                                   # too short to hold a trace: a direct batch
    reasoning = (completion[:, t.mark_positions] == t.marks).all(1)
    chosen = reasoning & (torch.rand(n_rows, generator=generator, device=dev) < share)

    entries = completion[:, t.entries]                                                  # [B, N, E]
    src_row = torch.randint(0, n_rows, (n_rows, n), generator=generator, device=dev)
    src_pos = torch.randint(0, n, (n_rows, n), generator=generator, device=dev)
    drawn = torch.where(reasoning[src_row][..., None], entries[src_row, src_pos], entries)   # real entries only

    points = t.points_of[drawn[..., -1]].clamp(min=0)                                   # [B, N]
    pick = t.label_pos_of[completion[:, t.layout.pick_word + 1]].clamp(min=0)           # [B]
    order = teacher_order(points, pick)                                                 # [B, N] positions, best first
    place = order.argsort(dim=1)                                                        # [B, N] rank - 1 per position

    new = completion.clone()
    new[:, t.entries] = drawn
    new[:, t.ranks] = t.rank_ids[place]
    sids = prompt[:, t.sid_positions]                                                   # [B, N, L]
    new[:, t.answer] = torch.cat([t.label_ids[order][..., None],
                                  sids.gather(1, order[..., None].expand_as(sids))], -1)
    new_weight = weight.clone()
    new_weight[:, t.silent] = 0
    return (torch.where(chosen[:, None], new, completion),
            torch.where(chosen[:, None], new_weight, weight))


def rank_drill_transform(tokenizer, fmt, reference_words: list[str], share: float, seed: int = 0, device="cpu"):
    """A :class:`~diffgr2_lite.batches.DeviceBatches` transform drilling a ``share`` of each batch's rows
    (:func:`drill_ranks`); ``reference_words``: one reasoning completion, for the layout. None when ``share`` is 0."""
    from .batches import Batch

    if share <= 0:
        return None
    layout = TraceLayout.from_completion(reference_words, fmt.n_candidates, fmt.sid_len)
    ranks = tokenizer.convert_tokens_to_ids(rank_tokens(list(range(fmt.n_candidates))))   # #1 .. #N
    if tokenizer.unk_token_id in ranks:
        raise ValueError("the vocabulary has no rank tokens #1..#N: a rank drill needs traces with ranks")
    labels = label_token_ids(tokenizer, fmt.n_candidates)
    label_pos_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
    label_pos_of[labels] = torch.arange(fmt.n_candidates)
    dev = torch.device(device)
    t = DrillTensors(
        layout=layout,
        marks=torch.tensor(tokenizer.convert_tokens_to_ids(["check", "pick", "ranks", END_ANSWER])),
        mark_positions=torch.tensor([layout.check_word, layout.pick_word, layout.ranks_word, layout.end_answer]),
        points_of=numbers_of_tokens(tokenizer), label_pos_of=label_pos_of, label_ids=torch.tensor(labels),
        rank_ids=torch.tensor(ranks),
        sid_positions=torch.tensor(fmt.candidate_sid_positions), entries=torch.tensor(layout.entry_positions()),
        ranks=torch.tensor(layout.rank_positions()), answer=torch.tensor(layout.answer_positions()),
        silent=torch.tensor(layout.silent_positions()))
    for name, value in vars(t).items():
        if isinstance(value, torch.Tensor):
            setattr(t, name, value.to(dev))                                # once, not at every step
    gen = torch.Generator(device=dev).manual_seed(seed)

    def transform(b: Batch) -> Batch:
        completion, weight = drill_ranks(b.prompt, b.completion, b.weight, t, share, gen)
        return Batch(b.prompt, completion, weight, b.is_answer, b.length)

    return transform


def augmentations(profile, ex, seed: int, drill: bool = True):
    """The row augmentations of SFT (``drill``) and CFT (``drill=False``, see :func:`cft._fit_cft`): the profile's
    rank drill (reasoning rows only), then its relabelled and colliding shares
    (:func:`copy_warmup.relabel_transform`). None when there are none."""
    from .batches import chain_transforms
    from .copy_warmup import relabel_transform
    from .train import process_device

    dev = process_device(profile.device)
    drilled = None
    if drill and profile.rank_drill_share > 0:
        reference = ex.splits["train"][0]["completion"].split()
        drilled = rank_drill_transform(ex.tokenizer, ex.fmt, reference, profile.rank_drill_share, seed + 1000, dev)
    return chain_transforms(drilled, relabel_transform(ex.tokenizer, ex.fmt, profile.relabel_share, seed, dev,
                                                       profile.collide_share))
