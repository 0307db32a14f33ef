"""Training speed of every stage's step, before and after the one training loop, in one run on one device.

    python -m diffgr2_lite bench-train [--profile full] [--steps 20] [--batches 128 512 1024] [--trace]

writes ``results/<profile>/train_speed.json`` (and, with ``--trace``, ``train_speed_profile.txt`` beside it: the
torch.profiler table of a few SFT steps, i.e. where the time goes) and prints a table. Rows:

* ``sft`` / ``before``: :func:`legacy_sft_steps`, a faithful copy of the SFT loop this package had before
  ``train.py`` (host-collated, length-bucketed batches moved each step, ``loss.item()`` every step, plain AdamW).
* ``sft`` / ``after``: :class:`~diffgr2_lite.train.Trainer` on :class:`~diffgr2_lite.batches.DeviceBatches`, eager
  and compiled, for a few per-process batch sizes (where does utilisation saturate?).
* ``copy_warmup``, ``cft``: the same loop with their losses; ``opd``, ``rl``: whole steps (rollouts, replay, update)
  of :func:`~diffgr2_lite.opd.train_opd` and :func:`~diffgr2_lite.rl.train_rl` with the profile's settings.

The model is the profile's, freshly initialised (random weights: OPD/RL rollouts then run every block to the end, one
commit per denoising step, the slowest case; RL gets random rewards so its update runs).

**Model FLOPs utilisation** = achieved model FLOP/s / the bf16 matmul rate measured in the same run on the same
device (a large ``torch.matmul``; float32 on a CPU). Model FLOPs of a training step, per row of T = P + C tokens
(prompt P, completion C; AR layout) with N = the matrix parameters of the layers (4 H^2 + 3 H I per layer; embedding
lookups and norms not counted), H hidden, V vocabulary, L layers::

    6 N T  +  6 H V C  +  12 L H T^2
    (layers, fwd+bwd)  (output layer on the scored positions)  (attention scores and values, fwd+bwd, no causal discount)

CFT's layout is the clean sequence plus two views of every block: T = P + 3 C, output layer on C positions. Counted
on the shapes the step executes (padding included); ``padding`` says how much of them is padding. OPD and RL steps
are counted by ``torch.utils.flop_counter`` on one step (their rollouts are many small decoding forwards).
``tokens_per_s`` counts real tokens (prompt plus completion up to its end) for the supervised stages and prompt plus
decoded tokens of every rollout for OPD and RL.
"""
from __future__ import annotations

import argparse
import copy
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import artifacts as art


# ----------------------------------------------------------------------------------------------- the "before" loop
def legacy_sft_steps(model, train_ds, tokenizer, *, steps: int, batch_size: int, lr: float, lambda_r: float,
                     lambda_o: float, device, seed: int = 0, multiple_of: int = 1, on_batch=None):
    """THE "BEFORE" REFERENCE: the inner loop of ``ar.train`` as it was before ``train.py`` (commit e79a76e), for
    ``steps`` steps. Kept only to measure the new loop against it in the same run; nothing trains with it.

    Batches come from :func:`~diffgr2_lite.batches.iterate_batches` (Python collation, length-bucketed), are moved
    to the device each step, and ``loss.item()`` reads the loss back every step. ``on_batch(batch)`` sees each batch
    (the benchmark counts its tokens and FLOPs). Returns the losses.
    """
    import math

    from .ar import autocast, sft_loss
    from .batches import iterate_batches
    from .train import cosine_lr

    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    total = max(steps, math.ceil(len(train_ds) / batch_size))
    warmup = max(1, total // 20)
    losses, step, epoch = [], 0, 0
    while step < steps:
        for batch in iterate_batches(train_ds, batch_size, shuffle=True, seed=seed + epoch, tokenizer=tokenizer,
                                     lambda_r=lambda_r, lambda_o=lambda_o, multiple_of=multiple_of):
            if step >= steps:
                break
            batch = batch.to(device)
            if on_batch is not None:
                on_batch(batch)
            for g in opt.param_groups:
                g["lr"] = lr * cosine_lr(step, total, warmup)
            with autocast(device):
                loss = sft_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
        epoch += 1
    return losses


# ----------------------------------------------------------------------------------------------- FLOPs
def model_dims(model) -> dict:
    c = model.config
    n_layer = c.num_hidden_layers * (2 * c.hidden_size * c.hidden_size
                                     + 2 * c.hidden_size * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
                                     + 3 * c.hidden_size * c.intermediate_size)
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
            "vocab": c.vocab_size, "matrix_params": n_layer, "parameters": sum(p.numel() for p in model.parameters())}


def train_flops(dims: dict, rows: int, prompt: int, completion: int, layout: str = "ar") -> float:
    """Model FLOPs of one training step on ``rows`` rows (see the module docstring)."""
    T = prompt + (3 * completion if layout == "cft" else completion)
    L, H, V = dims["layers"], dims["hidden"], dims["vocab"]
    return rows * (6.0 * dims["matrix_params"] * T + 6.0 * H * V * completion + 12.0 * L * H * T * T)


def matmul_rate(device, n: int = 8192, repeats: int = 10) -> dict:
    """The dense matmul rate of ``device`` (bf16 on CUDA, float32 on CPU, smaller there), measured now."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = n if cuda else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(dev)
    s = (time.perf_counter() - t0) / repeats
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "flops_per_s": 2.0 * n ** 3 / s}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- measurements
def _supervised(name, loop, model, data, loss_fn, layout, dims, *, steps, compile, device, warmup=2,
                compile_options=None):
    """Time ``steps`` optimizer steps of the new loop on ``data`` (after warming up every length group)."""
    from .train import Trainer

    dev = torch.device(device)
    trainer = Trainer(model, lr=1e-4, total_steps=10 ** 6, grad_accum=data.grad_accum, compile=compile,
                      compile_options=compile_options, log_every=10 ** 9, device=dev, progress=False)
    P = data.groups[0].prompt.shape[1]
    acc = {"flops": 0.0, "padded": 0, "tokens": torch.zeros((), device=dev, dtype=torch.long)}

    def count(b):
        acc["flops"] += train_flops(dims, len(b), P, b.completion.shape[1], layout)
        acc["padded"] += b.prompt.numel() + b.completion.numel()
        acc["tokens"] += (b.length > 0).sum() * P + b.length.sum()

    t0 = time.perf_counter()
    for g in range(len(data.groups)):                  # every shape once or twice before timing (compilation)
        idx = torch.arange(data.batch_size, device=dev) % data.sizes[g]
        for _ in range(warmup):
            trainer.train_step([data.take(g, idx)] * data.grad_accum, loss_fn)
    sync(dev)
    warm_s = time.perf_counter() - t0
    it = iter(data)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        micro = [next(it) for _ in range(data.grad_accum)]
        for b in micro:
            count(b)
        trainer.train_step(micro, loss_fn)
    sync(dev)
    s = time.perf_counter() - t0
    return _row(name, loop, dev, steps, s, acc["flops"], float(acc["tokens"]), acc["padded"],
                batch=data.batch_size, grad_accum=data.grad_accum, compile=trainer.is_compiled(loss_fn),
                compile_mode=(compile_options or {}).get("mode") if trainer.is_compiled(loss_fn) else None,
                bf16=trainer.bf16, warmup_s=warm_s)


def _legacy(model, rows, tok, P_, dims, *, steps, device, batch_size):
    dev = torch.device(device)
    acc = {"flops": 0.0, "padded": 0, "tokens": 0, "n": 0}
    t = {}

    def on_batch(b):                                   # host-side counts; the step itself syncs anyway
        acc["n"] += 1
        if acc["n"] == 3:                              # two warm-up steps, then the clock starts
            sync(dev)
            t["0"] = time.perf_counter()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
        if acc["n"] >= 3:
            P = b.prompt.shape[1]
            acc["flops"] += train_flops(dims, len(b), P, b.completion.shape[1])
            acc["padded"] += b.prompt.numel() + b.completion.numel()
            acc["tokens"] += int(len(b) * P + b.length.sum())

    legacy_sft_steps(model, rows, tok, steps=steps + 2, batch_size=batch_size, lr=1e-4, lambda_r=P_.lambda_reasoning,
                     lambda_o=P_.lambda_answer, device=dev, seed=P_.seed, on_batch=on_batch)
    sync(dev)
    s = time.perf_counter() - t["0"]
    return _row("sft", "before", dev, steps, s, acc["flops"], acc["tokens"], acc["padded"], batch=batch_size,
                grad_accum=1, compile=False, bf16=dev.type == "cuda", warmup_s=None)


def _rollout_stage(name, fn, device, steps):
    """Whole OPD / RL steps: one step under the FLOP counter (also the warm-up), then ``steps`` timed."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device(device)
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        _, tokens = fn(1)
    sync(dev)
    warm_s = time.perf_counter() - t0
    flops = float(counter.get_total_flops())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    hist, _ = fn(steps)
    sync(dev)
    s = time.perf_counter() - t0
    return _row(name, "after", dev, steps, s, flops * steps, tokens * steps, None, warmup_s=warm_s,
                flops_counted="flop_counter, one step", **hist)


def _row(stage, loop, dev, steps, seconds, flops, tokens, padded, **extra) -> dict:
    r = {"stage": stage, "loop": loop, **extra, "steps": steps,
         "ms_per_step": 1000.0 * seconds / steps, "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12}
    if padded:
        r["padding"] = 1.0 - tokens / padded
    if dev.type == "cuda":
        r["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    return r


# ----------------------------------------------------------------------------------------------- the benchmark
def run(profile_name: str = "full", dataset: str | None = None, steps: int = 20, batches=(128, 512, 1024),
        rollout_steps: int = 3, trace: bool = False, out: str | None = None, stages=None,
        dynamic: bool | None = False, cudagraphs: bool = False) -> dict:
    from . import pipeline as pl
    from .ar import sft_terms
    from .batches import DeviceBatches, training_dicts
    from .cft import cft_loss_fn
    from .config import get_profile
    from .copy_warmup import relabel_transform
    from .train import compile_enabled

    t_start = time.perf_counter()
    P = get_profile(profile_name, dataset)
    dev = torch.device(P.device)
    stages = set(stages or ("sft", "copy_warmup", "cft", "opd", "rl"))
    print(f"bench-train: profile {P.name}, device {art.device_name(dev)}; loading data ...", flush=True)
    ex = pl.get_examples(P, progress=False)
    tok = ex.tokenizer
    sft_rows = training_dicts(ex.training_rows())
    peak = matmul_rate(dev)
    model = pl.new_model(P, ex)
    dims = model_dims(model)
    print(f"  {len(sft_rows)} SFT rows, model {dims['parameters'] / 1e6:.1f}M parameters, "
          f"{peak['dtype']} matmul {peak['flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    compile_on = compile_enabled(P.compile, dev)
    rows, errors = [], {}

    def attempt(label, fn):
        try:
            r = fn()
            r["mfu"] = r["tflops"] * 1e12 / peak["flops_per_s"]
            rows.append(r)
            print("  " + _fmt(r), flush=True)
        except Exception as exc:                        # one failing setting must not lose the others
            errors[label] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"  {label}: FAILED {errors[label][:300]}", flush=True)

    data = DeviceBatches(sft_rows, tok, batch_size=P.batch_size, lambda_r=P.lambda_reasoning,
                         lambda_o=P.lambda_answer, buckets=P.length_buckets, seed=P.seed, device=dev)
    sft_steps = dict(steps=steps, device=dev, compile_options={"dynamic": dynamic})
    # the supervised rows share one model object (its weights keep training; the timing does not care), so a
    # compiled loss is compiled once, not once per copy of the model
    flops_check = None
    if "sft" in stages:
        attempt("sft before", lambda: _legacy(model, sft_rows, tok, P, dims, steps=steps, device=dev,
                                              batch_size=P.batch_size))
        attempt(f"sft eager {P.batch_size}", lambda: _supervised("sft", "after", model, data, sft_terms, "ar", dims,
                                                               compile=False, **sft_steps))
        flops_check = _flops_check(model, data, dims, dev)
        if compile_on:
            for b in batches:
                attempt(f"sft compiled {b}", lambda b=b: _supervised("sft", "after", model, data.resized(batch_size=b),
                                                                     sft_terms, "ar", dims, compile=True,
                                                                     **sft_steps))
        if compile_on and cudagraphs and dev.type == "cuda":
            attempt("sft cudagraphs", lambda: _supervised("sft", "after", model, data, sft_terms, "ar", dims,
                                                          compile=True, steps=steps, device=dev,
                                                          compile_options={"dynamic": dynamic,
                                                                           "mode": "reduce-overhead"}))
        if trace:
            try:
                _trace(model, data.resized(batch_size=max(batches)), sft_terms, compile_on, dev,
                       Path(out or _default_out(P)).with_name("train_speed_profile.txt"), {"dynamic": dynamic})
            except Exception as exc:
                errors["trace"] = f"{type(exc).__name__}: {exc}"[:2000]
    if "copy_warmup" in stages:                        # the warm-up: answer-only loss on relabelled rows
        warm_data = DeviceBatches(ex.training_rows(), tok, batch_size=P.copy_batch, lambda_r=0.0, lambda_o=1.0,
                                  seed=P.seed, device=dev,
                                  transform=relabel_transform(tok, ex.fmt, 1.0, P.seed, dev))
        attempt("copy_warmup", lambda: _supervised("copy_warmup", "after", model, warm_data, sft_terms, "ar", dims,
                                                   compile=compile_on, **sft_steps))
    if "cft" in stages:
        cft_data = DeviceBatches(ex.training_rows(), tok, batch_size=P.batch_size, lambda_r=P.lambda_reasoning,
                                 lambda_o=P.lambda_answer, buckets=P.length_buckets, seed=P.seed, device=dev,
                                 multiple_of=P.block_size,
                                 transform=relabel_transform(tok, ex.fmt, P.relabel_share, P.seed, dev, P.collide_share))
        for c in sorted({False, compile_on}):
            attempt(f"cft compile={c}", lambda c=c: _supervised("cft", "after", model, cft_data,
                                                                cft_loss_fn(P, ex), "cft", dims, compile=c,
                                                                **sft_steps))
    if "opd" in stages:
        attempt("opd", lambda: _rollout_stage("opd", _opd_fn(P, ex, model, dev), dev, rollout_steps))
    if "rl" in stages:
        attempt("rl", lambda: _rollout_stage("rl", _rl_fn(P, ex, model, dev), dev, rollout_steps))

    record = {
        "device": art.device_name(dev), "profile": P.name, "dataset": P.dataset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {**art.versions(), "accelerate": _version("accelerate")},
        "peak": {**peak, "what": "dense matmul measured in this run (bf16 on CUDA)"},
        "compile_dynamic": dynamic, "model": dims, "flops_formula": "rows * (6 N T + 6 H V C + 12 L H T^2); T = P + C (AR), P + 3C (CFT)",
        "rows": rows, "flops_check": flops_check, "errors": errors, "summary": _summary(rows), "seconds": time.perf_counter() - t_start,
    }
    path = Path(out) if out else _default_out(P)
    art.atomic_write_json(path, record)
    print(table(record))
    print(f"wrote {path} in {record['seconds']:.0f} s")
    return record


def _default_out(P) -> Path:
    return art.REPO / "results" / P.name / "train_speed.json"


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


def _opd_fn(P, ex, model, dev):
    from .opd import train_opd

    student, teacher = copy.deepcopy(model), copy.deepcopy(model).eval()
    ds = ex.splits["train"]

    def fn(steps):
        h = train_opd(student, teacher, ds, ex, steps=steps, prompts=P.opd_prompts, rollouts=P.opd_rollouts,
                      lr=1e-6, tau=P.opd_tau, block_size=P.block_size, device=dev, seed=P.seed, desc="bench OPD")
        n = P.opd_prompts * P.opd_rollouts
        tokens = n * (ex.fmt.prompt_len + _decoded(ex, P))
        return {"batch": n, "tokens_per_forward": h["tokens_per_forward"][-1]}, tokens

    return fn


def _rl_fn(P, ex, model, dev):
    import random

    from .rl import train_rl

    policy = copy.deepcopy(model)
    ds = ex.splits["train"]
    rng = random.Random(P.seed)

    def fn(steps):
        h = train_rl(policy, ds, ex, steps=steps, prompts=P.rl_prompts, group=P.rl_group, lr=1e-6, clip=P.rl_clip,
                     tau=P.opd_tau, block_size=P.block_size, device=dev, seed=P.seed,
                     reward_fn=lambda *a: rng.random(), desc="bench RL")
        n = P.rl_prompts * P.rl_group
        return {"batch": n, "kept": h["kept"][-1]}, n * (ex.fmt.prompt_len + _decoded(ex, P))

    return fn


def _decoded(ex, P) -> int:
    """Completion positions a rollout decodes when it never ends early (random weights)."""
    from .ar import default_max_blocks

    return default_max_blocks(ex.splits["train"], P.block_size) * P.block_size


def _flops_check(model, data, dims, dev) -> dict | None:
    """The formula against ``torch.utils.flop_counter`` on one eager SFT step (matmuls and attention it saw)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .ar import sft_terms
    from .train import Trainer

    try:
        trainer = Trainer(model, lr=1e-4, total_steps=10, compile=False, device=dev, progress=False)
        b = next(iter(data))
        with FlopCounterMode(display=False) as counter:
            trainer.train_step([b], sft_terms)
        n, P, C = len(b), b.prompt.shape[1], b.completion.shape[1]
        return {"shape": [n, P, C], "formula": train_flops(dims, n, P, C), "counted": float(counter.get_total_flops())}
    except Exception as exc:  # pragma: no cover
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def _trace(model, data, loss_fn, compile, dev, path: Path, compile_options=None) -> None:
    """torch.profiler over 3 SFT steps (after warm-up): the table of the most expensive operators, written to
    ``path``."""
    from torch.profiler import ProfilerActivity, profile

    from .train import Trainer

    trainer = Trainer(model, lr=1e-4, total_steps=10 ** 6, compile=compile, compile_options=compile_options,
                      log_every=10 ** 9, device=dev, progress=False)
    it = iter(data)
    for _ in range(3):
        trainer.train_step([next(it)], loss_fn)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            trainer.train_step([next(it)], loss_fn)
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    text = (f"torch.profiler, 3 SFT steps, per-process batch {data.batch_size}, compile={trainer.compile}, "
            f"{art.device_name(dev)}\n\n" + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
    art.atomic_write_text(path, text)
    print(f"  profiler table: {path}")


def _summary(rows: list[dict]) -> dict:
    """The before/after ratio of SFT at the profile's batch, and the best SFT utilisation."""
    before = [r for r in rows if r["stage"] == "sft" and r["loop"] == "before"]
    after = [r for r in rows if r["stage"] == "sft" and r["loop"] == "after"]
    out = {}
    if before and after:
        b = before[0]
        same = [r for r in after if r["batch"] == b["batch"]]
        best_same = max(same, key=lambda r: r["tokens_per_s"]) if same else None
        if best_same:
            out["sft_speedup_same_batch"] = best_same["tokens_per_s"] / b["tokens_per_s"]
            out["sft_same_batch_setting"] = {k: best_same[k] for k in ("batch", "compile")}
        best = max(after, key=lambda r: r["tokens_per_s"])
        out["sft_speedup_best"] = best["tokens_per_s"] / b["tokens_per_s"]
        out["sft_best_setting"] = {k: best[k] for k in ("batch", "compile")}
        out["sft_best_mfu"] = best["mfu"]
        out["sft_before_mfu"] = b["mfu"]
    return out


def _fmt(r: dict) -> str:
    c = {True: "yes", False: "no"}.get(r.get("compile"), "-")
    return (f"{r['stage']:<12} {r['loop']:<6} batch {r.get('batch', '-'):>5} compile {c:<3} "
            f"{r['ms_per_step']:9.1f} ms/step {r['tokens_per_s'] / 1e3:10.1f} k tok/s {r['tflops']:7.3g} TFLOP/s "
            f"MFU {100 * r.get('mfu', 0):5.1f}%")


def table(record: dict) -> str:
    head = (f"\ntraining speed, {record['device']} (matmul {record['peak']['dtype']} "
            f"{record['peak']['flops_per_s'] / 1e12:.0f} TFLOP/s)\n"
            f"| stage | loop | batch | compile | ms/step | tokens/s | TFLOP/s | MFU | padding | warm-up s |\n"
            f"|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in record["rows"]:
        pad = f"{100 * r['padding']:.0f}%" if r.get("padding") is not None else "-"
        warm = f"{r['warmup_s']:.1f}" if r.get("warmup_s") is not None else "-"
        lines.append(f"| {r['stage']} | {r['loop']} | {r.get('batch', '-')} | {r.get('compile', '-')} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3g} | "
                     f"{100 * r['mfu']:.1f}% | {pad} | {warm} |")
    s = record["summary"]
    if s:
        lines.append(f"\nSFT after/before at batch {s.get('sft_same_batch_setting', {}).get('batch')}: "
                     f"{s.get('sft_speedup_same_batch', float('nan')):.2f}x; best setting "
                     f"{s['sft_best_setting']}: {s['sft_speedup_best']:.2f}x, MFU {100 * s['sft_best_mfu']:.1f}% "
                     f"(before: {100 * s['sft_before_mfu']:.1f}%)")
    for k, v in record["errors"].items():
        lines.append(f"FAILED {k}: {v[:200]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffgr2_lite bench-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="full")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per supervised setting")
    ap.add_argument("--rollout-steps", type=int, default=3, help="timed OPD / RL steps")
    ap.add_argument("--batches", type=int, nargs="+", default=[128, 512, 1024], help="SFT batch sizes (compiled)")
    ap.add_argument("--stages", nargs="+", default=None, help="sft copy_warmup cft opd rl (default: all)")
    ap.add_argument("--trace", action="store_true", help="write a torch.profiler table of SFT steps beside the JSON")
    ap.add_argument("--out", default=None, help="default: results/<profile>/train_speed.json")
    ap.add_argument("--cudagraphs", action="store_true",
                    help="also SFT compiled with mode=reduce-overhead (CUDA graphs) at the profile's batch")
    ap.add_argument("--dynamic", choices=("auto", "true", "false"), default="false",
                    help="torch.compile's dynamic shapes (false: the trainer's default, one compilation per shape; "
                         "true: one compilation for every shape; auto: static first, dynamic after a shape changes)")
    a = ap.parse_args(argv)
    run(a.profile, a.dataset, a.steps, tuple(a.batches), a.rollout_steps, a.trace, a.out, a.stages,
        {"auto": None, "true": True, "false": False}[a.dynamic], a.cudagraphs)
    return 0
