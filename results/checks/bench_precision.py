"""Does the speed benchmark's precision change validity? The series scores every stage on the test users with the
model in float32 (``pipeline.evaluate_ar`` / ``evaluate_diffusion``), while notebook 08 times and scores the same
checkpoints through ``fast.speed_model``: the weights cast to bf16, so every activation is bf16 too (training ran
under bf16 *autocast*: float32 weights and residual stream, bf16 matrix products). A ranking that is valid in float32
can break in bf16, and then no setting of the benchmark is all-valid however good the model is.

This check decodes every test user with the benchmark's own decoders (static cache, graphs, batch 64) twice, with
bf16 weights and with float32 weights, for AR and for the final block-diffusion model at each tau (``TAUS``, default
1.0 and 0.9) and each sub-block of the profile's benchmark, and prints valid rate and R@1 of each beside the series'
float32 evaluation. ``DTYPES=float32`` runs the float32 half alone: notebook 08 now scores its bf16 settings on every
test user itself.

    DIFFGR2_RUNS=<runs of a finished series> python results/checks/bench_precision.py <out.json>

It loads the series' checkpoints (``ar`` and ``rl``) from the runs folder as they are, whatever profile hash they
were saved under, and trains nothing: a missing checkpoint stops it. With the ``smoke`` profile (``PROF=smoke``,
after a smoke series) it runs on a CPU in seconds, as a test of the script.
"""
import json
import os
import sys
import time

import torch

from diffgr2_lite import artifacts as art
from diffgr2_lite import pipeline as pl
from diffgr2_lite.bench import make_scorer, measure_setting, prompt_groups
from diffgr2_lite.config import get_profile
from diffgr2_lite.fast import FastARDecoder, FastDiffusionDecoder, speed_model
from diffgr2_lite.model import load_checkpoint

out_path = sys.argv[1]
P = get_profile(os.environ.get("PROF", "full"))
batch = int(os.environ.get("BATCH", 64))
taus = [float(t) for t in os.environ.get("TAUS", "1.0,0.9").split(",")]
dtypes = os.environ.get("DTYPES", "bf16,float32").split(",")
if not set(dtypes) <= {"bf16", "float32"}:
    sys.exit(f"DTYPES={','.join(dtypes)}: each must be bf16 or float32")
t0 = time.time()
ex = pl.get_examples(P, progress=False)


def saved(stage):
    """The series' checkpoint of ``stage`` as it is (no key check: a newer profile field must not retrain it)."""
    path = art.stage_dir(P, stage) / "model"
    if not (path / "meta.json").exists():
        sys.exit(f"no {stage} checkpoint at {path}: run the series first (DIFFGR2_RUNS names its runs folder)")
    return load_checkpoint(path, ex.tokenizer, P.device)[0]


ar_model, final = saved("ar"), saved("rl")
test = ex.splits["test"]
n = len(test)
rows = test.select_columns(["candidates", "target_pos"]).to_list()
prompts = torch.tensor(test["prompt_ids"])
score = make_scorer(rows, ex)
tok = ex.tokenizer
max_new = pl.ar_max_new(ex)
B = P.block_size
blocks = -(-max_new // B)
graphs = P.device == "cuda"


def decode_all(decoder) -> dict:
    """Every test user once, in the benchmark's own batches (the last filled up, scored once), scored."""
    m = measure_setting(decoder.decode, prompts, prompt_groups(n, batch, n), tok.eos_token_id, B, repeats=1, warmup=0,
                        device=P.device, score=score)
    return {k: m[k] for k in ("recall@1", "strict_recall@1", "valid_rate")}


def dump(show: bool = True):
    """Print the newest setting and rewrite the file whole (partial results survive a time limit)."""
    if show and res["settings"]:
        print(res["settings"][-1], f"{time.time() - t0:.0f} s", flush=True)
    with open(out_path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(out_path + ".tmp", out_path)


res = {"profile": P.name, "device": torch.cuda.get_device_name(0) if P.device == "cuda" else "cpu",
       "users": n, "batch": batch, "block_size": B, "settings": []}
for dtype_name, dtype in (("bf16", torch.bfloat16), ("float32", torch.float32)):
    if dtype_name not in dtypes:
        continue
    if dtype_name == "bf16" and P.device != "cuda" and os.environ.get("CPU_BF16") != "1":
        continue                                     # bf16 on a CPU is slow; CPU_BF16=1 runs it anyway
    fast_ar, fast_final = speed_model(ar_model, P.device, dtype), speed_model(final, P.device, dtype)
    dec = FastARDecoder(fast_ar, batch, prompts.shape[1], max_new, tok.eos_token_id, graphs=graphs)
    res["settings"].append({"dtype": dtype_name, "decoder": "ar", **decode_all(dec)})
    dump()
    del dec
    for sub in sorted(set(P.bench_sub_blocks) | {P.sub_block}):
        for tau in taus:
            dec = FastDiffusionDecoder(fast_final, batch, prompts.shape[1], blocks, B, tok.mask_token_id,
                                       tok.eos_token_id, tau=tau, graphs=graphs, sub_block=sub if sub and sub < B
                                       else None)
            res["settings"].append({"dtype": dtype_name, "decoder": "diffusion", "tau": tau, "sub_block": sub,
                                    **decode_all(dec)})
            dump()
            del dec
res["series_evaluation_float32"] = {}                 # the series' own records of the same checkpoints
for stage in ("ar", "rl"):
    f = art.stage_dir(P, stage) / "metrics.json"
    if f.exists():
        rec = art.read_json(f)
        res["series_evaluation_float32"][stage] = {k: rec["metrics"][k] for k in ("valid_rate", "recall@1")}
res["seconds"] = time.time() - t0
dump(show=False)
print(json.dumps(res["series_evaluation_float32"]), "done")
