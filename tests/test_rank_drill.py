"""The rank drill: drawn checks, ranks recounted as the teacher counts them, answers that stay valid, no loss on the
drawn check, and nothing changed outside the drilled rows."""
import pytest
import torch

from diffgr2_lite import pipeline as pl
from diffgr2_lite.batches import make_batch
from diffgr2_lite.config import ConfigError, ModelSize, get_profile
from diffgr2_lite.data.teacher import best_first, rank_tokens
from diffgr2_lite.rank_drill import TraceLayout, augmentations, chain, rank_drill_transform
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


def _batch(ex, n=64, variant="reasoning"):
    return make_batch(ex.training_rows(variant).select(range(n)).to_list(), ex.tokenizer, 0.5, 1.0)


def _drill(ex, share, seed=0):
    reference = ex.splits["train"][0]["completion"].split()
    return rank_drill_transform(ex.tokenizer, ex.fmt, reference, share, seed)


def test_layout_is_read_off_a_trace_and_refuses_a_direct_answer(ex):
    words = ex.splits["train"][0]["completion"].split()
    layout = TraceLayout.from_completion(words, ex.fmt.n_candidates, ex.fmt.sid_len)
    starts = [p[0] - 1 for p in layout.entry_positions()]
    assert [words[s] for s in starts] == [f"[{k + 1}]" for k in range(ex.fmt.n_candidates)]
    assert all(words[p[-1] + 1] == ";" for p in layout.entry_positions())
    assert words[layout.pick_word] == "pick" and words[layout.ranks_word] == "ranks"
    assert [words[p[0]] for p in layout.answer_positions()][0].startswith("[")
    with pytest.raises(ValueError, match="check, pick and ranks"):
        TraceLayout.from_completion(ex.splits["train"][0]["completion_direct"].split(), 10, ex.fmt.sid_len)


def test_drilled_rows_rank_their_drawn_check_as_the_teacher_does(ex):
    b = _batch(ex)
    out = _drill(ex, 1.0)(b)
    layout = TraceLayout.from_completion(ex.splits["train"][0]["completion"].split(), 10, ex.fmt.sid_len)
    rows = ex.training_rows().select(range(len(b))).to_list()
    old_entries = {tuple(b.completion[i, p].tolist()) for i in range(len(b)) for p in layout.entry_positions()}
    changed = 0
    for i, row in enumerate(rows):
        words = decode_tokens(ex.tokenizer, out.completion[i].tolist())
        entries = [[words[p] for p in pos] for pos in layout.entry_positions()]
        points = [int(e[-1]) for e in entries]
        pick = label_position(words[layout.pick_word + 1])
        expected = [pick] + [c for c in best_first(points) if c != pick]
        ranks = words[layout.ranks_word + 1: layout.ranks_word + 11]
        assert ranks == rank_tokens(expected)
        parsed = parse_ranking(words, ex.candidate_sids(row))
        assert parsed.valid and parsed.ranking == expected
        drawn = {tuple(out.completion[i, p].tolist()) for p in layout.entry_positions()}
        assert drawn <= old_entries                                 # every drawn entry is a real one of the batch
        changed += not torch.equal(out.completion[i], b.completion[i])
        silent = torch.zeros_like(b.weight[i], dtype=torch.bool)
        silent[layout.check_word + 1: layout.entries_end] = True
        silent[layout.pick_word + 1] = True
        assert (out.weight[i][silent] == 0).all()                    # no loss on the drawn check or the pick
        assert torch.equal(out.weight[i][~silent], b.weight[i][~silent])
    assert changed >= len(b) - 2                                     # it really draws
    assert torch.equal(out.prompt, b.prompt) and torch.equal(out.is_answer, b.is_answer)


def test_share_zero_and_direct_rows_pass_unchanged(ex):
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


def test_augmentations_chain_and_config(ex):
    P = get_profile("smoke", rank_drill_share=0.5)
    t = augmentations(P, ex, seed=3)
    b = _batch(ex)
    out = t(b)
    assert not torch.equal(out.completion, b.completion)
    assert chain(None, None) is None
    assert chain(None, t) is t
    with pytest.raises(ConfigError, match="trace_ranks"):
        get_profile("smoke", rank_drill_share=0.5, trace_ranks=False)


def test_without_a_drill_the_augmentations_are_the_relabelling_alone(ex):
    """rank_drill_share = 0 trains exactly as before the drill existed: the same relabelling, the same random draws."""
    from diffgr2_lite.copy_warmup import relabel_transform

    P = get_profile("smoke", rank_drill_share=0.0)
    b = _batch(ex)
    ours = augmentations(P, ex, seed=5)(b)
    before = relabel_transform(ex.tokenizer, ex.fmt, P.relabel_share, 5, "cpu", P.collide_share)(b)
    assert torch.equal(ours.completion, before.completion) and torch.equal(ours.prompt, before.prompt)
    assert torch.equal(ours.weight, before.weight)
