"""The text layer: vocabulary and tokenizer round trips, the fixed-length prompt, and the never-raising parser."""
from __future__ import annotations

import os

# One BLAS thread: on a small shared CPU box OpenBLAS's spinning threads make numpy's eigh (semantic IDs) 20x
# slower. Set before numpy is first imported (the first test module collected wins; it is a default only).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import random

import pytest

from diffgr2_lite.text import (
    ANSWER, BOS, END_ANSWER, END_THINK, EOS, PAD, SPECIAL_TOKENS, THINK, UNK, PromptFormat, answer_items, build_answer,
    build_completion, build_prompt, build_vocabulary, decode_tokens, encode, item_words, load_tokenizer,
    label_position, label_token, make_tokenizer, parse_ranking, save_tokenizer, sid_token_ranges, sid_tokens,
    title_words, vocab_fingerprint, word_token,
)

TEXTS = ["<bos> <user> history : Toners Aurelia hydrating gentle ;", "pick next+ brand+ . step1 x2 x2 x2"]
LEVELS = (4, 5, 3)


@pytest.fixture(scope="module")
def vocab():
    return build_vocabulary(TEXTS, LEVELS)


@pytest.fixture(scope="module")
def tok(vocab):
    return make_tokenizer(vocab)


def candidates10(seed: int = 0) -> list[tuple[str, ...]]:
    rng = random.Random(seed)
    codes = set()
    while len(codes) < 10:
        codes.add((rng.randrange(4), rng.randrange(5), rng.randrange(3)))
    return [sid_tokens(c) for c in sorted(codes)]


# ----------------------------------------------------------------------------------------------- vocabulary
def test_vocabulary_layout(vocab):
    assert vocab[:len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    sid_part = vocab[len(SPECIAL_TOKENS):len(SPECIAL_TOKENS) + sum(LEVELS)]
    assert sid_part == [f"<a_{i}>" for i in range(4)] + [f"<b_{i}>" for i in range(5)] + [f"<c_{i}>" for i in range(3)]
    fixed = len(SPECIAL_TOKENS) + sum(LEVELS) + 10
    assert vocab[len(SPECIAL_TOKENS) + sum(LEVELS):fixed] == [f"[{k}]" for k in range(1, 11)]
    words = vocab[fixed:]
    assert words[0] == "x2"                                         # the most frequent word first
    assert set(words) == {w for t in TEXTS for w in t.split()} - set(SPECIAL_TOKENS)
    assert len(set(vocab)) == len(vocab)


def test_vocabulary_min_count_and_max_words():
    v = build_vocabulary(["a a a b b c"], (2,), min_count=2, n_labels=0)
    assert v[len(SPECIAL_TOKENS) + 2:] == ["a", "b"]
    v = build_vocabulary(["a a a b b c"], (2,), max_words=1, n_labels=0)
    assert v[len(SPECIAL_TOKENS) + 2:] == ["a"]


def test_make_tokenizer_rejects_duplicates():
    with pytest.raises(ValueError):
        make_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "<mask>", "x", "x"])


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip(tok, vocab):
    text = "<bos> <user> history : <a_3> <b_4> <c_2> Toners Aurelia hydrating gentle ; <eos> <mask> <pad>"
    (ids,) = encode(tok, [text])
    assert ids == [vocab.index(w) for w in text.split()]             # one id per word, the vocabulary's index
    assert decode_tokens(tok, ids) == text.split()
    assert tok.pad_token_id == vocab.index(PAD) and tok.eos_token_id == vocab.index(EOS)
    assert tok.bos_token_id == vocab.index(BOS) and tok.mask_token_id == vocab.index("<mask>")
    # the fast tokenizer's own call agrees (no added special tokens, whitespace split)
    assert tok(text, add_special_tokens=False)["input_ids"] == ids


def test_unknown_words_become_unk(tok, vocab):
    (ids,) = encode(tok, ["Toners Zanzibar <z_9> <a_99> hydrating"])
    unk = vocab.index(UNK)
    assert ids == [vocab.index("Toners"), unk, unk, unk, vocab.index("hydrating")]
    assert decode_tokens(tok, ids) == ["Toners", UNK, UNK, UNK, "hydrating"]


def test_decode_tokens_accepts_tensors(tok):
    import torch

    ids = encode(tok, ["<answer> <a_1> <b_2> </answer>"])[0]
    assert decode_tokens(tok, torch.tensor(ids)) == ["<answer>", "<a_1>", "<b_2>", "</answer>"]


def test_save_load_tokenizer(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    text = "<bos> pick <a_1> <b_0> <c_2> next+ unknownword <eos>"
    assert encode(back, [text]) == encode(tok, [text])
    assert back.get_vocab() == tok.get_vocab()
    assert vocab_fingerprint(back) == vocab_fingerprint(tok)
    assert (back.pad_token, back.eos_token, back.unk_token, back.mask_token) == (PAD, EOS, UNK, "<mask>")


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_vocab_fingerprint_differs_between_vocabularies(tok):
    other = make_tokenizer(build_vocabulary(TEXTS + ["extra"], LEVELS))
    assert vocab_fingerprint(other) != vocab_fingerprint(tok)


# ----------------------------------------------------------------------------------------------- format
def test_small_helpers():
    assert sid_tokens((3, 17, 0)) == ("<a_3>", "<b_17>", "<c_0>")
    assert word_token("Creams & Moisturizers") == "Creams_&_Moisturizers"
    assert title_words("Rose-Oud CREAM, 2 oz", 3) == ["rose", "oud", "cream"]
    assert title_words("Cream", 3) == ["cream", "-", "-"]


@pytest.mark.parametrize("n_hist", [0, 1, 4, 10, 11, 25])
def test_build_prompt_length(n_hist, tok):
    fmt = PromptFormat(history_len=10, n_candidates=10, title_words=2, sid_len=3)

    def item(k):
        return item_words(sid_tokens((k % 4, k % 5, k % 3)), "Iris Lane" if k % 2 else None, "Toners",
                          f"title {k} words more", 2)

    hist = [item(k) for k in range(n_hist)]
    cands = [item(100 + k) for k in range(10)]
    prompt = build_prompt(fmt, hist, cands)
    words = prompt.split()
    assert len(words) == fmt.prompt_len == 7 + 20 * fmt.item_len + 10
    assert len(encode(tok, [prompt])[0]) == fmt.prompt_len
    assert words[0] == BOS and words[-1] == "<assistant>"
    assert all(len(i) == fmt.item_len for i in hist + cands)
    # every candidate is preceded by its label, in retriever order
    cand_part = words[4 + 10 * fmt.item_len + 2:-1]
    assert cand_part == [w for k, it in enumerate(cands) for w in (f"[{k + 1}]", *it)]
    # the most recent history items are the ones kept, right before "candidates"
    kept = hist[-10:]
    body = words[4:4 + 10 * fmt.item_len]
    n_pad = 10 - len(kept)
    assert body[:n_pad * fmt.item_len] == [PAD] * (n_pad * fmt.item_len)
    assert body[n_pad * fmt.item_len:] == [w for it in kept for w in it]


def test_build_prompt_wrong_candidate_count():
    fmt = PromptFormat(10, 10, 2, 3)
    with pytest.raises(ValueError):
        build_prompt(fmt, [], [["x"] * fmt.item_len] * 9)


def test_answer_len_matches_build_answer():
    fmt = PromptFormat(10, 10, 2, 3)
    assert len(build_answer(candidates10()).split()) == fmt.answer_len


def test_build_answer_writes_label_then_sid_in_ranked_order():
    c = candidates10()
    words = build_answer(c, [2, 0, 1, 3, 4, 5, 6, 7, 8, 9]).split()
    assert words[:9] == [ANSWER, "[3]", *c[2], "[1]", *c[0]]
    assert words[-2:] == [END_ANSWER, EOS]
    assert label_token(0) == "[1]" and label_position("[10]") == 9 and label_position("10") is None


def test_vocabulary_has_every_label_and_contiguous_sid_ranges(tok):
    vocab = tok.get_vocab()
    assert all(f"[{k}]" in vocab for k in range(1, 11))
    ranges = sid_token_ranges(tok, len(LEVELS))
    assert [count for _, count in ranges] == list(LEVELS)
    for (first, count), name in zip(ranges, "abc"):
        assert [vocab[f"<{name}_{i}>"] for i in range(count)] == list(range(first, first + count))


# ----------------------------------------------------------------------------------------------- parser
def answer_of(sids, labels: bool = True) -> str:
    """A completion whose answer is ``sids`` in order, each candidate preceded by its label (outsiders are not)."""
    c = candidates10()
    items = []
    for s in sids:
        items += ([f"[{c.index(s) + 1}]"] if labels and s in c else []) + list(s)
    return " ".join([THINK, "step1 some reasoning words .", END_THINK, ANSWER, *items, END_ANSWER, EOS])


def test_parse_valid_permutation():
    c = candidates10()
    order = [3, 0, 9, 1, 2, 8, 7, 4, 5, 6]
    p = parse_ranking(answer_of([c[i] for i in order]), c)
    assert p.valid and p.ranking == order and p.model_ranking == order
    assert not (p.duplicate or p.dropped or p.out_of_set or p.malformed)
    assert p.reasoning_tokens == 5 and p.answer_tokens == 40


def test_parse_labels_are_optional_and_the_sids_decide():
    c = candidates10()
    order = [3, 0, 9, 1, 2, 8, 7, 4, 5, 6]
    bare = parse_ranking(answer_of([c[i] for i in order], labels=False), c)
    assert bare.valid and bare.ranking == order and bare.answer_tokens == 30
    # a label naming another candidate than its SID: noted, but the SIDs are the ranking
    words = answer_of([c[i] for i in order]).split()
    first = words.index(ANSWER) + 1
    words[first] = "[7]"
    p = parse_ranking(words, c)
    assert p.valid and p.ranking == order and any("names another candidate" in n for n in p.notes)


def test_parse_label_without_sid_is_malformed():
    c = candidates10()
    words = answer_of(c).split()
    first = words.index(ANSWER) + 1
    del words[first + 1:first + 4]                                       # "[1]" left without its SID
    p = parse_ranking(words, c)
    assert not p.valid and p.malformed and p.dropped


def test_parse_token_list_and_text_after_eos():
    c = candidates10()
    toks = answer_of(c).split() + ["garbage", "<answer>", "<a_0>"]      # after <eos>: ignored
    p = parse_ranking(toks, c)
    assert p.valid and p.ranking == list(range(10))


def test_parse_duplicate():
    c = candidates10()
    sids = [c[i] for i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]]
    p = parse_ranking(answer_of(sids), c)
    assert not p.valid and p.duplicate and p.dropped and not p.out_of_set and not p.malformed
    assert p.ranking == list(range(10)) and p.model_ranking == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0]
    # eleven SIDs, all ten present plus a repeat: duplicate but nothing dropped
    p = parse_ranking(answer_of(c + [c[4]]), c)
    assert not p.valid and p.duplicate and not p.dropped


def test_parse_dropped():
    c = candidates10()
    p = parse_ranking(answer_of(c[:9]), c)
    assert not p.valid and p.dropped and not p.duplicate and not p.out_of_set and not p.malformed
    assert p.ranking == list(range(10))


def test_parse_out_of_set():
    c = candidates10()
    outsider = ("<a_3>", "<b_4>", "<c_2>")
    assert outsider not in c
    p = parse_ranking(answer_of(c[:9] + [outsider]), c)
    assert not p.valid and p.out_of_set and p.dropped and not p.duplicate and not p.malformed
    assert p.model_ranking[-1] == -1


def test_parse_missing_answer():
    c = candidates10()
    p = parse_ranking(f"{THINK} words {END_THINK} " + " ".join(t for s in c for t in s) + " " + EOS, c)
    assert not p.valid and p.malformed and p.ranking == list(range(10))


def test_parse_unclosed_answer():
    c = candidates10()
    text = " ".join([ANSWER, *[t for s in c for t in s], EOS])
    p = parse_ranking(text, c)
    assert not p.valid and p.malformed and not p.dropped
    assert p.model_ranking == list(range(10))


def test_parse_broken_sid():
    c = candidates10()
    sids = list(c)
    a, b, cc = sids[2]
    sids[2] = (b, a, cc)                                                 # level order wrong
    p = parse_ranking(answer_of(sids), c)
    assert not p.valid and p.malformed and p.ranking == list(range(10))
    assert any("stray" in n for n in p.notes)


def test_parse_last_answer_span_counts():
    c = candidates10()
    text = f"{THINK} maybe {ANSWER} {' '.join(c[0])} {END_ANSWER} {END_THINK} " + build_answer(c, list(range(9, -1, -1)))
    p = parse_ranking(text, c)
    assert p.valid and p.ranking == list(range(9, -1, -1))


def test_parse_ranking_random_inputs_never_raise():
    rng = random.Random(1234)
    c = candidates10(3)
    pool = [*SPECIAL_TOKENS, *[t for s in c for t in s], "<a_9>", "<b_0>", "<c_7>", "<d_1>", "word", ";", "<a_x>",
            "", "<a_-1>"]
    kinds = ["tokens", "valid_then_noise", "bytes", "none", "int", "float", "str_bytes", "dict", "mixed_list"]
    n_valid = n_invalid = 0
    for case in range(500):
        kind = kinds[case % len(kinds)]
        if kind == "tokens":
            out = [rng.choice(pool) for _ in range(rng.randrange(0, 60))]
            if rng.random() < 0.5:
                out = " ".join(out)
        elif kind == "valid_then_noise":
            order = list(range(10))
            rng.shuffle(order)
            toks = answer_of([c[i] for i in order]).split()
            for _ in range(rng.randrange(0, 3)):                      # a few random edits
                toks[rng.randrange(len(toks))] = rng.choice(pool)
            out = toks
        elif kind == "bytes":
            out = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        elif kind == "none":
            out = None
        elif kind == "int":
            out = rng.randrange(-10**6, 10**6)
        elif kind == "float":
            out = rng.random()
        elif kind == "str_bytes":
            out = bytes(rng.randrange(256) for _ in range(40)).decode("latin-1")
        elif kind == "dict":
            out = {"<answer>": 1, rng.choice(pool): 2}
        else:
            out = [rng.choice(pool), None, 3, b"x", 2.5, rng.choice(pool)]
        p = parse_ranking(out, c)
        n_valid += p.valid
        n_invalid += not p.valid
        assert isinstance(p.valid, bool)
        assert sorted(p.ranking) == list(range(10)), (case, out)
        if p.valid:
            assert not (p.duplicate or p.dropped or p.out_of_set or p.malformed)
            assert sorted(p.model_ranking) == list(range(10)) and p.ranking == p.model_ranking
        else:
            assert p.ranking == list(range(10))                           # the retriever-order fallback
            assert p.duplicate or p.dropped or p.out_of_set or p.malformed
    # the loop is not vacuous: both valid and invalid outputs occurred
    assert n_valid >= 10 and n_invalid >= 300


def test_parse_with_no_candidates_does_not_raise():
    p = parse_ranking("<answer> </answer>", [])
    assert p.ranking == []


@pytest.mark.parametrize("candidates", [None, 3, object()])
def test_parse_with_missing_candidates_does_not_raise(candidates):
    p = parse_ranking(answer_of(candidates10()), candidates)
    assert not p.valid and p.malformed and p.ranking == [] and "parser error" in p.notes[0]


def test_answer_items_resume_after_a_stray_token():
    """A label followed by no SID is a stray and reading resumes at the very next token (the SID behind it counts)."""
    body = ["[1]", "<a_1>", "<b_2>", "<c_3>", "[2]", "[3]", "<a_4>", "<b_5>", "<c_6>", "oops",
            "<a_7>", "<b_8>", "<c_9>"]
    assert answer_items(body, 3) == [(0, ("<a_1>", "<b_2>", "<c_3>"), 0), (1, None, 4),
                                     (2, ("<a_4>", "<b_5>", "<c_6>"), 5), (None, None, 9),
                                     (None, ("<a_7>", "<b_8>", "<c_9>"), 10)]
    assert answer_items([], 3) == [] and answer_items(["[1]"], 3) == [(0, None, 0)]


def test_tokenize_split_adds_the_id_columns_and_names_a_fingerprint_per_vocabulary(tok, vocab):
    """One map adds prompt_ids, completion_ids and (given completion_direct) direct_ids, equal to ``encode``; the
    fingerprint it names changes with the vocabulary and the columns, so a cached result is never another's."""
    from datasets import Dataset

    from diffgr2_lite.batches import tokenize_split

    rows = {"prompt": TEXTS, "completion": ["pick next+ <eos>", "<eos>"], "completion_direct": ["<eos>", "x2 <eos>"]}
    out = tokenize_split(Dataset.from_dict(rows), tok)
    for col, src in (("prompt_ids", "prompt"), ("completion_ids", "completion"), ("direct_ids", "completion_direct")):
        assert out[col] == encode(tok, rows[src])
    other = make_tokenizer(vocab[:-1] + ["zzz"])
    without_direct = Dataset.from_dict({k: rows[k] for k in ("prompt", "completion")})
    other_text = Dataset.from_dict({**rows, "prompt": TEXTS[::-1]})
    fingerprints = {out._fingerprint, tokenize_split(Dataset.from_dict(rows), other)._fingerprint,
                    tokenize_split(without_direct, tok)._fingerprint, tokenize_split(other_text, tok)._fingerprint}
    assert len(fingerprints) == 4 and "direct_ids" not in tokenize_split(without_direct, tok).column_names
    assert tokenize_split(Dataset.from_dict(rows), tok)._fingerprint == out._fingerprint     # and is deterministic
