"""What a notebook spends before its first real cell on a GPU: imports, the cached data, a model on the GPU, a checkpoint
saved and loaded, a first forward (each step timed in order). `OUT=dir K=1 python results/checks/notebook_start_time.py`
with the full profile's data built; writes OUT/start{K}.json.
"""
import time, os, json
T0 = time.time(); r = {}
def lap(name):
    global T0
    t = time.time(); r[name] = round(t - T0, 2); T0 = t; print(name, r[name], flush=True)
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt; import numpy as np
lap("import matplotlib")
import torch
lap("import torch")
from diffgr2_lite import pipeline as pl
from diffgr2_lite.config import get_profile
from diffgr2_lite.viz import show_table
lap("import package")
P = get_profile("full")
lap("get_profile")
torch.cuda.init(); torch.zeros(1, device="cuda")
lap("cuda init")
from diffgr2_lite.train import distributed
distributed()
lap("accelerate state")
ex = pl.get_examples(P, progress=False)
lap("get_examples")
m = pl.new_model(P, ex)
lap("new_model (to cuda)")
from diffgr2_lite.model import save_checkpoint, load_checkpoint
save_checkpoint(m, ex.tokenizer, "/tmp/ck", {"key": "x"})
lap("save")
m2, _, _ = load_checkpoint("/tmp/ck", ex.tokenizer, "cuda")
lap("load_checkpoint")
x = torch.tensor([ex.splits["test"][0]["prompt_ids"]], device="cuda")
with torch.no_grad(): m2(input_ids=x)
torch.cuda.synchronize()
lap("first forward")
with torch.no_grad(): m2(input_ids=x)
torch.cuda.synchronize()
lap("second forward")
from diffgr2_lite import artifacts as art
art.device_name("cuda")
lap("device_name")
json.dump(r, open(os.environ["OUT"] + f"/start{os.environ.get('K','')}.json", "w"))
