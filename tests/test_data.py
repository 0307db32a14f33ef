"""Data: the synthetic generator, the leave-one-out protocol, cross-fitted candidates, semantic IDs, teacher traces,
and profile look-up errors."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import pytest

from diffgr2_lite.config import PROFILES, ConfigError, get_profile
from diffgr2_lite.data import examples as examples_mod
from diffgr2_lite.data.examples import build_examples, leave_one_out, training_positions
from diffgr2_lite.data.retriever import TransitionRetriever, user_folds
from diffgr2_lite.data.synthetic import generate_synthetic
from diffgr2_lite.text import EOS, UNK, encode, parse_ranking


@pytest.fixture(scope="module")
def profile():
    return get_profile("smoke", synthetic_users=300)


@pytest.fixture(scope="module")
def data(profile):
    return generate_synthetic(profile.synthetic_users, profile.synthetic_items, seed=profile.seed)


@pytest.fixture(scope="module")
def ex(data, profile):
    return build_examples(data, profile, progress=False)


def full_history(ex, row, split):
    """The user's whole history before the row's target, recomputed from the raw sequence."""
    u = ex.data.user_ids.index(row["user"])
    seq = ex.data.sequences[u]
    if split == "train":
        part = seq[:-2]
        t = part.index(row["target"])
        return u, part[:t]
    if split == "valid":
        assert row["target"] == seq[-2]
        return u, seq[:-2]
    assert row["target"] == seq[-1]
    return u, seq[:-1]


# ----------------------------------------------------------------------------------------------- synthetic
def test_generate_synthetic_deterministic_by_seed():
    a = generate_synthetic(120, 150, seed=3)
    b = generate_synthetic(120, 150, seed=3)
    c = generate_synthetic(120, 150, seed=4)
    assert a.sequences == b.sequences and a.user_ids == b.user_ids
    assert a.catalog.titles == b.catalog.titles and a.catalog.brands == b.catalog.brands
    assert a.sequences != c.sequences


def test_generate_synthetic_sequences(data):
    n_items = len(data.catalog)
    assert len(data.sequences) == len(data.user_ids) > 200
    for seq in data.sequences:
        assert len(seq) >= 5
        assert len(set(seq)) == len(seq)                   # no repeats within a user
        assert all(0 <= i < n_items for i in seq)
    assert len(set(data.user_ids)) == len(data.user_ids)
    s = data.stats()
    assert s["min_length"] >= 5 and s["users"] == len(data.sequences)


# ----------------------------------------------------------------------------------------------- protocol
def test_leave_one_out_hand_case():
    seqs = [[1, 2, 3, 4, 5], [7, 8, 9], [4, 6], [2]]
    train, valid, test = leave_one_out(seqs)
    assert train == [[1, 2, 3], [7], [4, 6], [2]]
    assert valid == [(0, [1, 2, 3], 4), (1, [7], 8)]
    assert test == [(0, [1, 2, 3, 4], 5), (1, [7, 8], 9)]
    assert training_positions(train, 2) == [(0, [1, 2], 3), (0, [1], 2), (2, [4], 6)]
    assert training_positions(train, 5) == [(0, [1, 2], 3), (0, [1], 2), (2, [4], 6)]
    assert training_positions(train, 1) == [(0, [1, 2], 3), (2, [4], 6)]


def test_leave_one_out_invariants(data):
    train, valid, test = leave_one_out(data.sequences)
    assert len(train) == len(data.sequences) == len(valid) == len(test)
    valid_of = {u: t for u, _, t in valid}
    test_of = {u: t for u, _, t in test}
    for u, h, t in valid:
        assert h + [t] == data.sequences[u][:-1]               # histories are prefixes
    for u, h, t in test:
        assert h + [t] == data.sequences[u]
    k = 3
    pos = training_positions(train, k)
    count = {}
    for u, h, t in pos:
        count[u] = count.get(u, 0) + 1
        part = train[u]
        assert len(h) >= 1 and h + [t] == part[:len(h) + 1]   # a prefix of the training part
        assert len(h) + 1 > len(part) - k                      # one of the last k positions
        # no held-out target of this user in a training history or training target
        assert valid_of[u] not in h + [t] and test_of[u] not in h + [t]
    for u, part in enumerate(train):
        assert valid_of[u] not in part and test_of[u] not in part
        assert count.get(u, 0) == min(k, len(part) - 1)


# ----------------------------------------------------------------------------------------------- examples
def test_examples_candidates(ex, profile):
    assert all(len(ex.splits[s]) > 0 for s in ("train", "valid", "test"))
    for split in ("train", "valid", "test"):
        for row in ex.splits[split]:
            c = row["candidates"]
            assert len(c) == profile.n_candidates == len(set(c)) == 10
            assert c.count(row["target"]) == 1 and c[row["target_pos"]] == row["target"]
            u, hist = full_history(ex, row, split)
            assert not set(c) & set(hist)                       # never recommend what the user already bought
            assert row["history"] == hist[-profile.history_len:]
    assert len(ex.splits["valid"]) <= profile.max_eval and len(ex.splits["test"]) <= profile.max_eval


def test_examples_prompts_and_completions(ex):
    fmt = ex.fmt
    unk = ex.tokenizer.convert_tokens_to_ids(UNK)
    for split in ("train", "valid", "test"):
        for row in ex.splits[split]:
            (ids,) = encode(ex.tokenizer, [row["prompt"]])
            assert len(ids) == fmt.prompt_len and unk not in ids
            sids = ex.candidate_sids(row)
            p = parse_ranking(row["completion"], sids)
            assert p.valid and p.ranking == row["teacher_ranking"]
            assert row["completion"].split()[-1] == EOS
            d = parse_ranking(row["completion_direct"], sids)
            assert d.valid and d.ranking == row["teacher_ranking"] and d.reasoning_tokens == 0
            assert len(row["completion_direct"].split()) == fmt.answer_len
            # every candidate is written in the prompt through its SID
            words = row["prompt"].split()
            for s in sids:
                assert any(tuple(words[i:i + len(s)]) == s for i in range(len(words)))


def test_rejection_sampled_training_completions_put_the_target_first(ex):
    for row in ex.splits["train"]:
        assert row["teacher_ranking"][0] == row["target_pos"]
        p = parse_ranking(row["completion"], ex.candidate_sids(row))
        assert p.ranking[0] == row["target_pos"]
    # sanity of the comparison: the greedy evaluation rankings are blind to the target and miss it sometimes
    assert any(r["teacher_ranking"][0] != r["target_pos"] for r in ex.splits["test"])
    rej = ex.report["rejection"]
    assert rej["kept"] == len(ex.splits["train"]) and 1 <= rej["mean_draws"] <= rej["tries"]


def test_teacher_traces_are_longer_than_the_answer_and_of_fixed_width(ex):
    lengths = set()
    for split in ("train", "test", "reading"):
        for row in ex.splits[split]:
            p = parse_ranking(row["completion"], ex.candidate_sids(row))
            assert p.reasoning_tokens > p.answer_tokens == 10 * (ex.sids.levels + 1)
            lengths.add(len(row["completion"].split()))
    assert len(lengths) == 1            # every completion has the same length: the answer always starts at one place


def test_teacher_step1_names_each_category_and_brand_once(ex):
    """Step 1 lists the history's most common categories and brands with their counts: never one name twice."""
    for split in ("train", "reading", "test"):
        for row in ex.splits[split]:
            step1 = row["completion"].split("step2")[0]
            for field in ("categories", "brands"):
                names = [t for t in step1.split(field)[1].split(";")[0].split()[0::2] if t != "-"]
                assert len(names) == len(set(names)), (field, step1)
                assert names or field == "brands"                # every item has a category, not every one a brand


def test_teacher_check_tags_hand_case():
    """The check step's columns and points on a hand-made catalogue: each tag is exactly what the prompt shows."""
    from diffgr2_lite.data.catalog import Catalog
    from diffgr2_lite.data.teacher import Teacher, TeacherStats

    cat = Catalog(item_ids=[f"i{k}" for k in range(6)], titles=["t"] * 6,
                  brands=["Acme", "Bolt", "Acme", "Bolt", "Cora", None],
                  categories=[["Cleansers"], ["Toners"], ["Serums"], ["Cleansers"], ["Toners"], ["Masks"]])
    # after Cleansers: Toners 3 times, Serums twice, Cleansers once, Masks never
    stats = TeacherStats.fit(cat, [[0, 1, 2], [3, 1], [0, 4], [0, 2], [3, 2], [0, 3]])
    #                 =brand brand+ =cat cat+ next+ first
    teacher = Teacher(cat, stats, points=[3, 1, 1, 0, 0, 2])
    assert teacher.next_categories(0, k=2) == ["Toners", "Serums"]
    assert teacher.slots() == [("=brand", "brand+"), ("=cat", "cat+"), ("first",)]    # next+ earns nothing: no column
    history = [1, 0]                 # Bolt Toners, then Acme Cleansers (the last item)
    cands = [5, 2, 3, 4]
    assert teacher.check(history, cands) == [
        ["-", "-", "first"],                      # no brand, unseen category: only its position
        ["=brand", "-", "-"],                     # Acme like the last item (next+ is worth no points: not written)
        ["brand+", "=cat", "-"],                  # Bolt seen earlier; Cleansers like the last item
        ["-", "-", "-"]]                          # cat+ and next+ only, both worth nothing
    assert teacher.evidence(history, cands)[3].tolist() == [0, 0, 0, 1, 1, 0]    # Toners seen earlier, likely next
    assert teacher.scores(history, cands).tolist() == [2, 3, 2, 0]
    # greedy: the most points first; then by points, the tie 2 = 2 in the retriever's order
    assert teacher.rank(history, cands) == [1, 0, 2, 3]
    # whatever the pick, the rest follows the points with ties in retriever order: one answer per (prompt, pick)
    assert teacher.ranking(teacher.scores(history, cands), 3) == [3, 1, 0, 2]
    assert teacher.ranking(teacher.scores(history, cands), 2) == [2, 1, 0, 3]
    trace = teacher.trace(history, cands, teacher.ranking(teacher.scores(history, cands), 1))
    # the ranks: [1] is 2nd, [2] (the pick) 1st, [3] 3rd (tied with [1] on points, later in the retriever's order)
    assert trace.endswith("step3 check [1] - - first 2 ; [2] =brand - - 3 ; [3] brand+ =cat - 2 ; "
                          "[4] - - - 0 ; pick [2] ; ranks #2 #1 #3 #4 .")
    # another pick moves to the front and the others keep their order by points
    assert teacher.trace(history, cands, [3, 1, 0, 2]).endswith("pick [4] ; ranks #3 #2 #4 #1 .")
    teacher.write_ranks = False
    assert teacher.trace(history, cands, [1, 0, 2, 3]).endswith("[4] - - - 0 ; pick [2] .")
    assert trace.startswith("step1 history 2 items ; categories Toners x1 Cleansers x1 - - ; brands Bolt x1 "
                            "Acme x1 ; last Cleansers Acme . step2 after Cleansers comes ")
    assert teacher.reading(history, cands) == trace[: -len(" pick [2] ; ranks #2 #1 #3 #4 .")]

    # aligned to diffusion blocks: '-' fill before 'pick' puts the decision at the last position of a block of the
    # completion (which starts with <think>), whatever the block size; the reading itself is unchanged
    teacher.write_ranks = True
    for block in (8, 16, 32):
        teacher.decision_block = block
        words = ["<think>", *teacher.trace(history, cands, [1, 0, 2, 3]).split()]
        decision = words.index("pick") + 1
        assert words[decision] == "[2]" and (decision + 1) % block == 0
        fill = words[len(teacher.reading(history, cands).split()) + 1:decision - 1]
        assert set(fill) <= {"-"} and len(fill) == teacher.decision_fill(len(teacher.reading(history, cands).split()))
        assert len(fill) < block


def test_teacher_rejection_sampling_draws_only_the_pick():
    """Rejection sampling keeps the draw whose pick is the target; everything after the pick is the deterministic
    ranking (so two draws that keep the same target give the same trace and answer)."""
    from diffgr2_lite.data.catalog import Catalog
    from diffgr2_lite.data.teacher import Teacher, TeacherStats

    cat = Catalog(item_ids=[f"i{k}" for k in range(5)], titles=["t"] * 5, brands=["A", "A", "B", "A", "C"],
                  categories=[["X"], ["X"], ["Y"], ["Z"], ["X"]])
    teacher = Teacher(cat, TeacherStats.fit(cat, [[0, 1]]), points=[3, 1, 1, 0, 0, 2])
    history, cands = [0], [1, 2, 3, 4]
    s = teacher.scores(history, cands)
    assert s.tolist() == [6, 0, 3, 1]                  # same brand + category + first; -; same brand; same category
    assert teacher.ranking(s, 2) == [2, 0, 3, 1]       # the drawn pick, then the others by points
    for seed in range(5):
        ranking, used = teacher.rejection_sample(history, cands, 2, np.random.default_rng(seed), tries=200,
                                                 temperature=2.0)
        assert ranking == teacher.ranking(s, 2) and 1 <= used <= 200
    # at a very low temperature a target the points do not favour is never drawn: the example is rejected
    assert teacher.rejection_sample(history, cands, 1, np.random.default_rng(0), tries=20, temperature=0.01)[0] is None


def test_teacher_points_fit_the_best_training_recall():
    """The fitted table is the best of the grid: on examples where the same-brand candidate is always the target,
    same-brand must outweigh being retrieved first, and the fitted table gets every example right."""
    from diffgr2_lite.data.catalog import Catalog
    from diffgr2_lite.data.teacher import Teacher, TeacherStats

    cat = Catalog(item_ids=[f"i{k}" for k in range(4)], titles=["t"] * 4, brands=["A", "B", "A", "C"],
                  categories=[["X"], ["Y"], ["Z"], ["W"]])
    teacher = Teacher(cat, TeacherStats.fit(cat, [[0, 1]]))
    examples = [([0], [1, 2, 3], 1), ([0], [3, 1, 2], 2), ([0], [2, 3, 1], 0)]
    assert teacher.fit_points(examples) == 1.0
    assert teacher.points[0] > teacher.points[-1]            # =brand beats first
    # and with no informative evidence at all, the best table ranks like the retriever (R@1 = share of position 0)
    assert teacher.fit_points([([0], [1, 3], 0), ([0], [3, 1], 0)]) == 1.0


@pytest.mark.parametrize("n_candidates", [10, 7])
def test_teacher_point_fit_equals_scoring_every_table_directly(n_candidates):
    """The pattern look-up of ``fit_points`` against the direct computation on random evidence: every table's
    scores as a product, ties to the retriever's order by a small position penalty, and the first best table."""
    import itertools

    from diffgr2_lite.data.teacher import POINT_GRID, Teacher

    rng = np.random.default_rng(n_candidates)
    ev = (rng.random((400, n_candidates, len(POINT_GRID))) < 0.3).astype(float)
    ev[:, :, -1] = 0
    ev[:, 0, -1] = 1                                             # the last key is "retrieved first"
    target = rng.integers(0, n_candidates, len(ev))
    tables = np.array(list(itertools.product(*POINT_GRID)), dtype=float)
    scores = np.einsum("enk,tk->ten", ev, tables) - 1e-3 * np.arange(n_candidates)
    acc = (scores.argmax(-1) == target).mean(-1)
    teacher = Teacher.__new__(Teacher)
    teacher.evidence = lambda history, candidates: ev[history]
    assert teacher.fit_points([(i, None, int(t)) for i, t in enumerate(target)]) == acc.max()
    assert np.array_equal(teacher.points, tables[acc.argmax()])
    assert (acc == acc.max()).sum() > 1 and acc.max() > acc.min()     # tied best tables: "the first" is tested


def test_every_completion_answers_in_the_order_its_ranks_give(ex):
    """Built data, every split: the trace's ranks are a permutation and the answer writes the candidates in exactly
    their order (the first is the pick), so an answer slot is a lookup of the rank list."""
    from diffgr2_lite.diagnostics import ranks_state

    for split in ("train", "reading", "valid", "test"):
        for row in ex.splits[split].select(range(min(40, len(ex.splits[split])))):
            words = row["completion"].split()
            assert ranks_state(words, len(row["candidates"])) == "followed", row["completion"]
            ranks = words[words.index("ranks") + 1:words.index("ranks") + 1 + len(row["candidates"])]
            assert ranks[row["teacher_ranking"][0]] == "#1"
            assert words[words.index("pick") + 1] == f"[{row['teacher_ranking'][0] + 1}]"


def test_reading_examples_carry_a_random_pick_without_loss(ex, profile):
    """Reading examples: the same trace opening a full trace has for that prompt, a pick drawn at random, and the
    answer that follows from the check and that pick; their decision carries no loss (decision_weight 0)."""
    reading, train = ex.splits["reading"], ex.splits["train"]
    assert len(reading) == round(profile.reading_ratio * len(train))
    picks = set()
    for row in reading:
        words = row["completion"].split()
        opening = row["completion"].split(" pick ")[0]
        assert opening == f"<think> {ex.teacher.reading(row['history'], row['candidates'])}"
        pick = words[words.index("pick") + 1]
        picks.add(pick)
        p = parse_ranking(row["completion"], ex.candidate_sids(row))
        assert p.valid and p.ranking[0] == int(pick[1:-1]) - 1
        points = ex.teacher.scores(row["history"], row["candidates"])
        assert p.ranking == ex.teacher.ranking(points, p.ranking[0])
        assert row["decision_weight"] == 0.0
    assert len(picks) > 5                               # picks are spread over the candidates, not the teacher's
    assert set(train["decision_weight"]) == {1.0}


def test_semantic_ids_unique(ex):
    codes = ex.sids.codes
    assert ex.sids.uniqueness()["unique"] == 1.0
    assert len({tuple(r) for r in codes}) == len(codes) == len(ex.data.catalog)
    for level, size in enumerate(ex.sids.codebook_sizes):
        assert codes[:, level].min() >= 0 and codes[:, level].max() < size
    assert ex.sids.levels == len(get_profile("smoke").sid_levels) + 1
    # every SID token is in the vocabulary
    vocab = ex.tokenizer.get_vocab()
    for item in range(0, len(codes), 7):
        assert all(t in vocab for t in ex.sid_words(item))


def test_semantic_id_middle_codes_name_tree_nodes(ex):
    """A level-2 code determines its level-1 parent (so copying needs only the previous token), and a level-1
    cluster still holds several level-2 nodes."""
    codes = ex.sids.codes
    parent = {}
    for a, b in codes[:, :2]:
        assert parent.setdefault(int(b), int(a)) == int(a)
    assert len(parent) > ex.sids.codebook_sizes[0]
    assert ex.sids.codebook_sizes[1] == len(parent)


def test_cross_fitted_training_candidates(ex, profile):
    data = ex.data
    train_parts, _, _ = leave_one_out(data.sequences)
    n_items = len(data.catalog)
    folds = user_folds(len(train_parts), examples_mod.N_FOLDS, profile.seed)
    assert sorted(np.bincount(folds).tolist())[-1] - sorted(np.bincount(folds).tolist())[0] <= 1
    fold_retr = [TransitionRetriever(n_items).fit([p for p, f in zip(train_parts, folds) if f != j])
                 for j in range(examples_mod.N_FOLDS)]
    full = TransitionRetriever(n_items).fit(train_parts)
    differs = 0
    for row in ex.splits["train"]:
        u, hist = full_history(ex, row, "train")
        assert row["candidates"] == fold_retr[folds[u]].top_k(hist, 10)
        differs += row["candidates"] != full.top_k(hist, 10)
    assert differs > 0, "cross-fitting should change some candidate lists"
    for split in ("valid", "test"):
        for row in ex.splits[split]:
            u, hist = full_history(ex, row, split)
            assert row["candidates"] == full.top_k(hist, 10)


def test_retriever_top_k_hand_case():
    r = TransitionRetriever(5, window=1, history_items=1).fit([[0, 1], [0, 1], [0, 2], [3, 4]])
    assert r.top_k([0], 2) == [1, 2]                     # 0 -> 1 twice, 0 -> 2 once
    assert 0 not in r.top_k([0], 4)


# ----------------------------------------------------------------------------------------------- profiles
def test_get_profile_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        get_profile("nope")
    for name in PROFILES:
        assert name in str(e.value)
    assert "nope" in str(e.value)


def test_get_profile_unknown_override_and_dataset():
    with pytest.raises(ConfigError) as e:
        get_profile("smoke", not_a_field=3)
    assert "not_a_field" in str(e.value)
    with pytest.raises(ConfigError):
        get_profile("smoke", dataset="movielens")
    assert isinstance(ConfigError("x"), ValueError)


def test_get_profile_overrides_apply():
    p = get_profile("smoke", synthetic_users=123, block_size=8)
    assert p.synthetic_users == 123 and p.block_size == 8 and p.name == "smoke"
    assert get_profile("smoke", dataset="amazon_beauty").dataset == "amazon_beauty"


def test_built_completions_end_a_block_on_the_decision(ex, data, profile):
    """Every completion the example builder writes (train, reading, valid, test) puts the picked label at the last
    position of a diffusion block; with ``align_decision`` off no ``-`` fill is written before ``pick``."""
    from dataclasses import replace

    def decisions(e):
        out = set()
        for split in ("train", "reading", "valid", "test"):
            for c in e.splits[split]["completion"]:
                words = c.split()
                out.add((words.index("pick") + 1, words[words.index("pick") - 1]))
        return out

    aligned = decisions(ex)
    assert {(d + 1) % profile.block_size for d, _ in aligned} == {0}
    plain = decisions(build_examples(data, replace(profile, align_decision=False), progress=False))
    assert {before for _, before in plain} == {";"}                   # the check's last ';', no fill
    assert len({d for d, _ in plain}) == 1 and max(d for d, _ in plain) <= min(d for d, _ in aligned)
