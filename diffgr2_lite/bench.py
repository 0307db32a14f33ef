"""The speed benchmark: AR against block diffusion, same model, same engineering, same GPU, same run.

Both decoders come from :mod:`diffgr2_lite.fast` (static KV cache, static shapes, bf16 on GPU, CUDA graphs), so the
comparison measures the decoding method, not the amount of engineering (DESIGN.md section 7). For every setting
(decoder, batch size, block size, tau) one row reports

* ``tokens_per_s``: completion tokens up to and including each row's first ``<eos>``, summed over the batch, divided
  by the wall time of the decode (prefill included);
* ``ms_per_forward``: that wall time divided by the model calls made (prefill included);
* ``tokens_per_forward``: tokens committed per forward *of a row*, the convention of :func:`evaluate.evaluate`:
  one per token for AR, the steps of the blocks up to its ``<eos>`` for diffusion (so AR is exactly 1.0);
* ``latency_ms_per_request``: the median wall time of one decode call (at batch 1, one request's latency);
* ``recall@1``, ``strict_recall@1`` and ``valid_rate`` of *the outputs of this very setting*, over ``scored``
  distinct prompts (a speedup is quoted only beside the accuracy it was measured at); ``speedup_vs_ar``: tokens/s
  over AR's at the same batch size.

Timing uses CUDA events on a GPU and ``perf_counter`` (after a synchronize) elsewhere; each decode is warmed up
first (the first call also captures the CUDA graphs) and the median of the repeats is kept. At batch 1 the first
``n_single`` prompts are decoded one at a time; at a serving batch every prompt is decoded, in full batches, so
that row's accuracy is over all of them (every test user, in the full profile): a valid rate of 99% cannot be told
from 97% on 64 prompts.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, fields

import torch

from .fast import FastARDecoder, FastDiffusionDecoder
from .metrics import score_parses
from .text import EOS, decode_tokens, parse_ranking

VALID_BAR = 0.99
"""The share of valid rankings this project asks of a model that writes them on its own (no constrained decoder):
notebook 08 quotes the speedup of the fastest setting that reaches it."""


# ----------------------------------------------------------------------------------------------- timing
class WallTimer:
    """``perf_counter`` around the call, with a device synchronize on both sides (CPU, or a GPU without events)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        return time.perf_counter()

    def stop(self, handle) -> float:
        self._sync()
        return (time.perf_counter() - handle) * 1000.0


class CudaEventTimer:
    """CUDA events recorded on the current stream: the GPU's own clock, no host timing noise."""

    def start(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, handle) -> float:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return float(handle.elapsed_time(end))


def make_timer(device):
    return CudaEventTimer() if torch.device(device).type == "cuda" else WallTimer(device)


def time_decoder(fn, repeats: int = 3, warmup: int = 1, timer=None, device="cpu") -> dict:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed. Returns the median ``ms``, every
    timing (``all_ms``) and the last ``result`` (decoding is deterministic, so any repeat's output is *the* output).

    ``timer`` has ``start() -> handle`` and ``stop(handle) -> milliseconds``; default: CUDA events on a GPU device,
    ``perf_counter`` + synchronize elsewhere (tests pass a fake clock).
    """
    timer = timer or make_timer(device)
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(max(1, repeats)):
        h = timer.start()
        result = fn()
        times.append(float(timer.stop(h)))
    return {"ms": statistics.median(times), "all_ms": times, "result": result}


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class BenchConfig:
    """What to measure. ``max_new`` is AR's token budget; diffusion gets ceil(max_new / block_size) blocks."""

    max_new: int
    batches: tuple[int, ...] = (1, 64)
    taus: tuple[float, ...] = (1.0, 0.9, 0.6, 0.4)
    block_sizes: tuple[int, ...] = (32,)
    sub_blocks: tuple[int, ...] = (0,)   # commit chunks inside a block (sampler.commit_rule); 0: the whole block
    n_prompts: int | None = None         # prompts used at serving batches (None: all given)
    n_single: int = 16                   # prompts decoded one at a time for the batch-1 rows
    repeats: int = 3
    warmup: int = 1
    graphs: bool = True
    check_every: int = 8                 # AR: steps between "all rows ended?" checks

    @classmethod
    def from_profile(cls, profile, max_new: int, **overrides) -> "BenchConfig":
        """From a :class:`config.Profile` (its ``bench_*`` fields), with overrides."""
        kw = dict(max_new=max_new, batches=tuple(profile.bench_batches), taus=tuple(profile.bench_taus),
                  block_sizes=tuple(profile.bench_block_sizes),
                  sub_blocks=tuple(profile.bench_sub_blocks), n_prompts=profile.bench_prompts,
                  n_single=min(16, profile.bench_prompts or 16), repeats=profile.bench_repeats)
        kw.update(overrides)
        return cls(**kw)


def _as_config(cfg, max_new=None) -> BenchConfig:
    if isinstance(cfg, BenchConfig):
        return cfg
    if isinstance(cfg, dict):
        names = {f.name for f in fields(BenchConfig)}
        return BenchConfig(**{k: v for k, v in cfg.items() if k in names})
    if max_new is None:
        raise ValueError("benchmark(cfg=profile) needs max_new (the AR token budget)")
    return BenchConfig.from_profile(cfg, max_new)


def prompt_groups(n_prompts: int, batch: int, n_single: int) -> list[list[int]]:
    """Prompt indices per decode call: batch 1 -> the first ``n_single`` one at a time; else every prompt, in full
    batches. The last batch is filled up cyclically from the first prompts: the decoders have static shapes, so the
    filler rows are decoded (and timed, and their tokens counted) like any other, but each prompt is scored once."""
    if batch == 1:
        return [[i] for i in range(min(n_single, n_prompts))]
    idx = list(range(n_prompts)) + [i % n_prompts for i in range(-n_prompts % batch)]
    return [idx[s:s + batch] for s in range(0, len(idx), batch)]


def generated_length(ids: list[int], eos_id: int) -> int:
    """Completion tokens up to and including the first ``<eos>`` (all of them when there is none)."""
    return ids.index(eos_id) + 1 if eos_id in ids else len(ids)


def _row_forwards(n_tokens: int, steps_row: list[int] | None, block_size: int) -> int:
    """Forwards one row needed for its tokens: one per token (AR), the steps of its blocks (diffusion)."""
    if steps_row is None:
        return n_tokens
    return int(sum(steps_row[: -(-n_tokens // block_size)]))


def measure_setting(decode, prompts: torch.Tensor, groups, eos_id: int, block_size: int, repeats: int, warmup: int,
                    timer=None, device="cpu", score=None) -> dict:
    """Time ``decode(prompt_batch) -> dict(tokens, forwards[, steps])`` over the groups and aggregate.

    ``score(indices, token_rows) -> dict`` (recall@1, valid_rate) is applied to the outputs of this very run.
    Only the first group is warmed up: the decoder (and its graphs) is the same object afterwards.
    """
    times, tokens, calls, row_fwd, outs = [], 0, 0, 0, {}
    for gi, g in enumerate(groups):
        batch = prompts[g].to(device)
        t = time_decoder(lambda: decode(batch), repeats=repeats, warmup=warmup if gi == 0 else 0, timer=timer,
                         device=device)
        res = t["result"]
        ids = res["tokens"].tolist()
        steps = res["steps"].tolist() if "steps" in res else None
        for j, (i, row) in enumerate(zip(g, ids)):
            n = generated_length(row, eos_id)
            tokens += n
            row_fwd += _row_forwards(n, steps[j] if steps is not None else None, block_size)
            outs.setdefault(i, row)
        times.append(t["ms"])
        calls += int(res["forwards"]) + 1                                   # + the prefill
    total_ms = sum(times)
    out = {"tokens": tokens, "total_ms": total_ms,
           "tokens_per_s": tokens / (total_ms / 1000.0) if total_ms > 0 else float("nan"),
           "ms_per_forward": total_ms / calls, "tokens_per_forward": tokens / max(1, row_fwd),
           "latency_ms_per_request": statistics.median(times), "outputs": outs, "scored": len(outs)}
    if score is not None:
        idx = sorted(outs)
        out.update(score(idx, [outs[i] for i in idx]))
    return out


def make_scorer(rows, example_set):
    """``score(indices, token_rows)``: parse each output against its row's candidates; paper and strict R@1.

    Paper R@1 alone hides differences between settings whose outputs are mostly invalid (they all fall back to the
    retriever order), so the strict R@1 (invalid = miss) is reported beside it."""
    tok = example_set.tokenizer

    def score(indices, token_rows) -> dict:
        parses = []
        for i, ids in zip(indices, token_rows):
            toks = decode_tokens(tok, ids)
            if EOS in toks:
                toks = toks[: toks.index(EOS) + 1]
            parses.append(parse_ranking(toks, [example_set.sid_words(c) for c in rows[i]["candidates"]]))
        scored = score_parses(parses, [rows[i]["target_pos"] for i in indices])
        m = scored["metrics"]
        return {"recall@1": m["recall@1"], "strict_recall@1": scored["metrics_strict"]["recall@1"],
                "valid_rate": m["valid_rate"]}

    return score


# ----------------------------------------------------------------------------------------------- the benchmark
@torch.no_grad()
def benchmark(model, prompts: torch.Tensor, rows, example_set, cfg, *, max_new: int | None = None, timer=None,
              ar_cls=FastARDecoder, diffusion_cls=FastDiffusionDecoder, log=print, ar_model=None) -> list[dict]:
    """Rows of ``speed.json``: AR and diffusion (every tau x block size) at every batch size of ``cfg``.

    ``model`` should already be the timing copy (:func:`fast.speed_model`: bf16 on GPU); ``prompts`` [N, P] are the
    fixed-length prompts of ``rows`` (dicts with ``candidates`` and ``target_pos``), in the same order. ``cfg`` is a
    :class:`BenchConfig`, a dict of its fields, or a profile (then ``max_new`` is required). ``ar_cls`` and
    ``diffusion_cls`` exist so tests can swap in stubs. ``ar_model`` (default: ``model``) decodes the AR rows: the
    AR GR2 checkpoint against the final block-diffusion one, same architecture and size.
    """
    cfg = _as_config(cfg, max_new)
    device = next(model.parameters()).device
    tok = example_set.tokenizer
    eos_id, mask_id = tok.eos_token_id, tok.mask_token_id
    N = min(len(prompts), len(prompts) if cfg.n_prompts is None else cfg.n_prompts)
    if N < 1:
        raise ValueError(f"no prompts to benchmark ({len(prompts)} given, n_prompts={cfg.n_prompts})")
    P = prompts.shape[1]
    score = make_scorer(rows, example_set)
    graphs = bool(cfg.graphs) and device.type == "cuda"
    out = []

    def row(decoder, batch, B, tau, m, sub_block=None):
        return {"decoder": decoder, "batch": batch, "block_size": B, "tau": tau, "sub_block": sub_block,
                "tokens_per_s": m["tokens_per_s"], "ms_per_forward": m["ms_per_forward"],
                "tokens_per_forward": m["tokens_per_forward"], "latency_ms_per_request": m["latency_ms_per_request"],
                "recall@1": m["recall@1"], "strict_recall@1": m.get("strict_recall@1"), "valid_rate": m["valid_rate"],
                "scored": m["scored"], "graphs": graphs}

    for batch in cfg.batches:
        groups = prompt_groups(N, batch, cfg.n_single)
        ar = ar_cls(ar_model if ar_model is not None else model, batch, P, cfg.max_new, eos_id, graphs=cfg.graphs,
                    check_every=cfg.check_every)
        m = measure_setting(ar.decode, prompts, groups, eos_id, 1, cfg.repeats, cfg.warmup, timer, device, score)
        del ar
        ar_row = row("ar", batch, 1, None, m)
        ar_row["speedup_vs_ar"] = 1.0
        out.append(ar_row)
        if log:
            log(_fmt(ar_row))
        for B in cfg.block_sizes:
            blocks = math.ceil(cfg.max_new / B)
            for sub_block in [s for s in cfg.sub_blocks if s < B] or [0]:   # a chunk of B is the whole block
                for tau in cfg.taus:
                    dec = diffusion_cls(model, batch, P, blocks, B, mask_id, eos_id, tau=tau, graphs=cfg.graphs,
                                        sub_block=sub_block or None)
                    m = measure_setting(dec.decode, prompts, groups, eos_id, B, cfg.repeats, cfg.warmup, timer,
                                        device, score)
                    del dec
                    r = row("diffusion", batch, B, float(tau), m, sub_block or None)
                    r["speedup_vs_ar"] = r["tokens_per_s"] / ar_row["tokens_per_s"]
                    out.append(r)
                    if log:
                        log(_fmt(r))
    return out


def _fmt(r: dict) -> str:
    what = "AR" if r["decoder"] == "ar" else f"diffusion B={r['block_size']} tau={r['tau']}" + (
        f" sub={r['sub_block']}" if r.get("sub_block") else "")
    return (f"batch {r['batch']:>3} {what:<34} {r['tokens_per_s']:>10.1f} tok/s  {r['ms_per_forward']:.2f} ms/fwd  "
            f"{r['tokens_per_forward']:.2f} tok/fwd  x{r['speedup_vs_ar']:.2f}  R@1 {r['recall@1']:.3f}  "
            + (f"strict {r['strict_recall@1']:.3f}  " if r.get("strict_recall@1") is not None else "")
            + f"valid {r['valid_rate']:.3f}")


@torch.no_grad()
def speedup_vs_length(model, prompts: torch.Tensor, block_size: int, mask_id: int, eos_id: int, tau: float,
                      max_blocks: int, batch: int = 1, repeats: int = 3, warmup: int = 1, graphs: bool = True,
                      timer=None, ar_cls=FastARDecoder, diffusion_cls=FastDiffusionDecoder) -> list[dict]:
    """The speedup as a function of completion length: k = 1..max_blocks blocks decoded with no early stop.

    Both decoders are forced to write exactly k * block_size tokens (``stop_at_eos=False``) for the first ``batch``
    prompts; the ratio is AR's time over diffusion's (same tokens). Short completions pay the prefill and, for
    diffusion, a first block that cannot be fused; the ratio climbs toward tokens per forward as k grows.
    Keep ``max_blocks`` within the model's natural completion length: past its ``<eos>`` a trained model fills
    blocks with confident ``<eos>`` in very few steps, which would flatter diffusion.
    """
    device = next(model.parameters()).device
    P = prompts.shape[1]
    p = prompts[[i % len(prompts) for i in range(batch)]].to(device)
    ar = ar_cls(model, batch, P, max_blocks * block_size, eos_id, graphs=graphs)
    dif = diffusion_cls(model, batch, P, max_blocks, block_size, mask_id, eos_id, tau=tau, graphs=graphs)
    res = []
    for k in range(1, max_blocks + 1):
        n_tok = k * block_size
        ta = time_decoder(lambda: ar.decode(p, max_new=n_tok, stop_at_eos=False), repeats, warmup, timer, device)
        td = time_decoder(lambda: dif.decode(p, max_blocks=k, stop_at_eos=False), repeats, warmup, timer, device)
        fwd = int(td["result"]["forwards"])
        res.append({"blocks": k, "tokens": n_tok, "batch": batch, "block_size": block_size, "tau": tau,
                    "ar_ms": ta["ms"], "diffusion_ms": td["ms"],
                    "ar_tokens_per_s": batch * n_tok / (ta["ms"] / 1000.0),
                    "diffusion_tokens_per_s": batch * n_tok / (td["ms"] / 1000.0),
                    "diffusion_forwards": fwd, "tokens_per_forward": n_tok / max(1, fwd),
                    "speedup": ta["ms"] / td["ms"]})
    return res


# ----------------------------------------------------------------------------------------------- record
def speed_record(rows: list[dict], device, versions: dict | None = None, **extra) -> dict:
    """``results/full/speed.json`` (DESIGN.md section 9): ``device`` (a name), ``versions``, ``rows``."""
    from .artifacts import device_name
    from .artifacts import versions as current_versions

    if not isinstance(device, str) or device == "cpu" or device.startswith("cuda"):
        device = device_name(device)
    rec = {"device": device, "versions": versions if versions is not None else current_versions(),
           "rows": [{k: v for k, v in r.items()} for r in rows]}
    rec.update(extra)
    return rec


# ----------------------------------------------------------------------------------------------- CLI
def _random_model(vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
                      tie_word_embeddings=True, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def main_bench(argv=None) -> int:
    """``python -m diffgr2_lite.bench --random-model``: the engineering check, no data or checkpoint needed.

    Times a randomly initialised Llama of the given size (random weights: the numbers are about the machinery, not the
    method -- tokens per forward of a random model mean nothing): milliseconds per forward of each step shape with
    CUDA graphs on and off, and AR vs diffusion time as a function of the completion length. The real benchmark
    (trained model, accuracy beside speed) is :func:`benchmark`, run by the speed stage.
    """
    import argparse

    from .fast import speed_model

    ap = argparse.ArgumentParser(prog="python -m diffgr2_lite.bench", description=main_bench.__doc__.split("\n")[0])
    ap.add_argument("--random-model", action="store_true", required=True)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=160)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-eager", action="store_true", help="skip the graphs=False comparison")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    base = _random_model(a.vocab, a.hidden, a.layers, a.heads, a.intermediate,
                         a.prompt_len + a.blocks * a.block_size + 16, seed=0)
    model = speed_model(base, a.device)
    n_par = sum(p.numel() for p in model.parameters())
    print(f"random Llama: {n_par / 1e6:.1f}M parameters, {next(model.parameters()).dtype}, on {a.device}")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, a.vocab, (max(a.batches), a.prompt_len), generator=g)
    results = {"args": vars(a), "parameters": n_par, "runs": []}
    for batch in a.batches:
        for graphs in ([True] if a.no_eager else [True, False]):
            if graphs and torch.device(a.device).type != "cuda":
                continue
            t0 = time.perf_counter()
            res = speedup_vs_length(model, prompts, a.block_size, mask_id=4, eos_id=2, tau=a.tau, max_blocks=a.blocks,
                                    batch=batch, repeats=a.repeats, graphs=graphs)
            for r in res:
                # forwards: AR makes tokens-1 after its prefill, diffusion its counted ones; +1 prefill each
                r["ar_ms_per_forward"] = r["ar_ms"] / r["tokens"]
                r["diffusion_ms_per_forward"] = r["diffusion_ms"] / (r["diffusion_forwards"] + 1)
                print(f"batch {batch:>3} graphs {graphs!s:<5} blocks {r['blocks']:>2} tokens {r['tokens']:>4}: "
                      f"AR {r['ar_ms']:8.2f} ms ({r['ar_ms_per_forward']:.3f} ms/fwd)  "
                      f"diffusion {r['diffusion_ms']:8.2f} ms ({r['diffusion_forwards']} fwd, "
                      f"{r['diffusion_ms_per_forward']:.3f} ms/fwd)  "
                      f"x{r['speedup']:.2f}", flush=True)
            results["runs"].append({"batch": batch, "graphs": graphs, "rows": res,
                                    "wall_s": time.perf_counter() - t0})
    if a.out:
        from .artifacts import atomic_write_json

        atomic_write_json(a.out, speed_record(results.pop("runs"), a.device, **results))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main_bench())
