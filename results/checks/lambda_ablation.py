"""The effect of GR2's decoupled weights: the reasoning model trained with lambda_r in {0.1, 0.5, 1.0} (lambda_o = 1),
everything else as the full profile. Run on one GPU: DIFFGR2_RUNS=/tmp/lam python3 results/checks/lambda_ablation.py"""
import json, os, time
import torch
from diffgr2_lite.config import get_profile
from diffgr2_lite import pipeline as pl
from diffgr2_lite.evaluate import bootstrap_vs, first_pick_probe
OUT = os.environ.get("OUT", "/tmp")
P = get_profile(os.environ.get("PROF", "full"))
ex = pl.get_examples(P, progress=False)
floor = pl.record_fixed(P, ex, "retriever", None)["scored"]
res = {"device": torch.cuda.get_device_name(0) if P.device == "cuda" else "cpu", "profile": P.name, "seed": P.seed,
       "n": floor["n"], "lambda_o": P.lambda_answer, "floor_recall@1": floor["metrics"]["recall@1"], "runs": {}}
for lam in (0.1, 1.0, 0.5):
    t = time.time()
    model, hist = pl.train_ar(P, ex, "reasoning", lambda_r=lam)
    free = pl.evaluate_ar(P, model, ex, f"ar_lam{lam}")["scored"]
    cons = pl.evaluate_ar(P, model, ex, f"ar_lam{lam}_constrained", constrained=True)["scored"]
    res["runs"][str(lam)] = {
        "free": {k: free["metrics"][k] for k in ("recall@1", "ndcg@3", "valid_rate", "mean_reasoning_tokens")},
        "constrained": {k: cons["metrics"][k] for k in ("recall@1", "ndcg@3")},
        "constrained_vs_floor": bootstrap_vs(cons, floor, P.seed)["recall@1"],
        "probe_recall@1": first_pick_probe(model, ex.splits["test"], ex.tokenizer, P.device)["recall@1"],
        "best_val": hist["best_val"], "seconds": round(time.time() - t)}
    print("@@", lam, json.dumps(res["runs"][str(lam)]), flush=True)
    json.dump(res, open(f"{OUT}/lambda_ablation.json", "w"), indent=1)
