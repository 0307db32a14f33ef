"""How long and how hard CFT must train before the converted model writes valid rankings on its own.

    DIFFGR2_RUNS=/tmp/runs python results/checks/cft_ladder.py ar <out.json>            # data + AR (run first, once)
    DIFFGR2_RUNS=/tmp/runs python results/checks/cft_ladder.py <variant> <out.json>     # then variants side by side

``ar`` builds the full profile's data and AR model (or loads them) and decodes validation users 256..1255 with AR
free decoding. Every other variant loads that AR model, trains CFT with the variant's epochs and learning rate
(everything else as the full profile), and after every epoch decodes validation users 256..767 with the plain
sampler (tau 1.0, block 32) and with 8-token sub-blocks, recording valid rate and strict NDCG@3; the checkpoint kept
is the best plain strict NDCG@3 on those users. The kept model is then decoded on users 256..1255 with the plain
sampler, sub-blocks of 4, 8 and 16, and tau 0.9 (plain and sub-blocks of 8), each with its failure table.
"""
import json
import os
import sys
import time
from dataclasses import replace

import torch

from diffgr2_lite import cft as cft_mod
from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile
from diffgr2_lite.decoders import ar_decoder, diffusion_decoder
from diffgr2_lite.diagnostics import failure_table
from diffgr2_lite.evaluate import evaluate

VARIANTS = {"e7_lr3e-4": dict(cft_epochs=7.0, cft_lr=3e-4), "e7_lr1e-3": dict(cft_epochs=7.0, cft_lr=1e-3),
            "e3_lr3e-4": dict(cft_epochs=3.0, cft_lr=3e-4)}
variant, out = sys.argv[1], sys.argv[2]
P0 = get_profile(os.environ.get("PROF", "full"))
t0 = time.time()
ex = pl.get_examples(P0, progress=False)
valid = ex.splits["valid"]
start = 256 if len(valid) > 512 else 0
final = valid.select(range(start, min(start + 1000, len(valid))))
per_epoch = valid.select(range(start, min(start + 512, len(valid))))
res = {"variant": variant, "device": torch.cuda.get_device_name(0) if P0.device == "cuda" else "cpu",
       "n_final": len(final), "n_per_epoch": len(per_epoch)}


def dump():
    json.dump(res, open(out, "w"), indent=1)                        # partial results survive a time limit


def summary(scored, rows, name):
    m = scored["metrics"]
    res[name] = {"valid": m["valid_rate"], "recall@1": m["recall@1"], "strict_recall@1": scored["metrics_strict"]["recall@1"],
                 "ndcg@3": m["ndcg@3"], "strict_ndcg@3": scored["metrics_strict"]["ndcg@3"],
                 "tokens_per_forward": scored.get("tokens_per_forward"),
                 "failures": failure_table(scored["outputs"], rows, ex.sid_words)}
    print(name, json.dumps({k: v for k, v in res[name].items() if k != "failures"}), f"{time.time() - t0:.0f}s", flush=True)
    dump()


ar, hist = pl.get_ar(P0, ex, "reasoning")
if variant == "ar":
    res["sft_loss_last"] = hist["loss"][-1]
    summary(evaluate(ar_decoder(ar, ex, pl.ar_max_new(ex), False, P0.device), final, ex, P0.eval_batch, P0.device),
            final.to_list(), "ar_free")
    sys.exit(0)

P = replace(P0, **VARIANTS[variant])
res["overrides"] = VARIANTS[variant]
res["epochs"] = []
rows_pe = per_epoch.to_list()


def make_validate(profile, ex_, n=128, tau=1.0):
    """Replaces the recipe's validation: per-epoch validity of the plain sampler and of 8-token sub-blocks."""
    def validate(m):
        rec = {"t": round(time.time() - t0)}
        for name, sub in (("plain", None), ("sub8", 8)):
            s = evaluate(diffusion_decoder(m, ex, P, 1.0, sub_block=sub), per_epoch, ex, P.eval_batch, P.device,
                         desc="validating")
            rec[name] = {"valid": s["metrics"]["valid_rate"], "strict_ndcg@3": s["metrics_strict"]["ndcg@3"]}
        res["epochs"].append(rec)
        print("epoch", len(res["epochs"]), json.dumps(rec), flush=True)
        dump()
        return rec["plain"]["strict_ndcg@3"]
    return validate


cft_mod.diffusion_validate = make_validate
model, h = cft_mod.train_cft(P, ex, ar, "cft")
res["train"] = {"steps": h["steps"], "seconds": h["seconds"], "loss_last": h["loss"][-1], "loss": h["loss"][::5]}
rows = final.to_list()
for name, tau, sub in (("plain", 1.0, None), ("sub4", 1.0, 4), ("sub8", 1.0, 8), ("sub16", 1.0, 16),
                       ("tau0.9", 0.9, None), ("tau0.9_sub8", 0.9, 8)):
    summary(evaluate(diffusion_decoder(model, ex, P, tau, sub_block=sub), final, ex, P.eval_batch, P.device), rows, name)
res["seconds"] = time.time() - t0
dump()
print("done", f"{res['seconds']:.0f}s")
