"""Where the series spends its time on a GPU: the training step broken down (batch indexing with the augmentations,
compiled forward+backward, optimizer step), compilation time per shape, regional compilation (each decoder layer
compiled, not the whole loss), and the evaluation decoders in float32 against bf16 autocast.

Run on one GPU with the full profile's data built (runs/full/data): `OUT=dir python results/checks/series_time_profile.py`
(CPUTEST=1 runs a tiny smoke version on a CPU to check the script). Writes OUT/prof.json. The first_per_shape
entries time the first step of each batch shape (mostly compilation); the breakdown synchronises the GPU around
each phase, so its sums run a little above an unsynchronised loop.
"""
import json, os, sys, time
import torch
from diffgr2_lite import pipeline as pl, batches as Bt, train as T
from diffgr2_lite.ar import sft_terms, autocast
from diffgr2_lite.cft import cft_loss_fn
from diffgr2_lite.rank_drill import augmentations
from diffgr2_lite.config import get_profile
from diffgr2_lite.decoders import ar_decoder, ar_max_new, diffusion_decoder
from diffgr2_lite.evaluate import evaluate

OUT = os.environ["OUT"]; res = {"torch": torch.__version__}
CPU = os.environ.get("CPUTEST") == "1"
P = get_profile("smoke" if CPU else "full")
ex = pl.get_examples(P, progress=False)
sync = (lambda: None) if CPU else torch.cuda.synchronize
DEV = "cpu" if CPU else "cuda"
def save():
    json.dump(res, open(f"{OUT}/prof.json", "w"), indent=1)

class Timed:
    def __init__(self): self.t = {"take": 0.0, "fb": 0.0, "step": 0.0}; self.first = []; self.seen = set()
T_ = None
orig_take, orig_fb, orig_step = Bt.DeviceBatches.take, T.Trainer._forward_backward, T.Trainer.step
def take(self, g, idx):
    sync(); t = time.perf_counter(); b = orig_take(self, g, idx); sync(); T_.t["take"] += time.perf_counter() - t; return b
def fb(self, fn, batch):
    sync(); t = time.perf_counter(); orig_fb(self, fn, batch); sync(); d = time.perf_counter() - t
    shp = tuple(batch.completion.shape)
    if shp not in T_.seen: T_.seen.add(shp); T_.first.append((shp, round(d, 2)))
    else: T_.t["fb"] += d
def step(self):
    sync(); t = time.perf_counter(); r = orig_step(self); sync(); T_.t["step"] += time.perf_counter() - t; return r

def run_train(name, loss_fn, rows, epochs, compile, transform, lambda_r, multiple_of=1, instrument=True, regional=False):
    global T_
    T_ = Timed()
    if instrument:
        Bt.DeviceBatches.take, T.Trainer._forward_backward, T.Trainer.step = take, fb, step
    else:
        Bt.DeviceBatches.take, T.Trainer._forward_backward, T.Trainer.step = orig_take, orig_fb, orig_step
    torch._dynamo.reset()
    model = pl.new_model(P, ex)
    if regional and not CPU:
        for layer in model.model.layers:
            layer.compile(dynamic=False)
    sync(); t = time.perf_counter()
    h = T.train_supervised(model, rows, ex.tokenizer, loss_fn=loss_fn, epochs=epochs, lr=1e-3, batch_size=128,
                           lambda_r=lambda_r, lambda_o=1.0, device=DEV, seed=0, multiple_of=multiple_of, buckets=2,
                           transform=transform, compile=compile and not CPU, desc=name)
    sync(); tot = time.perf_counter() - t
    r = {"seconds": round(tot, 2), "steps": h["steps"], "first_per_shape": T_.first, "loss_last": h["loss"][-1],
         "breakdown_s": {k: round(v, 2) for k, v in T_.t.items()}}
    if instrument:
        n = h["steps"] - len(T_.first)
        r["ms_per_step_after_first"] = {k: round(1000 * v / max(1, n), 2) for k, v in T_.t.items()}
    res[name] = r; save(); print(name, r, flush=True)
    if regional:
        for layer in model.model.layers:
            layer._compiled_call_impl = None
    return model

rows = ex.training_rows(); drows = ex.training_rows("direct")
aug = augmentations(P, ex, P.seed + 1, drill=True)
t0 = time.time()
m = run_train("sft_compiled_instr", sft_terms, rows, 1.5, True, aug, 0.5)
run_train("sft_compiled_plain", sft_terms, rows, 1.5, True, aug, 0.5, instrument=False)
run_train("sft_eager_instr", sft_terms, rows, 0.5, False, aug, 0.5)
run_train("sft_regional_instr", sft_terms, rows, 1.5, False, aug, 0.5, regional=True)
run_train("direct_compiled_instr", sft_terms, drows, 1.0, True, augmentations(P, ex, 1, drill=False), 0.5)
run_train("direct_eager_instr", sft_terms, drows, 0.5, False, augmentations(P, ex, 1, drill=False), 0.5)
print("train part", time.time() - t0, flush=True)
Bt.DeviceBatches.take, T.Trainer._forward_backward, T.Trainer.step = orig_take, orig_fb, orig_step
# decode precision: the readable decoders, fp32 (as now) against bf16 autocast
test = ex.splits["test"]; mx = ar_max_new(ex)
for name, dec in [("ar", ar_decoder(m, ex, mx, False, DEV)), ("diff_sub8", diffusion_decoder(m, ex, P, 1.0, 32, sub_block=8))]:
    for prec in ("fp32", "bf16"):
        sync(); t = time.perf_counter()
        if prec == "bf16":
            with autocast(DEV):
                s = evaluate(dec, test, ex, 512, DEV)
        else:
            s = evaluate(dec, test, ex, 512, DEV)
        sync(); d = time.perf_counter() - t
        res[f"decode_{name}_{prec}"] = {"seconds": round(d, 2), "valid": s["metrics"]["valid_rate"], "forwards": s["forwards"],
                                       "generated": s["generated_tokens"]}
        save(); print(name, prec, res[f"decode_{name}_{prec}"], flush=True)
# CFT: compiled, instrumented, 0.4 epoch, and regional
cl = cft_loss_fn(P, ex)
aug2 = augmentations(P, ex, P.seed + 2, drill=False)
if time.time() - t0 < 380:
    run_train("cft_compiled_instr", cl, rows, 0.6, True, aug2, 0.5, multiple_of=32)
if time.time() - t0 < 470:
    run_train("cft_regional_instr", cl, rows, 0.6, False, aug2, 0.5, multiple_of=32, regional=True)
print("done", time.time() - t0)
