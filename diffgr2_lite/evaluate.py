"""Evaluate any decoder on a split: decode in batches, parse every output, score it both ways.

A decoder is a function ``decode(rows, prompt) -> dict`` returning at least ``tokens`` ([B, T] completion token ids);
it may add ``forwards`` (model calls) so tokens committed per forward can be reported.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from .progress import tqdm

from .ar import autocast
from .metrics import score_parses
from .text import EOS, decode_tokens, parse_ranking


def evaluate(decode, ds, example_set, batch_size: int, device, desc: str = "evaluating") -> dict:
    tok = example_set.tokenizer
    rows = ds.select_columns(["prompt_ids", "candidates", "target_pos"]).to_list()
    parses, outputs, forwards, gen_tokens, row_forwards = [], [], 0, 0, 0
    t0 = time.time()
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, mininterval=1, leave=False):
        chunk = rows[i:i + batch_size]
        prompt = torch.tensor([r["prompt_ids"] for r in chunk], dtype=torch.long, device=device)
        out = decode(chunk, prompt)
        forwards += int(out.get("forwards", 0))
        steps = out["steps"].tolist() if "steps" in out else None
        for j, (r, ids) in enumerate(zip(chunk, out["tokens"].tolist())):
            toks = decode_tokens(tok, ids)
            if EOS in toks:
                toks = toks[: toks.index(EOS) + 1]
            gen_tokens += len(toks)
            # forwards this row needed: one per token for AR; the steps of its blocks for block diffusion
            if steps is None:
                row_forwards += len(toks)
            else:
                B = out.get("block_size") or out["tokens"].shape[1] // len(steps[j])
                row_forwards += sum(steps[j][: -(-len(toks) // B)])
            outputs.append(" ".join(toks))
            parses.append(parse_ranking(toks, [example_set.sid_words(c) for c in r["candidates"]]))
    scored = score_parses(parses, [r["target_pos"] for r in rows])
    scored.update(parses=parses, outputs=outputs, forwards=forwards, generated_tokens=gen_tokens,
                  tokens_per_forward=gen_tokens / max(1, row_forwards), seconds=time.time() - t0, n=len(rows))
    return scored


def fixed_rankings(ds, example_set, column: str | None) -> dict:
    """Score fixed rankings with no model: the retriever order (``column=None``) or e.g. ``teacher_ranking``."""
    from .text import build_answer

    rows = ds.to_list()
    parses = []
    for r in rows:
        sids = [example_set.sid_words(c) for c in r["candidates"]]
        order = r[column] if column else list(range(len(sids)))
        parses.append(parse_ranking(build_answer(sids, order), sids))
    scored = score_parses(parses, [r["target_pos"] for r in rows])
    scored.update(parses=parses, n=len(rows))
    return scored


def bootstrap_vs(scored: dict, reference: dict, seed: int = 0) -> dict:
    """Paired bootstrap intervals of recall@1 and ndcg@3 differences (this system minus the reference)."""
    from .metrics import paired_bootstrap

    n = len(scored["_per"]["recall@1"])      # a system evaluated on the first n users is compared on those users
    return {k: paired_bootstrap(scored["_per"][k], reference["_per"][k][:n], seed=seed) for k in ("recall@1", "ndcg@3")}


def per_example_array(scored: dict, key: str) -> np.ndarray:
    return scored["_per"][key]


# ----------------------------------------------------------------------------------------------- evaluation cache
def model_fingerprint(model) -> str:
    """The identity of a model's weights: a hash of every parameter's bytes, so a cached evaluation is never reused for
    other weights (a hash of a few sums missed changes; the whole 14M-parameter model hashes in tens of ms)."""
    import hashlib

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _scored_to_json(scored: dict) -> dict:
    from dataclasses import asdict

    out = {k: v for k, v in scored.items() if k not in ("_per", "parses")}
    out["_per"] = {k: np.asarray(v).tolist() for k, v in scored["_per"].items()}
    out["parses"] = [asdict(p) for p in scored["parses"]]
    return out


def _scored_from_json(d: dict) -> dict:
    from .text import ParsedRanking

    d = dict(d)
    d["_per"] = {k: np.asarray(v) for k, v in d["_per"].items()}
    d["parses"] = [ParsedRanking(**p) for p in d["parses"]]
    return d


def cached_evaluation(path, settings: dict, model, run) -> tuple[dict, float]:
    """``run()``'s scored result, saved at ``path`` once per (settings, weights): later notebooks reuse the saved
    per-user results. ``settings`` must name everything else the result depends on (decoder settings, data key).
    Returns (scored, seconds of the evaluation that produced it)."""
    import hashlib
    import json

    from . import artifacts as art

    key = hashlib.sha256(json.dumps({**settings, "model": model_fingerprint(model)}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:12]
    if path.exists():
        try:
            saved = art.read_json(path)
            if saved.get("key") == key:
                return _scored_from_json(saved["scored"]), saved["seconds"]
        except (ValueError, KeyError, TypeError):
            pass
    with art.Timer() as t:
        scored = run()
    art.atomic_write_json(path, {"key": key, "seconds": t.s, "scored": _scored_to_json(scored)})
    return scored, t.s


@torch.no_grad()
def first_pick_probe(model, ds, tokenizer, device, n_candidates: int = 10, batch_size: int = 256) -> dict:
    """Which candidate does the model pick first, given the teacher's trace up to its first ``pick``?

    Everything before the first pick (history pattern, complements, the check of every candidate) is a function of
    the prompt alone, so feeding the teacher's version isolates the *decision* from the model's skill at writing the
    trace. The model's next token is a candidate label; its argmax over ``[1]``..``[N]`` is the pick. Returns the pick's
    Recall@1 on ``ds``, how often it is the retriever's first, and the mean probability given to that one.
    """
    pick_id = tokenizer.convert_tokens_to_ids("pick")
    from .text import label_token_ids

    numbers = torch.tensor(label_token_ids(tokenizer, n_candidates), device=device)
    rows = ds.select_columns(["prompt_ids", "completion_ids", "target_pos"]).to_list()
    seqs = []
    for r in rows:
        c = r["completion_ids"]
        if pick_id not in c:
            raise ValueError("first_pick_probe needs completions with a reasoning trace (a 'pick' step)")
        seqs.append(r["prompt_ids"] + c[: c.index(pick_id) + 1])
    picks, p_first = [], []
    for i in range(0, len(seqs), batch_size):
        part = seqs[i:i + batch_size]
        x = torch.full((len(part), max(map(len, part))), tokenizer.pad_token_id, dtype=torch.long)
        for j, s in enumerate(part):                         # right-padded: causal attention never sees the padding
            x[j, :len(s)] = torch.tensor(s)
        last = torch.tensor([len(s) - 1 for s in part], device=device)
        with autocast(device):                               # the head only where the pick is read, not everywhere
            hidden = model.model(input_ids=x.to(device)).last_hidden_state
            lg = model.lm_head(hidden[torch.arange(len(part), device=device), last])[:, numbers].float()
        picks.append(lg.argmax(-1).cpu())
        p_first.append(lg.softmax(-1)[:, 0].cpu())
    picks = torch.cat(picks).numpy()
    target = np.array([r["target_pos"] for r in rows])
    return {"recall@1": float((picks == target).mean()), "picks_retrievers_first": float((picks == 0).mean()),
            "mean_p_first": float(torch.cat(p_first).mean()), "n": len(rows), "picks": picks.tolist()}
