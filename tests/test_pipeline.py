"""Stage artifacts end to end on a tiny synthetic profile: build, save, reload, evaluate, record."""
import pytest

from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import ModelSize, get_profile

RECORD_KEYS = {"device", "profile", "dataset", "seed", "created", "versions", "n_eval", "split", "metrics",
               "metrics_strict"}
METRIC_KEYS = {"recall@1", "recall@3", "ndcg@3", "ndcg@10", "valid_rate", "duplicate_rate", "dropped_rate",
               "out_of_set_rate", "malformed_rate", "mean_reasoning_tokens", "mean_answer_tokens"}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    import os

    old = os.environ.get("DIFFGR2_RUNS")
    os.environ["DIFFGR2_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    P = get_profile("smoke", synthetic_users=250, max_eval=6, eval_batch=6, ar_epochs=0.3, copy_steps=2,
                    cft_epochs=0.2, model=ModelSize(32, 1, 2, 64))
    yield P
    if old is None:
        os.environ.pop("DIFFGR2_RUNS")
    else:
        os.environ["DIFFGR2_RUNS"] = old


def test_examples_are_cached_and_reloaded_identically(stage):
    ex = pl.get_examples(stage, progress=False)
    again = pl.get_examples(stage, progress=False)
    assert again.data is None                                    # the second call loaded, not rebuilt
    assert ex.splits["test"]["prompt_ids"] == again.splits["test"]["prompt_ids"]
    assert ex.tokenizer.get_vocab() == again.tokenizer.get_vocab()


def test_stages_build_reload_and_record(stage):
    ex = pl.get_examples(stage, progress=False)
    ar, hist = pl.get_ar(stage, ex)
    again, _ = pl.get_ar(stage, ex)
    assert pl.model_fingerprint(ar) == pl.model_fingerprint(again)     # loaded from the checkpoint
    ref = pl.evaluate_ar(stage, ar, ex, "ar")
    rec = ref["record"]
    assert RECORD_KEYS <= set(rec) and METRIC_KEYS <= set(rec["metrics"]) and rec["n_eval"] == len(ex.splits["test"])
    assert (pl.art.stage_dir(stage, "ar") / "metrics.json").exists()
    cached = pl.evaluate_ar(stage, ar, ex, "ar")                        # second time: from the saved per-user results
    assert cached["scored"]["outputs"] == ref["scored"]["outputs"]
    floor = pl.record_fixed(stage, ex, "retriever", None, reference=ref["scored"])
    assert floor["record"]["metrics"]["valid_rate"] == 1.0 and "ci95" in floor["record"]
    naive = pl.evaluate_diffusion(stage, ar, ex, "naive", tau=0.5, reference=ref["scored"], n=3, write=False)
    assert naive["record"]["n_eval"] == 3 and naive["record"]["ci95"]["recall@1"]["n"] == 3
    cft, _ = pl.get_cft(stage, ex, ar)
    assert pl.model_fingerprint(cft) != pl.model_fingerprint(ar)        # CFT trained a copy, not the AR model
    assert len(pl.load_stage_records(stage)) >= 2


def test_both_ar_variants_start_from_one_saved_copy_warmup(stage):
    ex = pl.get_examples(stage, progress=False)
    warm, hist = pl.get_copy_warmup(stage, ex)
    assert (pl.art.stage_dir(stage, "copy_warmup") / "model" / "meta.json").exists()
    assert hist["steps"] <= stage.copy_steps and "final" in hist and "passed" in hist
    before = pl.model_fingerprint(warm)
    ar, ar_hist = pl.get_ar(stage, ex, "reasoning")
    direct, _ = pl.get_ar(stage, ex, "direct")
    again, _ = pl.get_copy_warmup(stage, ex)
    assert pl.model_fingerprint(again) == before                        # loaded, and SFT trained copies of it
    assert len({before, pl.model_fingerprint(ar), pl.model_fingerprint(direct)}) == 3
    assert ar_hist["copy_warmup"]["step"] == hist["step"]


def test_copy_warmup_is_kept_when_only_sft_settings_change(stage, capsys):
    """The warm-up depends on the data, the model size and its own settings; an SFT setting must not retrain it."""
    from dataclasses import replace

    ex = pl.get_examples(stage, progress=False)
    warm, _ = pl.get_copy_warmup(stage, ex)
    capsys.readouterr()
    again, _ = pl.get_copy_warmup(replace(stage, ar_epochs=stage.ar_epochs * 2, ar_lr=stage.ar_lr / 2), ex)
    assert pl.model_fingerprint(again) == pl.model_fingerprint(warm)
    assert "rebuilding" not in capsys.readouterr().out
    _, hist = pl.get_copy_warmup(replace(stage, copy_steps=stage.copy_steps + 1), ex)
    assert "rebuilding" in capsys.readouterr().out and hist["step"][-1] == stage.copy_steps + 1


def test_both_variants_train_on_traces_and_reading_examples(stage):
    """SFT steps count the rows each variant trains on: both train on the rejection-sampled and the reading examples
    (with or without the trace), so the comparison of reasoning against no reasoning is on the same prompts."""
    import math

    ex = pl.get_examples(stage, progress=False)
    n_train, n_read = len(ex.splits["train"]), len(ex.splits["reading"])
    assert n_read > 0
    G = stage.batch_size * stage.grad_accum
    _, ar_hist = pl.get_ar(stage, ex, "reasoning")
    _, direct_hist = pl.get_ar(stage, ex, "direct")
    lo = max(1, int(round(stage.ar_epochs * math.ceil((n_train + n_read) / G))))
    assert lo <= ar_hist["steps"] <= lo + stage.length_buckets and lo <= direct_hist["steps"] <= lo + stage.length_buckets
    rows = ex.training_rows("direct")
    assert len(rows) == n_train + n_read and "<think>" not in ex.tokenizer.decode(rows[0]["completion_ids"])


def test_damaged_data_cache_is_rebuilt_with_a_message(stage, capsys):
    import shutil

    ex = pl.get_examples(stage, progress=False)
    shutil.rmtree(pl.art.stage_dir(stage, "data") / "splits" / "valid")
    again = pl.get_examples(stage, progress=False)
    assert "rebuilding" in capsys.readouterr().out
    assert again.splits["valid"]["prompt_ids"] == ex.splits["valid"]["prompt_ids"]


def test_corrupt_checkpoint_is_rebuilt_with_a_message_naming_the_file(stage, capsys):
    ex = pl.get_examples(stage, progress=False)
    builds = []

    def build():
        builds.append(1)
        return pl.new_model(stage, ex), {"build": len(builds)}

    pl.get_stage_model(stage, ex, "probe", build)
    ckpt = pl.art.stage_dir(stage, "probe") / "model"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])                     # a save cut short by a full disk
    capsys.readouterr()
    _, hist = pl.get_stage_model(stage, ex, "probe", build)
    assert hist == {"build": 2} and str(weights) in capsys.readouterr().out
    assert pl.get_stage_model(stage, ex, "probe", build)[1] == {"build": 2}   # the rebuilt one loads
    (ckpt / "meta.json").write_text('{"key": ')
    _, hist = pl.get_stage_model(stage, ex, "probe", build)
    assert hist == {"build": 3} and str(ckpt / "meta.json") in capsys.readouterr().out


def test_missing_dataset_leaves_no_empty_run_folder(tmp_path, monkeypatch):
    from diffgr2_lite.data import amazon
    from diffgr2_lite.data.catalog import DataError

    monkeypatch.setenv("DIFFGR2_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(amazon, "candidate_dirs", lambda: [tmp_path / "no_data"])
    with pytest.raises(DataError, match="Amazon Beauty data not found"):
        pl.get_examples(get_profile("full"), progress=False)
    assert not (tmp_path / "runs").exists()


def test_cft_and_its_off_policy_control_train_on_the_same_relabelled_rows(stage, monkeypatch):
    """The control OPD is compared with differs from CFT in its steps only: same rows, same relabelled share."""
    from diffgr2_lite import cft as cft_mod

    ex = pl.get_examples(stage, progress=False)
    seen = []

    def fake_fit(model, rows, tokenizer, **kw):
        seen.append((len(rows), kw["transform"] is not None, kw["multiple_of"]))
        return {"steps": 0}

    monkeypatch.setattr(cft_mod, "train_supervised", fake_fit)
    model = pl.new_model(stage, ex)
    cft_mod.train_cft(stage, ex, model)
    cft_mod.continue_cft(stage, ex, model, steps=1)
    assert seen[0] == seen[1] == (len(ex.training_rows()), True, stage.block_size)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_cft_keeps_the_best_validated_state_or_the_last(stage, monkeypatch, keep):
    """Two validations (2 epochs) that score worse the second time: ``cft_keep = "best"`` ends on the first epoch's
    weights, ``"last"`` on the second's, and both record the two scores."""
    from dataclasses import replace

    import torch

    from diffgr2_lite import cft as cft_mod

    ex = pl.get_examples(stage, progress=False)
    states = []

    def validation(profile, ex_, n=128, tau=1.0):
        def score(model):
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return 1.0 / len(states)                            # 1.0, then 0.5
        return score

    monkeypatch.setattr(cft_mod, "diffusion_validate", validation)
    P = replace(stage, cft_keep=keep)
    model, hist = cft_mod.train_cft(P, ex, pl.new_model(P, ex), epochs=2.0)
    assert hist["val"] == [1.0, 0.5] and len(states) == 2
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])    # the second epoch changed them
    kept = states[0] if keep == "best" else states[1]
    assert all(torch.equal(v, kept[k]) for k, v in model.state_dict().items())


@pytest.fixture
def decoded_sub_blocks(monkeypatch):
    """The ``sub_block`` of every call to the block sampler, in order (the sampler still runs)."""
    from diffgr2_lite.diffusion import sampler

    seen, real = [], sampler.diffusion_decode

    def spy(*args, **kw):
        seen.append(kw.get("sub_block"))
        return real(*args, **kw)

    monkeypatch.setattr(sampler, "diffusion_decode", spy)
    return seen


def test_diffusion_evaluation_decodes_with_the_profiles_sub_blocks_unless_told(stage, decoded_sub_blocks):
    seen = decoded_sub_blocks
    ex = pl.get_examples(stage, progress=False)
    ar, _ = pl.get_ar(stage, ex)
    assert 0 < stage.sub_block < stage.block_size
    default = pl.evaluate_diffusion(stage, ar, ex, "naive", n=2, write=False)
    assert seen[-1] == stage.sub_block and default["record"]["sub_block"] == stage.sub_block
    whole = pl.evaluate_diffusion(stage, ar, ex, "naive", n=2, write=False, sub_block=0)
    assert seen[-1] is None and "sub_block" not in whole["record"]
    four = pl.evaluate_diffusion(stage, ar, ex, "naive", n=2, write=False, sub_block=4)
    assert seen[-1] == 4 and four["record"]["sub_block"] == 4
    pl.evaluate_diffusion(stage, ar, ex, "naive", n=2, write=False, block_size=stage.sub_block)
    assert seen[-1] is None                               # a chunk as long as the block is the whole block


def test_validation_and_rollouts_of_diffusion_stages_use_the_profiles_sub_blocks(stage, decoded_sub_blocks,
                                                                                 monkeypatch):
    from diffgr2_lite import opd, rl
    from diffgr2_lite.decoders import diffusion_validate

    seen = decoded_sub_blocks
    ex = pl.get_examples(stage, progress=False)
    ar, _ = pl.get_ar(stage, ex)
    diffusion_validate(stage, ex, n=2)(ar)                 # the score CFT, OPD and RL keep their best state by
    assert seen and set(seen) == {stage.sub_block}
    opd_kw, rl_kw = {}, {}                                   # the rollouts: what each stage passes its trainer
    monkeypatch.setattr(opd, "train_opd", lambda *args, **kw: opd_kw.update(kw) or {})
    monkeypatch.setattr(rl, "train_rl", lambda *args, **kw: rl_kw.update(kw) or {})
    pl.train_opd_stage(stage, ex, ar, ar)
    pl.train_rl_stage(stage, ex, ar)
    assert opd_kw["sub_block"] == stage.sub_block and rl_kw["sub_block"] == stage.sub_block


def test_graphed_engine_gives_the_readable_decoders_results(stage, monkeypatch):
    """``eval_engine = "graphed"`` decodes with fast.py's static-shape decoders (one per batch shape, so the last,
    smaller batch is exercised) and, on a CPU in float32, scores exactly what the readable decoders score, also when
    the assignment decoder rewrites the answers; the constrained AR decoder stays readable, and each record names its
    engine."""
    from dataclasses import replace

    import torch

    from diffgr2_lite import fast

    ex = pl.get_examples(stage, progress=False)
    ar = pl.new_model(stage, ex)
    torch.manual_seed(0)
    with torch.no_grad():                         # peaked random weights: the commit order changes the tokens
        for p in ar.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    readable = replace(stage, eval_batch=4)
    graphed = replace(readable, eval_engine="graphed")
    assert len(ex.splits["test"]) % readable.eval_batch                     # a last batch of another shape
    calls = {"ar": 0, "diffusion": 0}
    for name, cls in (("ar", fast.FastARDecoder), ("diffusion", fast.FastDiffusionDecoder)):
        real = cls.decode

        def counted(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, "decode", counted)

    outputs = []
    for sub_block in (None, 0):                                             # the profile's sub-blocks, the whole block
        a = pl.evaluate_diffusion(readable, ar, ex, "naive", tau=0.7, write=False, sub_block=sub_block)
        b = pl.evaluate_diffusion(graphed, ar, ex, "naive", tau=0.7, write=False, sub_block=sub_block)
        assert a["scored"]["outputs"] == b["scored"]["outputs"]
        assert a["scored"]["tokens_per_forward"] == b["scored"]["tokens_per_forward"]
        assert (a["record"]["engine"], b["record"]["engine"]) == ("readable", "graphed")
        outputs.append(a["scored"]["outputs"])
    assert outputs[0] != outputs[1]                                         # so the sub-block setting is tested too
    assert calls["diffusion"] == 2 * 2                                      # two batches per graphed evaluation
    free_a = pl.evaluate_ar(readable, ar, ex, "ar", split="valid")
    free_b = pl.evaluate_ar(graphed, ar, ex, "ar", split="valid")
    assert free_a["scored"]["outputs"] == free_b["scored"]["outputs"] and calls["ar"] > 0
    before = dict(calls)
    cons = pl.evaluate_ar(graphed, ar, ex, "ar_constrained", constrained=True, split="valid")
    assert calls == before and cons["record"]["engine"] == "readable"       # no constrained graphed decoder
    assigned = [pl.evaluate_diffusion(p, ar, ex, "naive_constrained", tau=0.7, assign=True, write=False)
                for p in (readable, graphed)]
    assert calls["diffusion"] == before["diffusion"] + 2                    # the graphed sampler, then assignment
    assert assigned[0]["scored"]["outputs"] == assigned[1]["scored"]["outputs"]
    assert assigned[0]["scored"]["outputs"] != outputs[0]                   # the assignment rewrote answers
    assert [r["record"]["engine"] for r in assigned] == ["readable", "graphed"]
    assert assigned[1]["record"]["metrics"]["valid_rate"] == 1.0
    from diffgr2_lite.decoders import ar_decoder, diffusion_validate

    assert diffusion_validate(graphed, ex, n=3)(ar) == diffusion_validate(readable, ex, n=3)(ar)
    assert calls["diffusion"] > before["diffusion"]
    a = pl.evaluate_diffusion(readable, ar, ex, "naive", tau=0.9, block_size=4, write=False)
    b = pl.evaluate_diffusion(graphed, ar, ex, "naive", tau=0.9, block_size=4, write=False)
    assert a["scored"]["outputs"] == b["scored"]["outputs"]                 # another block size reaches the decoder
    before = dict(calls)
    prompt = torch.tensor(ex.splits["valid"].select(range(2))["prompt_ids"])
    ar_decoder(ar, ex, 12, False, "cpu", temperature=0.5, engine="graphed")(None, prompt)
    assert calls == before                                                  # sampling stays readable

    # the evaluation cache: a graphed result is never served from a readable one (the engine is in the key)
    keys, real_cached = [], pl.cached_evaluation
    monkeypatch.setattr(pl, "cached_evaluation",
                        lambda path, settings, *a: keys.append(settings) or real_cached(path, settings, *a))
    r = pl.evaluate_ar(readable, ar, ex, "ar_engine_check")
    n_ar = calls["ar"]
    g = pl.evaluate_ar(graphed, ar, ex, "ar_engine_check")
    assert calls["ar"] > n_ar and r["scored"]["outputs"] == g["scored"]["outputs"]
    assert (keys[0]["engine"], keys[1]["engine"]) == ("readable", "graphed")
    pl.evaluate_ar(graphed, ar, ex, "ar_engine_check", constrained=True)
    assert keys[2]["engine"] == "readable"                                  # constrained decoding is readable
