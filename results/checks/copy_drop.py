"""Does the copy drop land every time? AR SFT under two learning-rate schedules and several training seeds.

    DIFFGR2_RUNS=/tmp/runs python results/checks/copy_drop.py data <out.json>        # build the data once, first
    DIFFGR2_RUNS=/tmp/runs python results/checks/copy_drop.py <variant> <out.json>   # then variants side by side

A variant is ``<schedule>_s<seed>``: ``cosine`` (the full profile as committed) or ``stable_decay`` (the base rate
held until the last fifth of the steps, train.stable_decay_lr), and the training seed (model initialisation, batch
order, relabelling draws). The data is the full profile's (seed 0) in every variant, so only training differs.
Each variant records the SFT loss curve, where the loss first fell below 0.05 (mean of 100 steps) and the learning
rate factor there, the final loss, and AR free decoding on validation users 256..1255 with its failure table.
"""
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile
from diffgr2_lite.decoders import ar_decoder
from diffgr2_lite.diagnostics import failure_table
from diffgr2_lite.evaluate import evaluate
from diffgr2_lite.train import SCHEDULES

variant, out = sys.argv[1], sys.argv[2]
P0 = get_profile(os.environ.get("PROF", "full"))
t0 = time.time()
ex = pl.get_examples(P0, progress=False)
if variant == "data":
    sys.exit(0)
schedule, seed = variant.rsplit("_s", 1)
P = replace(P0, ar_schedule=schedule, seed=int(seed))
res = {"variant": variant, "schedule": schedule, "seed": int(seed),
       "device": torch.cuda.get_device_name(0) if P.device == "cuda" else "cpu"}
model, hist = pl.train_ar(P, ex, "reasoning")
steps, loss = np.array(hist["step"]), np.array(hist["loss"])
window = [(s, float(loss[(steps > s - 100) & (steps <= s)].mean())) for s in steps if s >= 100]
below = next((int(s) for s, m in window if m < 0.05), None)
total = hist["steps"]
res["sft"] = {"steps": total, "seconds": hist["seconds"], "loss_last": float(loss[-1]),
              "loss_curve": [[int(s), float(v)] for s, v in zip(steps, loss)], "below_0.05_at": below,
              "lr_factor_there": None if below is None else SCHEDULES[schedule](int(below), total, max(1, total // 20))}
print(variant, json.dumps({k: v for k, v in res["sft"].items() if k != "loss_curve"}), f"{time.time() - t0:.0f}s",
      flush=True)
valid = ex.splits["valid"]
start = 256 if len(valid) > 512 else 0
rows_ds = valid.select(range(start, min(start + 1000, len(valid))))
scored = evaluate(ar_decoder(model, ex, pl.ar_max_new(ex), False, P.device), rows_ds, ex, P.eval_batch, P.device)
res["ar_free"] = {"valid": scored["metrics"]["valid_rate"], "recall@1": scored["metrics"]["recall@1"],
                  "failures": failure_table(scored["outputs"], rows_ds.to_list(), ex.sid_words)}
print(variant, "AR free valid", res["ar_free"]["valid"], f"{time.time() - t0:.0f}s", flush=True)
res["seconds"] = time.time() - t0
json.dump(res, open(out, "w"), indent=1)
