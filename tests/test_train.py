"""The one training loop: schedules, best state, the device batcher, exact accumulation, and two processes = one."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffgr2_lite.batches import DeviceBatches, length_buckets, make_batch
from diffgr2_lite.train import BestState, Trainer, constant_lr, cosine_lr, maybe_validate
from tiny import EOS, tiny_model
from train_case import StubTokenizer, run, toy_rows

TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- schedules, best state
def test_cosine_lr():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10) == pytest.approx(0.5)
    assert cosine_lr(100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_constant_lr():
    assert constant_lr(0, 100, 4) == pytest.approx(0.25) and constant_lr(3, 100, 4) == pytest.approx(1.0)
    assert all(constant_lr(s, 100, 0) == 1.0 for s in (0, 50, 99))


def test_best_state_keeps_and_restores_the_best():
    model = torch.nn.Linear(2, 1)
    keeper = BestState()
    with torch.no_grad():
        model.weight.fill_(1.0)
        keeper.update(model, 0.5)
        model.weight.fill_(2.0)
        keeper.update(model, 0.4)                              # worse: not kept
        model.weight.fill_(3.0)
        keeper.update(model, 0.5)                              # a tie: not kept by default
    keeper.restore(model)
    assert keeper.best == 0.5 and torch.all(model.weight == 1.0)
    later = BestState(ties_to_later=True)
    with torch.no_grad():
        later.update(model, 0.5)
        model.weight.fill_(3.0)
        later.update(model, 0.5)
    model.weight.data.fill_(0.0)
    later.restore(model)
    assert torch.all(model.weight == 3.0)


def test_maybe_validate_every_k_and_at_the_end():
    model, hist, calls = torch.nn.Linear(1, 1), {"val_step": [], "val": []}, []
    for step in range(1, 11):
        maybe_validate(lambda m: calls.append(m.training) or step, model, step, 10, 4, hist, None)
    assert hist["val_step"] == [4, 8, 10] and calls == [False] * 3 and model.training


# ----------------------------------------------------------------------------------------------- length buckets
def test_length_buckets_are_the_cheapest_split():
    rng = np.random.default_rng(0)
    for _ in range(20):
        lengths = rng.choice([3, 4, 5, 9, 10, 17, 18, 30], size=rng.integers(5, 40))
        k = int(rng.integers(1, 4))
        groups = length_buckets(lengths, k)
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))     # a partition
        cost = sum(len(g) * lengths[g].max() for g in groups)
        values = np.unique(lengths)
        best = min(sum((lengths[(lengths > lo) & (lengths <= hi)]).size * hi
                       for lo, hi in zip((-1, *cuts), (*cuts, values[-1])))
                   for m in range(k) for cuts in itertools.combinations(values[:-1], m))
        assert cost == best and len(groups) <= k


# ----------------------------------------------------------------------------------------------- device batches
def epoch_rows(data: DeviceBatches, e: int = 0) -> list[list[tuple]]:
    """The real rows (completion up to <eos>) of each micro-batch of epoch e."""
    out = []
    for b in data.epoch(e):
        out.append([tuple(b.completion[i, :int(b.length[i])].tolist()) for i in range(len(b)) if b.length[i] > 0])
    return out


# ----------------------------------------------------------------------------------------------- make_batch
PICK_ID = 4


class PickTokenizer(StubTokenizer):
    def convert_tokens_to_ids(self, token):
        return {"<answer>": 5, "pick": PICK_ID}.get(token, -1)


def make_batch_reference(rows, eos, answer, pick, lambda_r, lambda_o, multiple_of=1, min_len=0):
    """make_batch written row by row, as the module docstring states it (the brute-force reference)."""
    c_len = max(max(len(r["completion_ids"]) for r in rows), min_len)
    c_len = -(-c_len // multiple_of) * multiple_of
    comp = torch.full((len(rows), c_len), eos, dtype=torch.long)
    weight, is_answer = torch.zeros(len(rows), c_len), torch.zeros(len(rows), c_len, dtype=torch.bool)
    length = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        c = list(r["completion_ids"])
        comp[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        end = c.index(eos) + 1 if eos in c else len(c)
        start = c.index(answer) if answer in c else end
        weight[i, :start], weight[i, start:end], is_answer[i, start:end] = lambda_r, lambda_o, True
        d = c.index(pick) + 1 if pick in c else (c.index(answer) + 1 if answer in c else None)
        if d is not None and d < end:
            weight[i, d] *= float(r.get("decision_weight", 1.0))
        length[i] = end
    return comp, weight, is_answer, length


def test_make_batch_matches_a_row_by_row_reference():
    """Hand cases (no <eos>, no <answer>, <answer> or pick after the <eos>, a pick as the last token, an empty
    completion, decision weights 0 and 0.5) and random rows: every field equal to the row-by-row reference."""
    A, P = 5, PICK_ID
    hand = [[7, P, 8, A, 9, 9, EOS], [7, 8, 9], [7, 8, EOS, A, 9], [A, 9, EOS, 3], [7, EOS, P, 8], [7, 8, P],
            [], [P, 8, A, 9, EOS, EOS], [EOS]]
    g = np.random.default_rng(0)
    rand = [g.choice([EOS, A, P, 7, 8, 9], size=int(g.integers(0, 12))).tolist() for _ in range(200)]
    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": c, "decision_weight": [1.0, 0.0, 0.5][i % 3]}
            for i, c in enumerate(hand + rand)]
    rows[1].pop("decision_weight")
    for lr, lo, mult, min_len in ((0.3, 1.7, 1, 0), (1.0, 1.0, 4, 20)):
        got = make_batch(rows, PickTokenizer(), lr, lo, multiple_of=mult, min_len=min_len)
        ref = make_batch_reference(rows, EOS, A, P, lr, lo, mult, min_len)
        assert torch.equal(got.prompt, torch.tensor([[1, 2, 3]] * len(rows)))
        for a, b in zip((got.completion, got.weight, got.is_answer, got.length), ref):
            assert a.dtype == b.dtype and torch.equal(a, b)
        if lr == 0.3:                          # hand-computed: row 7 (decision weight 0) and row 2 (<answer> after <eos>)
            assert got.weight[7, :6].tolist() == pytest.approx([0.3, 0.0, 1.7, 1.7, 1.7, 0.0])
            assert got.weight[2, :5].tolist() == pytest.approx([0.3, 0.3, 0.3, 0.0, 0.0]) and got.length[2] == 3
    assert got.weight[0, 2] == 1.0 and got.weight[1, 2] == 1.0          # hand rows: the decision and no decision
    with pytest.raises(ValueError, match="same length"):
        make_batch([{"prompt_ids": [1], "completion_ids": [2]}, {"prompt_ids": [1, 2], "completion_ids": [2]}],
                   PickTokenizer())


def test_device_batches_shapes_padding_rows_and_every_row_once():
    rows = toy_rows()
    data = DeviceBatches(rows, StubTokenizer(), batch_size=5, multiple_of=4, buckets=2, seed=1)
    assert len(data.groups) == 2 and len(data) == sum(-(-n // 5) for n in data.sizes)
    assert len(data) == len(list(data.epoch(0)))                  # one step per global batch the epoch yields
    shapes = set()
    for b in data.epoch(0):
        assert len(b) == 5 and b.completion.shape[1] % 4 == 0 and b.prompt.shape[1] == 6
        shapes.add(tuple(b.completion.shape))
        pad = b.length == 0                                    # padding rows: nothing to learn from them
        assert (b.weight[pad] == 0).all() and not b.is_answer[pad].any() and (b.completion[pad] == EOS).all()
    assert len(shapes) == 2                                    # one shape per length group
    seen = sorted(r for batch in epoch_rows(data) for r in batch)
    assert seen == sorted(tuple(r["completion_ids"]) for r in rows)
    # each length group holds what make_batch builds for its rows, plus the padding row
    lengths = [-(-len(r["completion_ids"]) // 4) * 4 for r in rows]
    for idx, group in zip(length_buckets(lengths, 2), data.groups):
        ref = make_batch([rows[i] for i in idx], StubTokenizer(), multiple_of=4)
        for a, b in zip((ref.prompt, ref.completion, ref.weight, ref.is_answer, ref.length),
                        (group.prompt, group.completion, group.weight, group.is_answer, group.length)):
            assert torch.equal(a, b[:-1])


def test_device_batches_are_deterministic_by_seed_and_reshuffled_each_epoch():
    rows = toy_rows()
    a = DeviceBatches(rows, StubTokenizer(), batch_size=4, seed=3)
    b = DeviceBatches(rows, StubTokenizer(), batch_size=4, seed=3)
    c = DeviceBatches(rows, StubTokenizer(), batch_size=4, seed=4)
    assert epoch_rows(a, 0) == epoch_rows(b, 0) and epoch_rows(a, 1) == epoch_rows(b, 1)
    assert epoch_rows(a, 0) != epoch_rows(c, 0) and epoch_rows(a, 0) != epoch_rows(a, 1)
    first = list(itertools.islice(iter(a), len(a) + 2))       # iterating runs on into the next epoch
    assert len(first) == len(a) + 2


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 2), (3, 1)])
def test_shards_partition_the_global_batch(world, accum):
    rows, tok = toy_rows(), StubTokenizer()
    single = DeviceBatches(rows, tok, batch_size=2 * world * accum, buckets=2, seed=7)
    shards = [DeviceBatches(rows, tok, batch_size=2, grad_accum=accum, buckets=2, seed=7, rank=r, world=world)
              for r in range(world)]
    assert all(len(s) == len(single) for s in shards)
    per_rank = [epoch_rows(s) for s in shards]
    for step, global_rows in enumerate(epoch_rows(single)):
        parts = [r for rank in per_rank for r in itertools.chain(*rank[step * accum:(step + 1) * accum])]
        assert sorted(parts) == sorted(global_rows)


def test_transform_runs_on_every_micro_batch():
    seen = []
    data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=8, seed=0,
                         transform=lambda b: seen.append(len(b)) or type(b)(b.prompt, b.completion, b.weight * 2,
                                                                             b.is_answer, b.length))
    batch = next(iter(data))
    assert seen == [8] and batch.weight.max() == 2.0


# ----------------------------------------------------------------------------------------------- the loop
def test_fit_lowers_the_loss_and_logs_every_k_steps():
    from diffgr2_lite.ar import sft_terms

    model = tiny_model(init=0.05)
    data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=8, seed=0)
    calls = []
    trainer = Trainer(model, lr=5e-3, total_steps=60, log_every=10, device="cpu", progress=False)
    hist = trainer.fit(data, sft_terms, validate=lambda m: calls.append(1) or -len(calls), validate_every=25)
    assert hist["step"] == [10, 20, 30, 40, 50, 60] and len(hist["loss"]) == 6
    assert hist["loss"][-1] < 0.75 * hist["loss"][0]
    assert hist["val_step"] == [25, 50, 60] and hist["best_val"] == -1 and hist["steps"] == 60
    assert not model.training


def test_fit_refuses_batches_cut_for_another_accumulation():
    from diffgr2_lite.ar import sft_terms

    data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=4, grad_accum=2, seed=0)
    trainer = Trainer(tiny_model(), lr=1e-3, total_steps=2, device="cpu", progress=False)
    with pytest.raises(ValueError, match="grad_accum=2.*accumulates 1"):
        trainer.fit(data, sft_terms)


def test_fit_stops_at_the_gate():
    """``stop_at``: training ends at the first validation whose score reaches it (the copy warm-up's gate)."""
    from diffgr2_lite.ar import sft_terms

    scores = iter([0.2, 0.5, 0.95, 0.99])
    data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=8, seed=0)
    trainer = Trainer(tiny_model(init=0.05), lr=1e-3, total_steps=100, log_every=7, device="cpu", progress=False)
    hist = trainer.fit(data, sft_terms, validate=lambda m: next(scores), validate_every=5, stop_at=0.9,
                       keep_best=False)
    assert hist["val_step"] == [5, 10, 15] and hist["steps"] == 15 and hist["step"] == [7, 14, 15]
    never = Trainer(tiny_model(init=0.05), lr=1e-3, total_steps=12, device="cpu", progress=False)
    h = never.fit(data, sft_terms, validate=lambda m: 0.0, validate_every=5, stop_at=0.9, keep_best=False)
    assert h["steps"] == 12 and h["val_step"] == [5, 10, 12]


def test_fit_logs_extras_of_a_dict_loss():
    from diffgr2_lite.ar import sft_loss

    model = tiny_model(init=0.05)
    data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=8, grad_accum=2, seed=0)
    trainer = Trainer(model, lr=1e-3, total_steps=4, log_every=2, grad_accum=2, device="cpu", progress=False)
    hist = trainer.fit(data, lambda m, b: {"loss": sft_loss(m, b), "rows": torch.tensor(float(len(b)))},
                       keep_best=False)
    assert hist["rows"] == [8.0, 8.0] and len(hist["loss"]) == 2


def test_weight_average_is_the_warmed_up_ema_of_the_steps_and_is_what_fit_validates_and_keeps():
    """ema=0.3: after step t (from 0) w_ema <- d w_ema + (1 - d) w with d = min(0.3, (1 + t) / (10 + t)) (the warm-up
    term is the smaller for t < 3, the cap after), computed here by hand from the weights of a run without averaging
    (averaging must not change training). Validation sees the average, and keep_best restores the best average."""
    from diffgr2_lite.ar import sft_terms

    def train(ema, scores=None, every=None):
        data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=8, seed=0)
        model = tiny_model(seed=0, init=0.05)
        trainer = Trainer(model, lr=5e-3, total_steps=12, log_every=1, device="cpu", progress=False, ema=ema,
                          schedule="constant", warmup=0)
        seen, scored = [], []

        def step_and_record(micro, loss_fn, _step=trainer.train_step):
            out = _step(micro, loss_fn)
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return out

        def validate(m):
            scored.append((m, {k: v.detach().clone() for k, v in m.state_dict().items()}))
            return scores[len(scored) - 1]

        trainer.train_step = step_and_record
        hist = trainer.fit(data, sft_terms, validate=validate if scores else None, validate_every=every,
                           keep_best=scores is not None)
        return model, trainer, hist, seen, scored

    start = {k: v.clone() for k, v in tiny_model(seed=0, init=0.05).state_dict().items()}
    plain, _, hist_plain, steps, _ = train(0.0)
    averages, avg = [], dict(start)
    for t, w in enumerate(steps):
        d = min(0.3, (1 + t) / (10 + t))
        avg = {k: d * avg[k] + (1 - d) * w[k] for k in w}
        averages.append(avg)
    last, last_trainer, hist_last, _, _ = train(0.3)
    for k in steps[-1]:                                                   # no validation: the last average
        torch.testing.assert_close(last.state_dict()[k], averages[-1][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(last_trainer.last_step_state[k], steps[-1][k])   # kept to compare with
    assert any((averages[-1][k] - steps[-1][k]).abs().max() > 1e-3 for k in steps[-1])   # which is not the last step
    assert hist_last["ema_last_decay"] == 0.3 and hist_last["loss"] == hist_plain["loss"]
    best, best_trainer, _, _, _ = train(0.0, scores=[3.0, 1.0, 2.0], every=4)    # no average: the best is step 4's
    for k in steps[-1]:
        torch.testing.assert_close(best.state_dict()[k], steps[3][k])
        torch.testing.assert_close(best_trainer.last_step_state[k], steps[-1][k])  # the last step, to compare
    assert train(0.0, scores=None)[1].last_step_state is None           # nothing kept: the model is the last step
    model, trainer, hist, steps_ema, scored = train(0.3, scores=[3.0, 1.0, 2.0], every=4)
    for k in steps[-1]:
        torch.testing.assert_close(steps_ema[-1][k], steps[-1][k])         # training itself is unchanged
        for (_, seen_w), step in zip(scored, (4, 8, 12)):                  # validation scored the averages
            torch.testing.assert_close(seen_w[k], averages[step - 1][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.state_dict()[k], averages[3][k], rtol=1e-5, atol=1e-6)   # the best one
    assert all(m is trainer.averaged for m, _ in scored) and hist["val_step"] == [4, 8, 12] and hist["ema"] == 0.3
    with pytest.raises(ValueError, match=r"ema must be in \[0, 1\)"):
        Trainer(tiny_model(), lr=1e-3, total_steps=2, device="cpu", ema=1.0)


def test_gradient_accumulation_equals_one_big_batch():
    """2 micro-batches of b rows == 1 batch of 2b rows (same rows): the (sum, weight) loss is normalised over the
    global batch, so the steps agree even though the micro-batches hold different numbers of weighted tokens."""
    loss_a, w_a = run(batch_size=4, grad_accum=2, steps=5)
    loss_b, w_b = run(batch_size=8, grad_accum=1, steps=5)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    for k in w_a:
        torch.testing.assert_close(w_a[k], w_b[k], rtol=1e-5, atol=1e-6)
    _, w_c = run(batch_size=8, grad_accum=1, steps=5, lr=6e-3)
    assert any((w_c[k] - w_b[k]).abs().max() > 1e-4 for k in w_b)        # the comparison can fail


def test_two_processes_give_the_same_training_as_one(tmp_path):
    """torchrun, 2 processes (gloo, CPU), 4 rows each per step == 1 process, 8 rows per step (and == 1 process with
    2 micro-batches of 4). Tolerance: losses rtol 1e-5, weights rtol 1e-5 / atol 1e-6 (float32 sums in another order).

    The loss calls ``model.model`` and ``model.lm_head`` directly (no DDP wrapper); the equal weights at the end show
    the trainer's own all-reduce synchronises them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "train_case.py"), str(tmp_path), "4", "1", "6"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["world"] == 2 and r0["losses"] == r1["losses"]
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k])            # the processes never drift apart
    for accum, batch in ((1, 8), (2, 4)):
        losses, weights = run(batch_size=batch, grad_accum=accum, steps=6)
        np.testing.assert_allclose(r0["losses"], losses, rtol=1e-5)
        for k in weights:
            torch.testing.assert_close(r0["weights"][k], weights[k], rtol=1e-5, atol=1e-6)


def test_the_train_command_runs_data_parallel_under_torchrun(tmp_path):
    """``python -m diffgr2_lite train`` on 2 processes (gloo, CPU), smoke profile: both processes train one AR model
    on global batches of 2 x batch_size rows, process 0 alone writes the checkpoint and prints, and the run ends
    cleanly (every process waits for the others before the process group is closed)."""
    import json

    from diffgr2_lite.config import get_profile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DIFFGR2_RUNS": str(tmp_path),
           "DIFFGR2_PLAIN_PROGRESS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent),
                                                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "diffgr2_lite", "train", "--profile", "smoke", "--stages", "ar"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "smoke" / "ar" / "model" / "meta.json").read_text())["history"]
    assert history["processes"] == 2 and history["global_batch_rows"] == 2 * get_profile("smoke").batch_size
    assert (done.stdout + done.stderr).count("ar: ready") == 1


def test_a_failing_compiler_falls_back_to_eager():
    """torch.compile is an optimisation: if it fails, the trainer warns and trains the same loss eagerly."""
    from diffgr2_lite.ar import sft_terms

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    hist = {}
    for compile in (False, True):
        data = DeviceBatches(toy_rows(), StubTokenizer(), batch_size=8, seed=0)
        trainer = Trainer(tiny_model(init=0.05), lr=1e-3, total_steps=3, log_every=1, device="cpu", progress=False,
                          compile=compile, compile_options={"backend": broken})
        if compile:
            with pytest.warns(UserWarning, match="torch.compile failed"):
                hist[compile] = trainer.fit(data, sft_terms, keep_best=False)["loss"]
        else:
            hist[compile] = trainer.fit(data, sft_terms, keep_best=False)["loss"]
    assert hist[True] == hist[False]


def test_stable_decay_lr_holds_the_rate_until_the_last_fifth():
    from diffgr2_lite.config import SCHEDULE_NAMES
    from diffgr2_lite.train import SCHEDULES, stable_decay_lr

    assert set(SCHEDULE_NAMES) == set(SCHEDULES)                # the profile's names are the trainer's schedules
    assert stable_decay_lr(0, 110, 10) == pytest.approx(0.1)
    assert stable_decay_lr(10, 110, 10) == 1.0 and stable_decay_lr(89, 110, 10) == 1.0
    assert stable_decay_lr(90, 110, 10) == pytest.approx(1.0)   # decay starts at 10 + 0.8 * 100
    assert stable_decay_lr(100, 110, 10) == pytest.approx(0.5)
    assert stable_decay_lr(110, 110, 10) == pytest.approx(0.0, abs=1e-12)
    assert stable_decay_lr(50, 100, 0, decay=0.5) == 1.0
    assert stable_decay_lr(75, 100, 0, decay=0.5) == pytest.approx(0.5)


def test_compiling_uses_static_shapes_unless_told_otherwise(monkeypatch):
    """The device batcher yields a few fixed shapes, so the trainer compiles each one statically (dynamic shapes
    failed in inductor on the GPU image's torch); explicit compile options replace the default."""
    seen = []

    def fake_compile(fn, **options):
        seen.append(options)
        return lambda *a, **k: fn(*a, **k)

    monkeypatch.setattr(torch, "compile", fake_compile)

    def loss_a(model, batch):
        return batch

    def loss_b(model, batch):
        return batch

    default = Trainer(tiny_model(init=0.05), lr=1e-3, total_steps=1, device="cpu", progress=False, compile=True)
    assert default.is_compiled(loss_a) and seen == [{"dynamic": False}]
    told = Trainer(tiny_model(init=0.05), lr=1e-3, total_steps=1, device="cpu", progress=False, compile=True,
                   compile_options={"dynamic": True})
    assert told.is_compiled(loss_b) and seen[-1] == {"dynamic": True}
    off = Trainer(tiny_model(init=0.05), lr=1e-3, total_steps=1, device="cpu", progress=False, compile=False)
    assert not off.is_compiled(loss_b) and len(seen) == 2


def test_a_profiles_compile_mode_reaches_torch_compile_in_sft_and_cft(monkeypatch):
    """``compile_mode`` (e.g. "reduce-overhead", CUDA graphs) is added to the static shapes of the SFT and CFT
    losses; None keeps the trainer's default options."""
    from diffgr2_lite import cft
    from diffgr2_lite.config import get_profile
    from diffgr2_lite.train import compile_options_for, engine_settings

    assert compile_options_for(None) is None
    assert compile_options_for("reduce-overhead") == {"dynamic": False, "mode": "reduce-overhead"}
    seen = {}

    def fake_train_supervised(*args, **kwargs):
        seen[kwargs.get("desc", "")] = kwargs.get("compile_options")
        return {}

    monkeypatch.setattr(cft, "train_supervised", fake_train_supervised)
    monkeypatch.setattr(cft, "augmentations", lambda *a, **k: None)

    class Ex:                                     # what the two training entry points read before training
        tokenizer, fmt = StubTokenizer(), None

    for mode in (None, "reduce-overhead"):
        P = get_profile("smoke", compile_mode=mode, copy_steps=0)
        assert engine_settings(P)["compile_options"] == compile_options_for(mode)        # what AR SFT is given
        cft._fit_cft(P, Ex(), None, [], loss_fn=None, lambda_r=0.5, epochs=1, lr=1e-3, seed=0, desc="cft")
        assert seen["cft"] == compile_options_for(mode)


def test_the_cft_schedule_of_a_profile_reaches_the_trainer(monkeypatch):
    """``cft_schedule`` is the learning-rate schedule of the main CFT run (train_cft); the continued-CFT control of
    OPD keeps the cosine default."""
    from diffgr2_lite import cft
    from diffgr2_lite.config import get_profile

    seen = {}

    def fake_train_supervised(*args, **kwargs):
        seen[kwargs["desc"]] = kwargs["schedule"]
        return {}

    monkeypatch.setattr(cft, "train_supervised", fake_train_supervised)
    monkeypatch.setattr(cft, "augmentations", lambda *a, **k: None)
    val_users = []
    monkeypatch.setattr(cft, "diffusion_validate", lambda *a, **k: val_users.append(k["n"]))
    monkeypatch.setattr(cft, "cft_loss_fn", lambda *a, **k: None)

    class Ex:
        tokenizer, fmt = StubTokenizer(), None

        def training_rows(self):
            return [{"completion": "x"}] * 4

    model = torch.nn.Linear(2, 2)
    for schedule in ("cosine", "stable_decay"):
        P = get_profile("smoke", cft_schedule=schedule, copy_steps=0)
        cft.train_cft(P, Ex(), model)
        cft.continue_cft(P, Ex(), model, steps=2)
        assert seen == {"CFT (cft)": schedule, "CFT (continued, off-policy control)": "cosine"}
    cft.train_cft(P, Ex(), model, val_users=1000)        # how many validation users choose the kept epoch
    assert val_users == [128, 128, 1000]


def test_auto_compiles_only_long_runs_on_cuda():
    from diffgr2_lite.train import AUTO_COMPILE_MIN_STEPS, compile_enabled

    assert not compile_enabled("auto", "cpu", 10 ** 6) and not compile_enabled(None, "cpu")
    assert compile_enabled(None, "cuda") and compile_enabled("auto", "cuda", AUTO_COMPILE_MIN_STEPS)
    assert not compile_enabled("auto", "cuda", AUTO_COMPILE_MIN_STEPS - 1)     # compiling would cost more than it saves
    assert compile_enabled(True, "cpu", 1) and not compile_enabled(False, "cuda", 10 ** 6)   # an explicit choice wins
