"""A second, independent training of the AR variants (same config and seed; GPU kernels are not bit-deterministic):
the comparisons the notebook's table leaves implicit, with paired bootstrap intervals."""
import json, os, time
from diffgr2_lite.config import get_profile
from diffgr2_lite import pipeline as pl
from diffgr2_lite.evaluate import bootstrap_vs, first_pick_probe
OUT = os.environ.get("OUT", "/tmp")
P = get_profile(os.environ.get("PROF", "full")); t0 = time.time()
ex = pl.get_examples(P, progress=False)
ar, h = pl.get_ar(P, ex, "reasoning"); direct, hd = pl.get_ar(P, ex, "direct")
floor = pl.record_fixed(P, ex, "retriever", None)["scored"]
S = {"floor": floor}
S["ar"] = pl.evaluate_ar(P, ar, ex, "ar")["scored"]
S["ar_constrained"] = pl.evaluate_ar(P, ar, ex, "ar_constrained", constrained=True)["scored"]
S["ar_direct"] = pl.evaluate_ar(P, direct, ex, "ar_direct")["scored"]
S["ar_direct_constrained"] = pl.evaluate_ar(P, direct, ex, "ar_direct_constrained", constrained=True)["scored"]
res = {"device": (__import__("torch").cuda.get_device_name(0) if P.device == "cuda" else "cpu"), "profile": P.name, "seed": P.seed, "n": floor["n"],
       "metrics": {k: {m: s["metrics"][m] for m in ("recall@1", "recall@3", "ndcg@3", "valid_rate")} for k, s in S.items()},
       "probe_test_recall@1": first_pick_probe(ar, ex.splits["test"], ex.tokenizer, P.device)["recall@1"],
       "pairs": {}}
for a, b in [("ar_constrained", "floor"), ("ar_constrained", "ar_direct_constrained"), ("ar", "floor"),
             ("ar", "ar_direct"), ("ar_direct_constrained", "floor")]:
    res["pairs"][f"{a} - {b}"] = bootstrap_vs(S[a], S[b], P.seed)
res["seconds"] = round(time.time() - t0)
json.dump(res, open(f"{OUT}/replicate.json", "w"), indent=1)
print(json.dumps(res, indent=1))
