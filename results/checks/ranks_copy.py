"""With every candidate's rank in the trace, is validity still limited by copying? AR SFT under two schedules,
then CFT from each, on the same data.

    DIFFGR2_RUNS=/tmp/runs python results/checks/ranks_copy.py data <out.json>        # build the data once, first
    DIFFGR2_RUNS=/tmp/runs python results/checks/ranks_copy.py <variant> <out.json>   # then variants side by side

A variant is ``<schedule>_e<epochs>`` or ``<schedule>_e<epochs>_s<seed>``: the AR learning-rate schedule (``cosine``
as the full profile, or ``stable_decay``: the base rate held until the last fifth of the steps), the SFT epochs, and
the training seed (default 0). The data is the full profile's (seed 0) in every variant, so only training differs. Each variant records the SFT loss curve, where the loss first fell below 0.05 (mean of 100
steps), AR free decoding on validation users 256..1255 with its failure table, then CFT (the full profile's recipe)
from that AR model, decoded on the same users with the plain sampler (tau 1.0, block 32) and with 8-token
sub-blocks, each with its failure table (which includes whether the trace's ranks were already broken).
``CFT_EPOCHS=6,3`` trains one CFT per listed epoch count from the same AR model (default: the profile's; empty: no
CFT). ``COMPILE=1`` trains with torch.compile (static shapes, the trainer's default options). ``BLOCK=35`` trains and
decodes CFT with another block size (35 divides 105, where the full profile's fixed-width trace writes ``pick``, so
the whole check lies in earlier blocks); ``SUBS=8,4`` lists the sub-block sizes decoded besides the plain sampler.
"""
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from diffgr2_lite import cft as cft_mod
from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile, validate_profile
from diffgr2_lite.decoders import ar_decoder, diffusion_decoder
from diffgr2_lite.diagnostics import failure_table
from diffgr2_lite.evaluate import evaluate

variant, out = sys.argv[1], sys.argv[2]


def to_json(o):
    """numpy values (a step number, a loss, an array) as plain JSON: a check must never die writing its results."""
    return o.tolist() if hasattr(o, "tolist") else str(o)


def dump():
    """Write the results so far whole or not at all (a failure mid-write must not truncate the last good file)."""
    text = json.dumps(res, indent=1, default=to_json)
    with open(out + ".tmp", "w") as f:
        f.write(text)
    os.replace(out + ".tmp", out)


P0 = get_profile(os.environ.get("PROF", "full"))
t0 = time.time()
ex = pl.get_examples(P0, progress=False)
if variant == "data":
    sys.exit(0)
name, _, seed = variant.rpartition("_s") if "_s" in variant.split("_e")[-1] else (variant, "", "0")
schedule, epochs = name.rsplit("_e", 1)
P = validate_profile(replace(P0, ar_schedule=schedule, ar_epochs=float(epochs), seed=int(seed),
                             compile=bool(int(os.environ.get("COMPILE", "0"))) or P0.compile))
res = {"variant": variant, "schedule": schedule, "ar_epochs": float(epochs), "seed": int(seed), "compile": P.compile,
       "device": torch.cuda.get_device_name(0) if P.device == "cuda" else "cpu"}
valid = ex.splits["valid"]
start = 256 if len(valid) > 512 else 0
rows_ds = valid.select(range(start, min(start + 1000, len(valid))))
rows = rows_ds.to_list()


def record(name, scored):
    res[name] = {"valid": scored["metrics"]["valid_rate"], "recall@1": scored["metrics"]["recall@1"],
                 "strict_recall@1": scored["metrics_strict"]["recall@1"],
                 "failures": failure_table(scored["outputs"], rows, ex.sid_words)}
    print(variant, name, json.dumps({k: v for k, v in res[name].items() if k != "failures"}),
          json.dumps(res[name]["failures"]), f"{time.time() - t0:.0f}s", flush=True)
    dump()                        # partial results survive a time limit


model, hist = pl.train_ar(P, ex, "reasoning")
steps, loss = np.array(hist["step"]), np.array(hist["loss"])
window = [(s, float(loss[(steps > s - 100) & (steps <= s)].mean())) for s in steps if s >= 100]
res["sft"] = {"steps": hist["steps"], "seconds": hist["seconds"], "loss_last": float(loss[-1]),
              "loss_curve": [[int(s), float(v)] for s, v in zip(steps, loss)],
              "below_0.05_at": next((int(s) for s, m in window if m < 0.05), None)}
print(variant, "SFT", res["sft"]["loss_last"], res["sft"]["below_0.05_at"], f"{time.time() - t0:.0f}s", flush=True)
record("ar_free", evaluate(ar_decoder(model, ex, pl.ar_max_new(ex), False, P.device), rows_ds, ex, P.eval_batch,
                           P.device))
block = int(os.environ.get("BLOCK", P.block_size))
subs = [int(b) for b in os.environ.get("SUBS", "8").split(",") if b]
res["cft_block_size"] = block
for cft_epochs in [float(e) for e in os.environ.get("CFT_EPOCHS", str(P.cft_epochs)).split(",") if e]:
    tag = "cft" if cft_epochs == P.cft_epochs else f"cft_e{cft_epochs:g}"
    Pc = validate_profile(replace(P, cft_epochs=cft_epochs, block_size=block))
    cft_model, h = cft_mod.train_cft(Pc, ex, model, "cft")
    res[f"{tag}_train"] = {"epochs": cft_epochs, "steps": h["steps"], "seconds": h["seconds"],
                           "loss_last": h["loss"][-1]}
    for name, sub in [(f"{tag}_plain", None)] + [(f"{tag}_sub{b}", b) for b in subs]:
        record(name, evaluate(diffusion_decoder(cft_model, ex, Pc, 1.0, sub_block=sub), rows_ds, ex, P.eval_batch,
                              P.device))
    del cft_model
res["seconds"] = time.time() - t0
dump()
print(variant, "done", f"{res['seconds']:.0f}s", flush=True)
