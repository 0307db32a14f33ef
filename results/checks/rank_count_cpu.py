"""Does drilling the ranks make a small transformer count instead of recall? A CPU study on the real checks.

The ranks that end the trace are a count over the check's points and the pick (``rank_drill.teacher_order``). The
full profile's training rows hold 12,231 distinct (points, pick) checks and 36.1% of the test users' teacher checks
are none of them. This study isolates that sub-task: a small Llama (transformers) reads only the check and the pick,

    <bos> [1] p1 [2] p2 ... [10] p10 pick [k] ranks  ->  #r1 ... #r10

and is trained on the training rows' checks for as many passes as SFT makes (16 epochs), with a share of its rows
drilled as ``rank_drill`` drills them (each candidate's points drawn from a random row and position of the batch,
the ranks recounted). It is scored by greedy decoding on the test users' checks, split into checks seen and unseen
in training. It is a model of the sub-task, not of the series' model (which also reads the prompt and writes the
check itself), so it can say whether drilling changes how a transformer generalises the count, not by how much the
series' validity moves.

    DIFFGR2_RUNS=<runs with the full profile's data> python results/checks/rank_count_cpu.py <out.json>

Environment: ``SHARES=0,0.25,0.5``, ``SEEDS=0,1``, ``EPOCHS=16``, ``HIDDEN=64``, ``LAYERS=2`` (the defaults).
"""
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile
from diffgr2_lite.diagnostics import check_pattern
from diffgr2_lite.rank_drill import teacher_order

N = 10
BOS, PICK, RANKS = 1, 2, 3
LABEL0 = 4                               # [1]..[10]
POINT0 = LABEL0 + N                      # points 0..MAX_POINTS
MAX_POINTS = 20
RANK0 = POINT0 + MAX_POINTS + 1          # #1..#10
VOCAB = RANK0 + N


def checks(completions) -> tuple[torch.Tensor, torch.Tensor]:
    """(points [R, N], pick [R]) of each teacher completion's check."""
    pats = [check_pattern(c, N) for c in completions]
    return torch.tensor([p for p, _ in pats]), torch.tensor([k for _, k in pats])


def sequences(points: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
    """The token rows, ranks included (the teacher's: the pick first, then by points, ties in retriever order)."""
    r = points.shape[0]
    place = teacher_order(points, pick).argsort(1)                                     # rank - 1 per candidate
    check = torch.stack([LABEL0 + torch.arange(N).expand(r, N), POINT0 + points.clamp(max=MAX_POINTS)], -1)
    return torch.cat([torch.full((r, 1), BOS), check.reshape(r, 2 * N), torch.full((r, 1), PICK),
                      (LABEL0 + pick)[:, None], torch.full((r, 1), RANKS), RANK0 + place], 1)


def drill(points: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    r = points.shape[0]
    drawn = points[torch.randint(0, r, (r, N), generator=gen), torch.randint(0, N, (r, N), generator=gen)]
    return torch.where((torch.rand(r, generator=gen) < share)[:, None], drawn, points)


@torch.no_grad()
def greedy_ranks(model, seqs: torch.Tensor) -> torch.Tensor:
    x = seqs[:, :-N]
    for _ in range(N):
        nxt = model(input_ids=x).logits[:, -1].argmax(-1)
        x = torch.cat([x, nxt[:, None]], 1)
    return x[:, -N:]


def run(train_pts, train_pick, test_seqs, unseen, share, seed, epochs, hidden, layers) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=4 * hidden, max_position_embeddings=64,
                      attn_implementation="sdpa", pad_token_id=0, bos_token_id=BOS, eos_token_id=0)
    model = LlamaForCausalLM(cfg)
    batch = 256
    steps = int(epochs * len(train_pts) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (steps - s) / (0.2 * steps)))  # stable, decay
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(train_pts), (batch,), generator=gen)
        pts = drill(train_pts[idx], share, gen)
        x = sequences(pts, train_pick[idx])
        labels = torch.full_like(x, -100)
        labels[:, -N:] = x[:, -N:]                                                    # loss on the ranks only
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        opt.step(); sched.step(); opt.zero_grad()
    model.eval()
    got = greedy_ranks(model, test_seqs)
    exact = (got == test_seqs[:, -N:]).all(1)
    perm = (got.sort(1).values == RANK0 + torch.arange(N)).all(1)
    res = {"share": share, "seed": seed, "steps": steps, "seconds": round(time.time() - t0, 1),
           "final_loss": float(loss.detach()), "exact": float(exact.float().mean()), "permutation": float(perm.float().mean()),
           "exact_seen": float(exact[~unseen].float().mean()), "exact_unseen": float(exact[unseen].float().mean()),
           "permutation_unseen": float(perm[unseen].float().mean())}
    print(json.dumps(res), flush=True)
    return res


def main(out: str):
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    P = get_profile("full")
    ex = pl.get_examples(P, progress=False)
    train = [c for s in ("train", "reading") for c in ex.splits[s]["completion"]]
    train_pts, train_pick = checks(train)
    test = [c for s in ("valid", "test") for c in ex.splits[s]["completion"]]
    test_pts, test_pick = checks(test)
    seen = {(tuple(p), int(k)) for p, k in zip(train_pts.tolist(), train_pick.tolist())}
    unseen = torch.tensor([(tuple(p), int(k)) not in seen for p, k in zip(test_pts.tolist(), test_pick.tolist())])
    test_seqs = sequences(test_pts, test_pick)
    res = {"what": __doc__.split("\n")[0], "device": "CPU (2 threads)", "train_rows": len(train),
           "train_checks_distinct": len(seen), "test_rows": len(test), "test_unseen": float(unseen.float().mean()),
           "epochs": float(os.environ.get("EPOCHS", 16)), "hidden": int(os.environ.get("HIDDEN", 64)),
           "layers": int(os.environ.get("LAYERS", 2)), "runs": []}
    for seed in [int(s) for s in os.environ.get("SEEDS", "0,1").split(",")]:
        for share in [float(s) for s in os.environ.get("SHARES", "0,0.25,0.5").split(",")]:
            res["runs"].append(run(train_pts, train_pick, test_seqs, unseen, share, seed, res["epochs"],
                                   res["hidden"], res["layers"]))
            with open(out + ".tmp", "w") as f:
                json.dump(res, f, indent=1)
            os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main(sys.argv[1])
