"""Does ending a diffusion block on the trace's decision let CFT write valid rankings at tau = 1.0, block 32?

The trace's one uncertain token is the decision (the label after ``pick``); the ranks and the answer are fixed
functions of it. A block-diffusion decoder commits a block's tokens in confidence order, so when the decision shares
a block with its consequences they are committed first, from a guess. The teacher now fills the gap before ``pick``
so that the decision ends a block (``align_decision``, the full profile's default), and the check lost its ``=``.

    DIFFGR2_RUNS=/tmp/runs python results/checks/decision_block.py data <out.json>    # build the data once
    DIFFGR2_RUNS=/tmp/runs python results/checks/decision_block.py ar <out.json>      # AR SFT, checkpointed
    DIFFGR2_RUNS=/tmp/runs python results/checks/decision_block.py cft_e6 <out.json>  # CFT from that AR model

Environment:

* ``SEED=1`` trains with another seed on the same data (the data is always the profile's, seed 0);
* ``LR=6e-4`` overrides CFT's learning rate, ``CFT_SCHEDULE=stable_decay`` its schedule (``cft_schedule``) and
  ``CFT_SEED=1`` its seed alone (batch order, masks, relabelling), from the same AR checkpoint: several ``cft_e*``
  with different ``CFT_SEED`` side by side measure CFT's own run-to-run spread;
* ``DECODES=sub8,plain`` limits a ``cft_e*`` run to those of its decodes (names below; default: all);
* ``AR_EPOCHS=24`` sets the AR SFT's epochs. A changed profile retrains and replaces the ``ar`` checkpoint, so give
  every command of one check the same value, and run variants side by side in separate ``DIFFGR2_RUNS`` folders;
* ``AR_EMA=0.995`` keeps and validates an exponential moving average of the AR SFT weights (``ar_ema``; same
  caveat), and ``ar`` then also decodes the same run's last step: a paired comparison. The trainer's warm-up caps
  the decay at (1 + t) / (10 + t), 0.9975 at the end of the full profile's 3,536 steps, so larger values change
  nothing; 0.995 averages over roughly the last 200 steps;
* ``CFT_KEEP=last`` keeps CFT's last state instead of its best validated one (``cft_keep``);
* ``CFT_VAL_N=1000`` chooses CFT's kept epoch on that many validation users (default 128), and ``ALSO_LAST=1``
  also decodes the CFT run's last step (sub-blocks of 8; a paired comparison with the kept epoch);
* ``DRILL=0.25`` drills the ranks on that share of SFT rows (``rank_drill_share``; same caveat as ``AR_EPOCHS``);
  ``DRILL=0`` turns the drill off;
* ``COMPILE=1`` compiles training with static shapes; ``COMPILE_MODE=reduce-overhead`` sets the profile's
  ``compile_mode`` (CUDA graphs in SFT and CFT);
* ``SPLIT=test`` scores every test user instead of validation users 256..1255; ``ALSO_VALID=1`` also scores the CFT
  model on those validation users;
* ``ENGINE=graphed`` sets the profile's ``eval_engine`` (the decoders of validation during training, so the kept
  checkpoints can change; same caveat as ``AR_EPOCHS``), and ``ALSO_GRAPHED=1`` repeats every decode of the run with
  the graphed engine (``<name>_graphed``): the same model, both engines, their records and seconds side by side;
* ``EPOCH_CURVE=1``: at each of CFT's validations (once per epoch), the model of that moment also decodes every test
  user (sub-blocks of 8 and the whole block) and validation users 256..1255 (sub-blocks of 8), graphed, at tau 1.0:
  validity and strict NDCG@3 epoch by epoch, and which epoch each selection rule would keep (about 20 s an epoch on
  one H200; ``CURVE_DECODES=test_sub8`` keeps only the first of the three);

``ar`` trains the full profile's AR SFT, saves it as the ``ar`` stage checkpoint and decodes it freely.
``cft_e<epochs>`` loads that checkpoint, runs CFT (the full profile's recipe) for that many epochs and decodes the
same users at tau 1.0 across the whole block and in sub-blocks of 8, each also with exactly one token per step
(tau 1.01), and at tau 0.9 both ways, each with its failure table. Several ``cft_e*`` can run side by side.
"""
import json
import os
import sys
import time
from dataclasses import replace

import torch

from diffgr2_lite import cft as cft_mod
from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile, validate_profile
from diffgr2_lite.decoders import ar_decoder, diffusion_decoder
from diffgr2_lite.diagnostics import failure_table, training_check_patterns
from diffgr2_lite.evaluate import evaluate

mode, out = sys.argv[1], sys.argv[2]
t0 = time.time()
P = get_profile(os.environ.get("PROF", "full"))
P = validate_profile(replace(P, compile=bool(int(os.environ.get("COMPILE", "0"))) or P.compile,
                             compile_mode=os.environ.get("COMPILE_MODE") or P.compile_mode))
ex = pl.get_examples(P, progress=False)
if mode == "data":
    sys.exit(0)
P = validate_profile(replace(P, seed=int(os.environ.get("SEED", P.seed)),      # the training seed (same data)
                              ar_epochs=float(os.environ.get("AR_EPOCHS", P.ar_epochs)),
                              ar_ema=float(os.environ.get("AR_EMA", P.ar_ema)),
                              rank_drill_share=float(os.environ.get("DRILL", P.rank_drill_share)),
                              eval_engine=os.environ.get("ENGINE", P.eval_engine)))
words = ex.splits["valid"][0]["completion"].split()
res = {"mode": mode, "seed": P.seed, "ar_epochs": P.ar_epochs, "ar_ema": P.ar_ema, "compile": P.compile,
       "rank_drill_share": P.rank_drill_share, "eval_engine": P.eval_engine,
       "compile_mode": P.compile_mode,
       "align_decision": P.align_decision,
       "device": torch.cuda.get_device_name(0) if P.device == "cuda" else "cpu",
       "layout": {"length": len(words), "decision": words.index("pick") + 1, "ranks": words.index("ranks"),
                  "answer": words.index("<answer>"), "block_size": P.block_size}}
if os.environ.get("SPLIT") == "test":                 # SPLIT=test: every test user, as the series scores them
    rows_ds = ex.splits["test"]
else:
    valid = ex.splits["valid"]
    start = 256 if len(valid) > 512 else 0
    rows_ds = valid.select(range(start, min(start + 1000, len(valid))))
res["users"] = os.environ.get("SPLIT", "valid 256..1255")
rows = rows_ds.to_list()
# the (points, pick) of every training check: the failure tables count invalid answers from checks no training row had
seen_checks = training_check_patterns(ex)


def dump():
    """Write the results so far whole or not at all (a failure mid-write must not truncate the last good file)."""
    with open(out + ".tmp", "w") as f:
        f.write(json.dumps(res, indent=1, default=str))
    os.replace(out + ".tmp", out)


def record(name, scored):
    res[name] = {"valid": scored["metrics"]["valid_rate"], "recall@1": scored["metrics"]["recall@1"],
                 "strict_recall@1": scored["metrics_strict"]["recall@1"],
                 "tokens_per_forward": scored["tokens_per_forward"], "decode_seconds": scored["seconds"],
                 "failures": failure_table(scored["outputs"], rows, ex.sid_words, seen_checks)}
    print(mode, name, json.dumps({k: v for k, v in res[name].items() if k != "failures"}),
          json.dumps(res[name]["failures"]), f"{time.time() - t0:.0f}s", flush=True)
    dump()                        # partial results survive a time limit


last_step = []                 # AR_EMA / ALSO_LAST: the same run's last step (without the average, or not the best)
if (mode == "ar" and P.ar_ema) or os.environ.get("ALSO_LAST"):
    from diffgr2_lite.train import Trainer

    _fit = Trainer.fit

    def fit_keeping_the_last_step(self, *args, **kwargs):
        h = _fit(self, *args, **kwargs)
        last_step.append(self.last_step_state)
        return h

    Trainer.fit = fit_keeping_the_last_step
model, hist = pl.get_ar(P, ex)
if mode == "ar":
    res["sft"] = {"steps": hist.get("steps"), "seconds": hist.get("seconds"), "loss_last": hist["loss"][-1]}
    record("ar_free", evaluate(ar_decoder(model, ex, pl.ar_max_new(ex), False, P.device, engine=P.eval_engine),
                               rows_ds, ex, P.eval_batch, P.device))
    if os.environ.get("ALSO_GRAPHED"):
        record("ar_free_graphed", evaluate(ar_decoder(model, ex, pl.ar_max_new(ex), False, P.device, engine="graphed"),
                                           rows_ds, ex, P.eval_batch, P.device))
    if last_step and last_step[-1] is not None:   # paired: the average against its own run's last step
        import copy

        res["sft"].update(val=hist.get("val"), ema=hist.get("ema"), ema_last_decay=hist.get("ema_last_decay"))
        raw = copy.deepcopy(model)
        raw.load_state_dict(last_step[-1])
        record("ar_free_last_step", evaluate(ar_decoder(raw, ex, pl.ar_max_new(ex), False, P.device), rows_ds, ex,
                                             P.eval_batch, P.device))
else:
    epochs = float(mode.split("_e")[1])
    if os.environ.get("EPOCH_CURVE"):          # each CFT validation also decodes every test user and 1,000 others
        _series_validate = cft_mod.diffusion_validate
        valid_1000 = ex.splits["valid"].select(range(256, min(1256, len(ex.splits["valid"]))))
        curve = res.setdefault("epoch_curve", [])
        curve_decodes = os.environ.get("CURVE_DECODES", "test_sub8,test_whole,valid1000_sub8").split(",")

        def validate_with_curve(profile, ex_, n=128, tau=1.0):
            series = _series_validate(profile, ex_, n=n, tau=tau)

            def validate(m):
                point = {"val_series": series(m)}
                for name, ds, sub in (("test_sub8", ex.splits["test"], 8), ("test_whole", ex.splits["test"], 0),
                                      ("valid1000_sub8", valid_1000, 8)):
                    if name not in curve_decodes:
                        continue
                    sc = evaluate(diffusion_decoder(m, ex, profile, 1.0, sub_block=sub, engine="graphed"), ds, ex,
                                  P.eval_batch, P.device)
                    point[name] = {"valid": sc["metrics"]["valid_rate"], "recall@1": sc["metrics"]["recall@1"],
                                   "strict_ndcg@3": sc["metrics_strict"]["ndcg@3"], "invalid": sc["n"] - round(
                                       sc["metrics"]["valid_rate"] * sc["n"])}
                curve.append(point)
                print(mode, "epoch", len(curve), json.dumps(point), f"{time.time() - t0:.0f}s", flush=True)
                dump()
                return point["val_series"]

            return validate

        cft_mod.diffusion_validate = validate_with_curve
    Pc = validate_profile(replace(P, cft_epochs=epochs, cft_lr=float(os.environ.get("LR", P.cft_lr)),
                                  cft_schedule=os.environ.get("CFT_SCHEDULE", P.cft_schedule),
                                  cft_keep=os.environ.get("CFT_KEEP", P.cft_keep),
                                  seed=int(os.environ.get("CFT_SEED", P.seed))))
    cft_model, h = cft_mod.train_cft(Pc, ex, model, "cft", val_users=int(os.environ.get("CFT_VAL_N", 128)))
    res["cft_train"] = {"epochs": epochs, "lr": Pc.cft_lr, "schedule": Pc.cft_schedule, "seed": Pc.seed,
                        "val_users": int(os.environ.get("CFT_VAL_N", 128)), "steps": h["steps"],
                        "seconds": h["seconds"], "loss_last": h["loss"][-1], "val": h.get("val")}
    # tau 1.01: exactly one token per step (at tau 1.0, float32 probabilities that round to 1.0 commit together;
    # Fast-dLLM v2's reference decoder compares strictly, conf > tau, which at tau 1.0 is one token per step)
    # sub-block 0: the whole block (None would be the profile's sub_block, 8 in the full profile)
    decodes = [("plain", 1.0, 0), ("one_per_step", 1.01, 0), ("sub8", 1.0, 8), ("sub8_one_per_step", 1.01, 8),
               ("sub8_tau0.9", 0.9, 8), ("plain_tau0.9", 0.9, 0)]
    chosen = os.environ.get("DECODES")
    for name, tau, sub in decodes:
        if chosen and name not in chosen.split(","):
            continue
        record(name, evaluate(diffusion_decoder(cft_model, ex, Pc, tau, sub_block=sub), rows_ds, ex, P.eval_batch,
                              P.device))
        if os.environ.get("ALSO_GRAPHED"):
            record(name + "_graphed", evaluate(diffusion_decoder(cft_model, ex, Pc, tau, sub_block=sub, engine="graphed"),
                                               rows_ds, ex, P.eval_batch, P.device))
    if os.environ.get("ALSO_LAST") and last_step and last_step[-1] is not None:     # the kept epoch vs the last
        import copy

        last = copy.deepcopy(cft_model)
        last.load_state_dict(last_step[-1])
        record("sub8_last_step", evaluate(diffusion_decoder(last, ex, Pc, 1.0, sub_block=8), rows_ds, ex,
                                          P.eval_batch, P.device))
    if os.environ.get("ALSO_VALID"):         # the same model on validation users 256..1255 (whole block and sub-8)
        valid = ex.splits["valid"]
        rows_ds = valid.select(range(256, min(1256, len(valid))))
        rows = rows_ds.to_list()
        for name, tau, sub in [("valid_plain", 1.0, 0), ("valid_sub8_one_per_step", 1.01, 8)]:
            record(name, evaluate(diffusion_decoder(cft_model, ex, Pc, tau, sub_block=sub), rows_ds, ex,
                                  P.eval_batch, P.device))
res["seconds"] = time.time() - t0
dump()
print(mode, "done", f"{res['seconds']:.0f}s", flush=True)
