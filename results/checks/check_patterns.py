"""How many of the evaluation users' checks (points and pick) no training row has: the count the rank drill is about.

    DIFFGR2_RUNS=<runs with the full profile's data> python results/checks/check_patterns.py <out.json>
"""
import json
import sys

from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile
from diffgr2_lite.diagnostics import check_pattern, training_check_patterns

P = get_profile("full")
ex = pl.get_examples(P, progress=False)
seen = training_check_patterns(ex)
res = {"what": __doc__.split("\n")[0], "profile": "full", "dataset": P.dataset, "device": "CPU",
       "training_rows": len(ex.splits["train"]) + len(ex.splits["reading"]), "training_checks_distinct": len(seen)}
for split in ("valid", "test"):
    pats = [check_pattern(c, P.n_candidates) for c in ex.splits[split]["completion"]]
    res[split] = {"users": len(pats), "unseen": sum(p not in seen for p in pats) / len(pats)}
print(json.dumps(res))
with open(sys.argv[1], "w") as f:
    json.dump(res, f, indent=1)
