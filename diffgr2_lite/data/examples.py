"""From a dataset to re-ranking examples: split, candidates, semantic IDs, teacher traces, prompts, a tokenizer.

Protocol (TIGER / GR2): each user's items in time order; the last is the **test** target, the second to last the
**validation** target, the rest is the **training part**. Training examples are the last ``train_positions`` positions
of each training part (target = that item, history = what came before). Only examples whose target is in the
retriever's top 10 are kept (the paper evaluates the same way), and histories are truncated to the last
``history_len`` items in the prompt.

Splits: ``train`` (rejection-sampled traces), ``valid`` and ``test`` (the teacher's greedy ranking, for reference),
and ``reading``: training prompts drawn from every training position, target in the top 10 or not, with the full
trace and answer but a pick drawn at random that carries no loss (``decision_weight`` 0). The part of a trace before
the pick is a function of the prompt, and the answer is a function of the check and the pick, so these rows teach
reading the prompt and writing a valid answer on several times more prompts than rejection sampling keeps, while the
decision itself is learned only from rejection-sampled traces.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from ..progress import tqdm

from ..config import Profile
from ..text import (PromptFormat, build_completion, build_prompt, build_vocabulary, item_words, make_tokenizer,
                    sid_tokens)
from .catalog import InteractionData
from .retriever import TransitionRetriever, user_folds
from .semantic_ids import SemanticIds, build_semantic_ids
from .teacher import POINT_KEYS, Teacher, TeacherStats

N_FOLDS = 4


@dataclass
class ExampleSet:
    """Everything the later stages need; ``splits`` maps 'train' / 'valid' / 'test' to a ``datasets.Dataset``."""

    data: InteractionData
    sids: SemanticIds
    fmt: PromptFormat
    tokenizer: object
    splits: dict
    teacher: Teacher
    report: dict = field(default_factory=dict)

    def sid_words(self, item: int) -> tuple[str, ...]:
        return sid_tokens(self.sids.codes[item])

    def candidate_sids(self, row) -> list[tuple[str, ...]]:
        return [self.sid_words(c) for c in row["candidates"]]

    def training_rows(self, variant: str = "reasoning"):
        """The rows every supervised stage trains on: the rejection-sampled examples and the reading examples (whose
        random pick carries no loss), with the full trace (``reasoning``) or the answer alone (``direct``)."""
        from datasets import concatenate_datasets

        cols = ["prompt_ids", "completion_ids", "decision_weight", "candidates", "teacher_ranking"]
        parts = []
        for split in ("train", "reading"):
            ds = self.splits[split]
            if variant == "direct":
                ds = ds.remove_columns("completion_ids").rename_column("direct_ids", "completion_ids")
            elif variant != "reasoning":
                raise ValueError(f"unknown AR variant {variant!r}; valid: reasoning, direct")
            parts.append(ds.select_columns(cols))
        return concatenate_datasets(parts)


def leave_one_out(sequences: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, list[int], int]],
                                                        list[tuple[int, list[int], int]]]:
    """(training parts, validation (user, history, target), test (user, history, target)). Needs >= 3 items a user."""
    train, valid, test = [], [], []
    for u, seq in enumerate(sequences):
        if len(seq) < 3:
            train.append(list(seq))
            continue
        train.append(seq[:-2])
        valid.append((u, seq[:-2], seq[-2]))
        test.append((u, seq[:-1], seq[-1]))
    return train, valid, test


def training_positions(train_parts: list[list[int]], k: int) -> list[tuple[int, list[int], int]]:
    """The last k positions of each training part with at least one item of history before them."""
    out = []
    for u, part in enumerate(train_parts):
        for t in range(len(part) - 1, max(0, len(part) - 1 - k), -1):
            out.append((u, part[:t], part[t]))
    return out


def _subsample_users(data: InteractionData, max_users: int | None, seed: int) -> InteractionData:
    if not max_users or len(data.sequences) <= max_users:
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data.sequences), max_users, replace=False))
    return InteractionData(data.name, data.catalog, [data.user_ids[i] for i in keep],
                           [data.sequences[i] for i in keep], {**data.info, "subsampled_users": max_users})


def build_examples(data: InteractionData, profile: Profile, progress: bool = True) -> ExampleSet:
    t0 = time.time()
    seed = profile.seed
    rng = np.random.default_rng(seed)
    data = _subsample_users(data, profile.max_users, seed)
    cat = data.catalog
    train_parts, valid_raw, test_raw = leave_one_out(data.sequences)
    popularity = np.bincount(np.concatenate([np.asarray(p, dtype=np.int64) for p in train_parts]), minlength=len(cat))
    sids = build_semantic_ids(cat, profile.sid_levels, popularity=popularity, seed=seed)
    fmt = PromptFormat(profile.history_len, profile.n_candidates, profile.title_words, sids.levels)
    k = profile.n_candidates

    # retrievers: one on every training part (evaluation), one per fold (cross-fitted training candidates)
    full_retriever = TransitionRetriever(len(cat)).fit(train_parts)
    folds = user_folds(len(train_parts), N_FOLDS, seed)
    fold_retrievers = [TransitionRetriever(len(cat)).fit([p for p, f in zip(train_parts, folds) if f != j])
                       for j in range(N_FOLDS)]

    def with_candidates(raw, retriever_of, keep_all=None):
        kept, total = [], 0
        for u, hist, target in tqdm(raw, disable=not progress, desc="retrieving", leave=False, mininterval=2):
            total += 1
            cands = retriever_of(u).top_k(hist, k)
            if keep_all is not None:
                keep_all.append((u, hist, cands))
            if target in cands:
                kept.append((u, hist, target, cands, cands.index(target)))
        return kept, total

    train_lists = []            # every training position's candidate list, target in it or not (reading examples)
    train_ex, n_train_pos = with_candidates(training_positions(train_parts, profile.train_positions),
                                            lambda u: fold_retrievers[folds[u]], train_lists)
    valid_ex, n_valid = with_candidates(valid_raw, lambda u: full_retriever)
    test_ex, n_test = with_candidates(test_raw, lambda u: full_retriever)

    # the teacher: category transitions from training parts, its points table fitted on (cross-fitted) training examples
    teacher = Teacher(cat, TeacherStats.fit(cat, train_parts), write_ranks=profile.trace_ranks,
                      decision_block=profile.block_size if profile.align_decision else None)
    shown = profile.history_len                  # the teacher speaks only of the history the prompt shows
    fit_idx = rng.permutation(len(train_ex))[:20000]
    teacher_train_r1 = teacher.fit_points([(train_ex[i][1][-shown:], train_ex[i][3], train_ex[i][4]) for i in fit_idx])

    sids_of = [sid_tokens(c) for c in sids.codes]
    reprs = {}                                      # item -> its words in a prompt (items recur across prompts)

    def item_repr(i):
        if i not in reprs:
            reprs[i] = item_words(sids_of[i], cat.brands[i], cat.leaf(i), cat.titles[i], profile.title_words)
        return reprs[i]

    def row(u, hist, cands, ranking, decision_weight):
        cand_sids = [sids_of[c] for c in cands]
        recent = hist[-shown:]                       # the history the prompt shows and the teacher speaks of
        return {"user": data.user_ids[u], "history": recent, "candidates": cands,
                "teacher_ranking": ranking, "decision_weight": decision_weight,
                "prompt": build_prompt(fmt, [item_repr(h) for h in recent], [item_repr(c) for c in cands]),
                "completion": build_completion(teacher.trace(recent, cands, ranking), cand_sids, ranking),
                "completion_direct": build_completion(None, cand_sids, ranking)}

    rows = {"train": [], "valid": [], "test": []}
    draws, rejected = [], 0
    for split, exs in (("train", train_ex), ("valid", valid_ex), ("test", test_ex)):
        for u, hist, target, cands, tpos in tqdm(exs, disable=not progress, desc=f"teacher {split}", leave=False,
                                                 mininterval=2):
            if split == "train":
                ranking, used = teacher.rejection_sample(hist[-shown:], cands, tpos, rng, profile.teacher_tries,
                                                         profile.teacher_temperature)
                draws.append(used)
                if ranking is None:
                    rejected += 1
                    continue
            else:
                ranking = teacher.rank(hist[-shown:], cands)                  # greedy, and blind to the target
            rows[split].append({**row(u, hist, cands, ranking, 1.0), "target": int(target), "target_pos": int(tpos)})
    # reading examples: training prompts drawn from every training position (target known or not) with the full
    # trace and answer, but a pick drawn uniformly at random that carries no loss (decision_weight 0): they teach
    # reading the prompt and writing the answer that follows a pick, never the pick itself
    n_read = min(len(train_lists), int(round(profile.reading_ratio * len(rows["train"]))))
    rows["reading"] = []
    for i in np.sort(rng.choice(len(train_lists), n_read, replace=False)):
        u, hist, cands = train_lists[i]
        points = teacher.scores(hist[-shown:], cands)
        ranking = teacher.ranking(points, int(rng.integers(len(cands))))
        rows["reading"].append({**row(u, hist, cands, ranking, 0.0), "target": -1, "target_pos": -1})
    # evaluation splits are capped (deterministically) to keep every stage's evaluation fast
    for split in ("valid", "test"):
        if len(rows[split]) > profile.max_eval:
            keep = np.sort(np.random.default_rng(seed + 1).choice(len(rows[split]), profile.max_eval, replace=False))
            rows[split] = [rows[split][i] for i in keep]

    from datasets import Dataset

    splits = {s: Dataset.from_list(r) for s, r in rows.items()}
    vocab = build_vocabulary([r["prompt"] + " " + r["completion"] for s in ("train", "reading") for r in rows[s]] +
                             [r["prompt"] for s in ("valid", "test") for r in rows[s]], sids.codebook_sizes,
                             n_labels=profile.n_candidates)
    tok = make_tokenizer(vocab)
    report = {
        "dataset": data.name, "stats": data.stats(), "sid": sids.uniqueness(),
        "positions": {"train": n_train_pos, "valid": n_valid, "test": n_test},
        "hit_rate@10": {"train": len(train_ex) / max(1, n_train_pos), "valid": len(valid_ex) / max(1, n_valid),
                        "test": len(test_ex) / max(1, n_test)},
        "examples": {s: len(r) for s, r in rows.items()},
        "rejection": {"kept": len(rows["train"]), "rejected": rejected,
                      "mean_draws": float(np.mean(draws)) if draws else 0.0, "tries": profile.teacher_tries,
                      "temperature": profile.teacher_temperature},
        "teacher_points": dict(zip(POINT_KEYS, map(int, teacher.points))), "teacher_train_recall@1": teacher_train_r1,
        "prompt_tokens": fmt.prompt_len, "vocab_size": len(vocab), "seconds": time.time() - t0,
    }
    return ExampleSet(data, sids, fmt, tok, splits, teacher, report)
