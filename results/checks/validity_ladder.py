"""Which change makes rankings valid: one variant of the AR + CFT recipe per process, measured on validation users.

    DIFFGR2_RUNS=/tmp/runs_<v> python results/checks/validity_ladder.py <variant> <out.json>

Variants (profile overrides of ``full``): ``recipe`` (the profile as committed), ``lr3e-4`` (SFT at a lower learning
rate), ``no_relabel`` (no SID relabelling in the warm-up, SFT or CFT), ``no_warmup`` (SFT from random weights);
``collide25`` / ``collide50`` (no warm-up; a quarter of the SFT and CFT rows relabelled through bijections and a
quarter / half through colliding maps that make SID prefixes shared, copy_warmup.relabel_sids).
Each trains the copy warm-up, SFT and CFT, then decodes validation users 256..1255 (the first 256 gate the warm-up):
AR free and constrained, the naive conversion, CFT at tau 1.0 / block 32 with and without 8-token sub-blocks, each
with its failure table (diagnostics.failure_table). Several variants run side by side on one GPU.
"""
import json
import os
import sys
import time

import torch

from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile
from diffgr2_lite.decoders import ar_decoder, diffusion_decoder
from diffgr2_lite.diagnostics import failure_table
from diffgr2_lite.evaluate import evaluate, first_pick_probe

VARIANTS = {"recipe": {}, "lr3e-4": {"ar_lr": 3e-4}, "no_relabel": {"relabel_share": 0.0, "copy_relabel": 0.0},
            "no_warmup": {"copy_steps": 0},
            "collide25": {"copy_steps": 0, "relabel_share": 0.25, "collide_share": 0.25},
            "collide50": {"copy_steps": 0, "relabel_share": 0.25, "collide_share": 0.5}}
variant, out = sys.argv[1], sys.argv[2]
P = get_profile(os.environ.get("PROF", "full"), **VARIANTS[variant])
t0 = time.time()
ex = pl.get_examples(P, progress=False)
start = 256 if len(ex.splits["valid"]) > 512 else 0            # smoke: too few users to hold the gate's out
val = ex.splits["valid"].select(range(start, min(start + 1000, len(ex.splits["valid"]))))
rows = val.to_list()
res = {"variant": variant, "overrides": VARIANTS[variant], "device": torch.cuda.get_device_name(0) if P.device == "cuda" else "cpu", "n": len(rows)}


def summary(scored, name):
    m = scored["metrics"]
    res[name] = {"valid": m["valid_rate"], "recall@1": m["recall@1"], "strict_recall@1": scored["metrics_strict"]["recall@1"],
                 "ndcg@3": m["ndcg@3"], "failures": failure_table(scored["outputs"], rows, ex.sid_words),
                 "tokens_per_forward": scored.get("tokens_per_forward")}
    print(name, json.dumps({k: v for k, v in res[name].items() if k != "failures"}), f"{time.time() - t0:.0f}s", flush=True)
    json.dump(res, open(out, "w"), indent=1)                       # partial results survive a time limit


model, hist = pl.get_ar(P, ex, "reasoning")
warm = hist.get("copy_warmup") or {}
res["warmup"] = {k: warm.get(k) for k in ("steps", "passed", "val_step", "val", "final", "seconds")}
res["sft"] = {"steps": hist["steps"], "seconds": hist["seconds"], "val": hist["val"], "loss_last": hist["loss"][-1],
              "loss": hist["loss"], "loss_step": hist.get("step")}
print("trained AR", json.dumps(res["warmup"]), f"{time.time() - t0:.0f}s", flush=True)
max_new = pl.ar_max_new(ex)
summary(evaluate(ar_decoder(model, ex, max_new, False, P.device), val, ex, P.eval_batch, P.device), "ar_free")
summary(evaluate(ar_decoder(model, ex, max_new, True, P.device), val, ex, P.eval_batch, P.device), "ar_constrained")
res["probe_recall@1"] = first_pick_probe(model, val, ex.tokenizer, P.device)["recall@1"]
summary(evaluate(diffusion_decoder(model, ex, P, 1.0), val, ex, P.eval_batch, P.device), "naive")
cft, hc = pl.get_cft(P, ex, model)
res["cft_train"] = {"steps": hc["steps"], "seconds": hc["seconds"], "val": hc["val"]}
summary(evaluate(diffusion_decoder(cft, ex, P, 1.0), val, ex, P.eval_batch, P.device), "cft")
summary(evaluate(diffusion_decoder(cft, ex, P, 1.0, sub_block=8), val, ex, P.eval_batch, P.device), "cft_sub8")
summary(evaluate(diffusion_decoder(cft, ex, P, 0.9), val, ex, P.eval_batch, P.device), "cft_tau0.9")
res["seconds"] = time.time() - t0
json.dump(res, open(out, "w"), indent=1)
print("done", f"{res['seconds']:.0f}s")
