"""The rank drill: drawn checks, ranks recounted as the teacher counts them, answers that stay valid, no loss on the
drawn check, and nothing changed outside the drilled spans or the drilled rows."""
import pytest
import torch

from diffgr2_lite import pipeline as pl
from diffgr2_lite.batches import Batch, DeviceBatches, chain_transforms, make_batch
from diffgr2_lite.config import ConfigError, ModelSize, get_profile
from diffgr2_lite.copy_warmup import relabel_transform
from diffgr2_lite.data.teacher import best_first, rank_tokens
from diffgr2_lite.rank_drill import (TraceLayout, augmentations, numbers_of_tokens, rank_drill_transform,
                                     teacher_order)
from diffgr2_lite.text import decode_tokens, label_position, parse_ranking


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    import os

    old = os.environ.get("DIFFGR2_RUNS")
    os.environ["DIFFGR2_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    P = get_profile("smoke", synthetic_users=250, max_eval=6, eval_batch=6, model=ModelSize(32, 1, 2, 64))
    yield pl.get_examples(P, progress=False)
    if old is None:
        os.environ.pop("DIFFGR2_RUNS")
    else:
        os.environ["DIFFGR2_RUNS"] = old


def _rows(ex, n=64, variant="reasoning"):
    """Rejection-sampled and reading rows alike (the reading rows follow the training rows)."""
    rows = ex.training_rows(variant)
    step = max(1, len(rows) // n)
    return rows.select(range(0, step * n, step)).to_list()


def _batch(ex, n=64, variant="reasoning"):
    return make_batch(_rows(ex, n, variant), ex.tokenizer, 0.5, 1.0)


def _layout(ex):
    return TraceLayout.from_completion(ex.splits["train"][0]["completion"].split(), ex.fmt.n_candidates,
                                       ex.fmt.sid_len)


def _drill(ex, share, seed=0):
    return rank_drill_transform(ex.tokenizer, ex.fmt, ex.splits["train"][0]["completion"].split(), share, seed)


def _drilled_spans(layout) -> list[int]:
    return [p for e in layout.entry_positions() for p in e] + layout.rank_positions() + \
        [p for a in layout.answer_positions() for p in a]


def test_layout_is_read_off_a_trace_and_refuses_anything_else(ex):
    words = ex.splits["train"][0]["completion"].split()
    layout = _layout(ex)
    n = ex.fmt.n_candidates
    assert [words[p[0] - 1] for p in layout.entry_positions()] == [f"[{k + 1}]" for k in range(n)]
    assert all(words[p[-1] + 1] == ";" for p in layout.entry_positions())
    assert words[layout.pick_word] == "pick" and words[layout.ranks_word] == "ranks"
    assert [words[p[0]] for p in layout.answer_positions()] == words[layout.answer_at + 1::1 + ex.fmt.sid_len][:n]
    assert words[layout.end_answer] == "</answer>"
    with pytest.raises(ValueError, match="check, pick and ranks"):
        TraceLayout.from_completion(ex.splits["train"][0]["completion_direct"].split(), n, ex.fmt.sid_len)
    with pytest.raises(ValueError, match="SID codes"):                     # a trace whose SIDs are one code longer
        TraceLayout.from_completion(words, n, ex.fmt.sid_len + 1)


def test_drilled_rows_rank_their_drawn_check_as_the_teacher_does(ex):
    b = _batch(ex)
    out = _drill(ex, 1.0)(b)
    layout = _layout(ex)
    rows = _rows(ex)
    old_entries = {tuple(b.completion[i, p].tolist()) for i in range(len(b)) for p in layout.entry_positions()}
    picks_below = 0
    for i, row in enumerate(rows):
        words = decode_tokens(ex.tokenizer, out.completion[i].tolist())
        points = [int(words[p[-1]]) for p in layout.entry_positions()]
        pick = label_position(words[layout.pick_word + 1])
        assert words[layout.pick_word + 1] == decode_tokens(ex.tokenizer, [b.completion[i, layout.pick_word + 1]])[0]
        expected = [pick] + [c for c in best_first(points) if c != pick]
        picks_below += points[pick] < max(points)
        assert [words[p] for p in layout.rank_positions()] == rank_tokens(expected)
        parsed = parse_ranking(words, ex.candidate_sids(row))
        assert parsed.valid and parsed.ranking == expected
        assert all(words[a[0]] == f"[{c + 1}]" for a, c in zip(layout.answer_positions(), expected))
        drawn = {tuple(out.completion[i, p].tolist()) for p in layout.entry_positions()}
        assert drawn <= old_entries                                 # every drawn entry is a real one of the batch
        silent = torch.zeros_like(b.weight[i], dtype=torch.bool)
        silent[layout.check_word + 1: layout.entries_end] = True
        silent[layout.pick_word + 1] = True
        assert (out.weight[i][silent] == 0).all()                    # no loss on the drawn check or the pick
        assert torch.equal(out.weight[i][~silent], b.weight[i][~silent])
    assert picks_below > 0                                           # the pick is not always the best-scored
    outside = torch.ones(b.completion.shape[1], dtype=torch.bool)
    outside[_drilled_spans(layout)] = False
    assert torch.equal(out.completion[:, outside], b.completion[:, outside])   # pick, words, </answer>, <eos> kept
    assert (out.completion != b.completion).any(1).sum() >= len(b) - 2         # it really draws
    assert torch.equal(out.prompt, b.prompt) and torch.equal(out.is_answer, b.is_answer)


def test_teacher_order_on_hand_cases():
    """Points 10, 2, 10, 0, 0 with the pick [4] (0 points): [4] first, then [1] and [3] (10 each, tie to the
    retriever's order), then [2], then [5]. With the pick [1] (the best): 10, 10, 2, then the zeros in order."""
    points = torch.tensor([[10, 2, 10, 0, 0], [10, 2, 10, 0, 0]])
    order = teacher_order(points, torch.tensor([3, 0]))
    assert order.tolist() == [[3, 0, 2, 1, 4], [0, 2, 1, 3, 4]]
    for row, pick in zip(points.tolist(), (3, 0)):                   # the teacher's own rule agrees
        assert [pick] + [c for c in best_first(row) if c != pick] == order[[3, 0].index(pick)].tolist()
    assert rank_tokens(order[0].tolist()) == ["#2", "#4", "#3", "#1", "#5"]


def test_numbers_of_tokens(ex):
    numbers = numbers_of_tokens(ex.tokenizer)
    ids = ex.tokenizer.convert_tokens_to_ids
    assert numbers[ids("3")] == 3 and numbers[ids("[3]")] == -1 and numbers[ids("#3")] == -1
    assert numbers[ids("pick")] == -1 and (numbers >= 0).sum() >= 5


def test_share_zero_half_and_rows_that_are_no_trace(ex):
    b = _batch(ex)
    assert _drill(ex, 0.0) is None
    half = _drill(ex, 0.5)(b)
    same = [torch.equal(half.completion[i], b.completion[i]) for i in range(len(b))]
    assert 10 < sum(same) < len(b) - 10                            # about half the rows are drilled
    for i in [i for i, s in enumerate(same) if s]:
        assert torch.equal(half.weight[i], b.weight[i])
    direct = _batch(ex, variant="direct")
    out = _drill(ex, 1.0)(direct)
    assert torch.equal(out.completion, direct.completion) and torch.equal(out.weight, direct.weight)


def test_in_a_mixed_device_batch_only_reasoning_rows_change_and_draw_only_real_entries(ex):
    """Reasoning rows, direct rows padded to the same length, and DeviceBatches' padding row (all <eos>, weight 0)
    in one batch: the others come back unchanged, and no drawn entry comes from them."""
    layout = _layout(ex)
    rows = _rows(ex, 16) + _rows(ex, 16, "direct")
    data = DeviceBatches(rows, ex.tokenizer, batch_size=33, buckets=1)
    group = data.groups[0]
    assert group.completion.shape[1] > layout.end_answer                # one group: traces and direct answers together
    b = Batch(*(x for x in (group.prompt, group.completion, group.weight, group.is_answer, group.length)))
    out = _drill(ex, 1.0, seed=1)(b)
    check = ex.tokenizer.convert_tokens_to_ids("check")
    reasoning = b.completion[:, layout.check_word] == check
    assert 0 < int(reasoning.sum()) < len(b)
    changed = (out.completion != b.completion).any(1)
    assert not changed[~reasoning].any()                                # direct and padding rows untouched
    assert torch.equal(out.weight[~reasoning], b.weight[~reasoning])
    entries = out.completion[reasoning][:, torch.tensor(layout.entry_positions())]
    assert not (entries == ex.tokenizer.eos_token_id).any()             # nothing drawn from a padding row


def test_augmentations_drill_only_when_asked(ex):
    """SFT's augmentations drill, CFT's (drill=False) and a share of 0 are the relabelling alone, draw for draw."""
    b = _batch(ex)
    layout = _layout(ex)
    entries = torch.tensor(layout.entry_positions())
    P = get_profile("smoke", rank_drill_share=0.5, relabel_share=0.0, collide_share=0.0)
    sft = augmentations(P, ex, seed=3)(b)
    assert (sft.completion[:, entries] != b.completion[:, entries]).any()       # the checks were drawn
    for profile, drill in ((get_profile("smoke", rank_drill_share=0.0), True),
                           (get_profile("smoke", rank_drill_share=0.5), False)):
        ours = augmentations(profile, ex, seed=5, drill=drill)(b)
        alone = relabel_transform(ex.tokenizer, ex.fmt, profile.relabel_share, 5, "cpu", profile.collide_share)(b)
        assert torch.equal(ours.completion, alone.completion) and torch.equal(ours.prompt, alone.prompt)
        assert torch.equal(ours.weight, alone.weight)
    assert chain_transforms(None, None) is None
    t = _drill(ex, 1.0)
    assert chain_transforms(None, t) is t
    with pytest.raises(ConfigError, match="trace_ranks"):
        get_profile("smoke", rank_drill_share=0.5, trace_ranks=False)
