"""Which SFT settings make the AR re-ranker's first pick beat the retriever? Sequential variants after one warm-up.

Archived: written at commit de7ba51 for the format of that time (unlabelled candidates, picks written as numbers,
``ar.train``), and kept as the record of how ``2026-11-26-h200-trace-diagnostics.json`` was made. It does not run
against the current package; ``evaluate.first_pick_probe`` is today's form of its first-pick measurement.
"""
import copy, json, os, sys, time
import torch
from diffgr2_lite.config import get_profile
from diffgr2_lite import pipeline as pl
from diffgr2_lite.ar import train, autocast
OUT = os.environ.get("OUT", "/tmp")
P = get_profile(os.environ.get("PROF", "full"))
t0 = time.time()
ex = pl.get_examples(P, progress=False)
warm, _ = pl.get_copy_warmup(P, ex)
print("@@ data+warm", round(time.time() - t0), ex.report["examples"], flush=True)
tok = ex.tokenizer
pick_id = tok.convert_tokens_to_ids("pick")
num_ids = torch.tensor(tok.convert_tokens_to_ids([str(k) for k in range(1, 11)]), device=P.device)

def first_pick_rows(split):
    rows = ex.splits[split]
    seqs, targets = [], []
    for r in rows:
        c = r["completion_ids"]
        seqs.append(r["prompt_ids"] + c[: c.index(pick_id) + 1]); targets.append(r["target_pos"])
    return seqs, torch.tensor(targets, device=P.device)

FP = {s: first_pick_rows(s) for s in ("valid", "test")}

@torch.no_grad()
def first_pick(model, split, chunk=500):
    seqs, targets = FP[split]
    picks, p0 = [], []
    for i in range(0, len(seqs), chunk):
        part = seqs[i:i + chunk]; L = max(map(len, part))
        x = torch.full((len(part), L), tok.pad_token_id, dtype=torch.long)
        for j, s in enumerate(part):
            x[j, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in part], device=P.device)
        with autocast(P.device):
            logits = model(x.to(P.device)).logits
        lg = logits[torch.arange(len(part), device=P.device), last][:, num_ids].float()
        picks.append(lg.argmax(-1)); p0.append(lg.softmax(-1)[:, 0])
    picks = torch.cat(picks)
    return {"r1": round(float((picks == targets).float().mean()), 4), "pick1_share": round(float((picks == 0).float().mean()), 4),
            "mean_p1": round(float(torch.cat(p0).mean()), 4)}

print("@@ floor", {s: round(float((FP[s][1] == 0).float().mean()), 4) for s in FP}, flush=True)
variants = json.loads(sys.argv[1])
results = {}
for name, over in variants.items():
    t = time.time()
    model = copy.deepcopy(warm).to(P.device)
    cfg = dict(epochs=P.ar_epochs, lr=P.ar_lr, batch_size=P.batch_size, lambda_r=P.lambda_reasoning, lambda_o=P.lambda_answer)
    cfg.update(over)
    curve = []
    hist = train(model, ex.splits["train"], tok, device=P.device, seed=P.seed, desc=name,
                 validate=lambda m: (curve.append(first_pick(m, "valid")), curve[-1]["r1"])[1], **cfg)
    fp_test = first_pick(model, "test")
    P2 = P
    cons = pl.evaluate_ar(P, model, ex, f"ar_c_{name}", constrained=True, split="valid")
    results[name] = dict(over=over, curve=curve, best=hist["best_val"], test_first_pick=fp_test,
                         valid_constrained_r1=round(cons["record"]["metrics"]["recall@1"], 4), secs=round(time.time() - t))
    print("@@", name, json.dumps(results[name]), flush=True)
    json.dump(results, open(f"{OUT}/pick_check.json", "w"), indent=1)
