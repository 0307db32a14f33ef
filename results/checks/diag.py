import json, re, torch, numpy as np
from diffgr2_lite.config import get_profile
from diffgr2_lite import pipeline as pl
from diffgr2_lite.text import decode_tokens
P = get_profile("full"); ex = pl.get_examples(P, progress=False); model, _ = pl.get_ar(P, ex)
test = ex.splits["test"].select(range(768)); tok = ex.tokenizer
dec = pl.ar_decoder(model, ex, pl.ar_max_new(ex), False, P.device)
stats = dict(n=0, check_exact=0, check_tok_acc=[], pick_num_ok_vs_own_check=0, first_pick_hit=0, pick_sid_ok=0, ans_first_eq_pick=0, ans_first_hit=0)
for i in range(0, len(test), 256):
    rows = test.select(range(i, min(i + 256, len(test)))).to_list()
    prompt = torch.tensor([r["prompt_ids"] for r in rows], device=P.device)
    out = dec(rows, prompt)
    for r, ids in zip(rows, out["tokens"].tolist()):
        gen = " ".join(decode_tokens(tok, ids)); ref = r["completion"]
        stats["n"] += 1
        g_check = gen.split("step3 check")[1].split("pick")[0] if "step3 check" in gen else ""
        r_check = ref.split("step3 check")[1].split("pick")[0]
        stats["check_exact"] += g_check.strip() == r_check.strip()
        gw, rw = g_check.split(), r_check.split()
        stats["check_tok_acc"].append(np.mean([a == b for a, b in zip(gw, rw)]) if gw else 0)
        m = re.search(r"pick (\d+) (<a_\d+> <b_\d+> <c_\d+>)", gen)
        cands = [" ".join(ex.sid_words(c)) for c in r["candidates"]]
        if m:
            k = int(m.group(1)) - 1
            stats["first_pick_hit"] += k == r["target_pos"]
            stats["pick_sid_ok"] += 0 <= k < 10 and m.group(2) == cands[k]
            a = re.search(r"<answer> (<a_\d+> <b_\d+> <c_\d+>)", gen)
            if a:
                stats["ans_first_eq_pick"] += a.group(1) == m.group(2)
                stats["ans_first_hit"] += a.group(1) == cands[r["target_pos"]]
    if i == 0: print(gen[:1500]); print(ref[:900])
stats["check_tok_acc"] = float(np.mean(stats["check_tok_acc"]))
print("@@", json.dumps(stats))
