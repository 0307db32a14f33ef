"""Failure-location diagnostics on hand-made outputs: where an answer stops being a permutation, and why."""
from __future__ import annotations

import pytest

from diffgr2_lite.diagnostics import (check_pattern, check_patterns, failure_table, locate_failure, pick_agrees,
                                      ranks_state)
from diffgr2_lite.text import build_answer, sid_tokens

# ten candidates sharing prefixes the way real ones do: pairs share their first code, 4 and 5 share two codes
CANDS = [sid_tokens(c) for c in [(1, 1, 0), (1, 2, 0), (2, 3, 0), (2, 4, 0), (3, 5, 0), (3, 5, 1), (4, 6, 0),
                                 (5, 7, 0), (6, 8, 0), (7, 9, 0)]]
HISTORY = [sid_tokens((8, 10, 0)), sid_tokens((9, 11, 0))]


def answer(items: list[str]) -> str:
    return " ".join(["<think> check pick [1] . </think> <answer>", *items, "</answer> <eos>"])


def item(k: int) -> list[str]:
    return [f"[{k + 1}]", *CANDS[k]]


def test_a_valid_answer_is_valid():
    assert locate_failure(build_answer(CANDS, [3, 1, 2, 0, 4, 5, 6, 7, 8, 9]), CANDS, HISTORY)["where"] == "valid"


def test_no_answer_span():
    assert locate_failure("<think> words </think> <eos>", CANDS)["where"] == "no answer"


def test_duplicate_in_the_rest_names_its_slot():
    items = [t for k in [0, 1, 2, 1, 4, 5, 6, 7, 8, 9] for t in item(k)]
    f = locate_failure(answer(items), CANDS, HISTORY)
    assert (f["where"], f["kind"], f["slot"]) == ("rest", "duplicate", 4)


def test_out_of_set_copied_from_another_candidate():
    """Label [2] followed by candidate [1]'s second code: the wrong item's continuation, at level b."""
    bad = ["[2]", "<a_1>", "<b_1>", "<c_5>"]                   # [2] is (1, 2, 0); b_1 is candidate [1]'s
    items = item(0) + bad + [t for k in range(2, 10) for t in item(k)]
    f = locate_failure(answer(items), CANDS, HISTORY)
    assert (f["where"], f["kind"], f["slot"], f["level"], f["copied_from"]) == ("rest", "out_of_set", 2, "b",
                                                                                 "candidate")


def test_out_of_set_copied_from_history_and_from_nowhere():
    hist_code = ["[1]", "<a_1>", "<b_10>", "<c_0>"]           # b_10 appears only in the history
    f = locate_failure(answer(hist_code + [t for k in range(1, 10) for t in item(k)]), CANDS, HISTORY)
    assert (f["where"], f["level"], f["copied_from"]) == ("pick", "b", "history")
    invented = ["[1]", "<a_1>", "<b_1>", "<c_7>"]
    f = locate_failure(answer(invented + [t for k in range(1, 10) for t in item(k)]), CANDS, HISTORY)
    assert (f["level"], f["copied_from"]) == ("c", "nowhere")


def test_without_a_label_the_closest_candidate_is_the_reference():
    bad = ["<a_3>", "<b_7>", "<c_0>"]                          # closest: (3, 5, *): level b differs; b_7 is [8]'s
    f = locate_failure(answer(bad + [t for k in range(1, 10) for t in item(k)]), CANDS, HISTORY)
    assert (f["kind"], f["level"], f["copied_from"]) == ("out_of_set", "b", "candidate")
    # a duplicate written under another candidate's label is a duplicate: the SIDs decide
    items = item(0) + ["[2]", *CANDS[0]] + [t for k in range(2, 10) for t in item(k)]
    assert locate_failure(answer(items), CANDS)["kind"] == "duplicate"


def test_stray_missing_extra_and_unclosed():
    items = item(0) + ["[2]", "word"] + [t for k in range(2, 10) for t in item(k)]
    assert locate_failure(answer(items), CANDS)[("kind")] == "stray"
    f = locate_failure(answer([t for k in range(9) for t in item(k)]), CANDS)
    assert (f["where"], f["kind"], f["slot"]) == ("end", "missing", 10)
    f = locate_failure(answer([t for k in list(range(10)) + [0] for t in item(k)]), CANDS)
    assert (f["where"], f["kind"], f["slot"]) == ("end", "extra", 11)
    unclosed = "<answer> " + " ".join(t for k in range(10) for t in item(k)) + " <eos>"
    assert locate_failure(unclosed, CANDS)["kind"] == "unclosed"


def test_pick_agreement():
    text = answer([t for k in [2, 0, 1, 3, 4, 5, 6, 7, 8, 9] for t in item(k)])      # trace says pick [1]
    assert pick_agrees(text, 10) is False
    assert pick_agrees(text.replace("pick [1]", "pick [3]"), 10) is True
    assert pick_agrees("<answer> [1] </answer>", 10) is None


@pytest.mark.parametrize("garbage", ["", "<answer>", "<answer> [99] [1] <a_1>", "[1] [1] [1]", "<answer> <b_1> <a_1>",
                                     None, 123, ["<answer>", 7, None]])
def test_garbage_never_raises(garbage):
    f = locate_failure(garbage, CANDS, HISTORY)
    assert f["where"] in ("no answer", "pick", "rest", "end")
    assert pick_agrees(garbage, 10) is None
    assert ranks_state(garbage, 10) is None
    assert ranks_state(f"ranks #1 <answer> {garbage}", 10) == "broken"          # a ranks list cut short


def test_no_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the candidates"):
        locate_failure("<answer> </answer>", [])


def test_failure_table_counts():
    rows = [{"candidates": list(range(10)), "history": [10, 11]}] * 3
    sids = CANDS + HISTORY
    outputs = [build_answer(CANDS), answer([t for k in [0, 0] for t in item(k)]), "no answer here"]
    t = failure_table(outputs, rows, lambda i: sids[i])
    assert t["n"] == 3 and t["invalid"] == 2
    assert t["where"] == {"rest": 1, "no answer": 1} and t["kind"] == {"duplicate": 1, "no answer": 1}


def with_ranks(ranks: list[int], order: list[int]) -> str:
    """A trace whose ranks list gives candidate k the rank ``ranks[k]``, then an answer in ``order``."""
    trace = "<think> pick [1] ; ranks " + " ".join(f"#{r}" for r in ranks) + " . </think> <answer>"
    return " ".join([trace, *[t for k in order for t in item(k)], "</answer> <eos>"])


def test_ranks_state_tells_a_copy_mistake_from_a_counting_one():
    ranks = [2, 1, 3, 4, 5, 6, 7, 8, 9, 10]                                  # [2] first, then [1], [3], ...
    order = [1, 0, 2, 3, 4, 5, 6, 7, 8, 9]
    assert ranks_state(with_ranks(ranks, order), 10) == "followed"
    assert ranks_state(with_ranks(ranks, [0, 1, *order[2:]]), 10) == "departed"      # valid, but not the ranks' order
    assert ranks_state(with_ranks(ranks, [1, 0, 0, *order[3:]]), 10) == "departed"   # a duplicate made while copying
    assert ranks_state(with_ranks([2, 2, 3, 4, 5, 6, 7, 8, 9, 10], order), 10) == "broken"   # #2 twice, no #1
    assert ranks_state(with_ranks(ranks[:9], order), 10) == "broken"                 # a rank missing
    assert ranks_state(answer([t for k in order for t in item(k)]), 10) is None       # no ranks written
    assert ranks_state("<think> ranks #1 #2 </think>", 10) is None                   # no answer
    text = with_ranks(ranks, order)
    assert ranks_state(text.replace("</answer>", "ranks #1 </answer>"), 10) == "followed"   # a "ranks" in the answer
    assert ranks_state(text.replace("#10 .", "#10 #11 ."), 10) == "broken"              # one rank too many
    cut = with_ranks(ranks, order[:5]).replace("</answer> <eos>", "<eos> [6] [7] [8] [9] [10]")
    assert ranks_state(cut, 10) == "departed"                                         # labels after <eos> don't count
    assert ranks_state(text, 10.0) == "followed" and ranks_state(text, 0) is None
    # the failure table counts the ranks' state of invalid outputs only
    rows = [{"candidates": list(range(10)), "history": [10, 11]}] * 3
    outputs = [with_ranks(ranks, order), with_ranks(ranks, [1, 0, 0, *order[3:]]),
               with_ranks([2, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 1, *order[2:]])]
    t = failure_table(outputs, rows, lambda i: (CANDS + HISTORY)[i])
    assert t["invalid"] == 2 and t["ranks"] == {"departed": 1, "broken": 1}


def _trace(points, pick, n=10, ranks="#1 #2 #3 #4 #5 #6 #7 #8 #9 #10"):
    entries = " ".join(f"[{k + 1}] {'=brand' if p else '-'} - {p} ;" for k, p in enumerate(points[:n]))
    return f"<think> step3 check {entries} - - - pick [{pick}] ; ranks {ranks} . </think>"


def test_check_pattern_reads_the_points_and_pick_an_output_wrote():
    points = [6, 0, 0, 3, 0, 0, 0, 0, 4, 0]
    out = _trace(points, 1) + " " + answer([t for k in range(10) for t in item(k)])
    assert check_pattern(out, 10) == (tuple(points), 0)
    assert check_pattern(out.split(), 10) == (tuple(points), 0)                # a token list reads the same
    assert check_pattern(_trace(points, 9), 10) == (tuple(points), 8)


@pytest.mark.parametrize("garbage", [
    None, "", "<answer> </answer>", "check pick", "step3 check [1] - - 6 ; pick [1]",   # no check / too few entries
    "check " + " ".join(f"[{k + 1}] - - x ;" for k in range(10)) + " pick [1]",          # points that are no number
    "check " + " ".join(f"[{k + 2}] - - 0 ;" for k in range(10)) + " pick [1]",          # labels out of order
    "check " + " ".join(f"[{k + 1}] - - 0 ;" for k in range(10)) + " pick",              # no pick label
    "check " + " ".join(f"[{k + 1}] - - 0 ;" for k in range(10)) + " pick [11]",         # a pick that is no label
    "check " + " ".join(f"[{k + 1}] - - ² ;" for k in range(10)) + " pick [1]",          # a digit int() refuses
    12345, ["check", None, "pick"],
])
def test_check_pattern_of_garbage_is_none(garbage):
    assert check_pattern(garbage, 10) is None


def test_failure_table_counts_checks_unseen_in_training():
    """Two training checks; four outputs: a valid answer from a seen check, a duplicated candidate from an unseen
    check, a duplicated candidate from a seen one, and no check at all. Unseen: 1 of all, 1 of the 3 invalid."""
    seen_a, seen_b, new = [6] + [0] * 9, [3, 3] + [0] * 8, [5, 0, 5] + [0] * 7
    seen = check_patterns([_trace(seen_a, 1), _trace(seen_b, 2), "garbage"], 10)
    assert seen == {(tuple(seen_a), 0), (tuple(seen_b), 1)}
    good = [t for k in range(10) for t in item(k)]
    dup = [t for k in [0, 1, 2, 1, 4, 5, 6, 7, 8, 9] for t in item(k)]
    outputs = [_trace(seen_a, 1) + " " + answer(good), _trace(new, 1) + " " + answer(dup),
               _trace(seen_b, 2) + " " + answer(dup), "<think> no check at all </think> <eos>"]
    rows = [{"candidates": list(range(10)), "history": [10, 11]}] * 4
    t = failure_table(outputs, rows, lambda i: (CANDS + HISTORY)[i], seen_checks=seen)
    assert t["invalid"] == 3 and t["unseen_check"] == {"all": 1, "invalid": 1}     # no check read: not counted
    assert "unseen_check" not in failure_table(outputs, rows, lambda i: (CANDS + HISTORY)[i])
