import pickle, time, json, numpy as np
from diffgr2_lite.config import get_profile
from diffgr2_lite.pipeline import load_dataset
from diffgr2_lite.data.examples import leave_one_out, training_positions, N_FOLDS
from diffgr2_lite.data.retriever import TransitionRetriever, user_folds
from diffgr2_lite.data.teacher import Teacher, TeacherStats
p = get_profile("full"); data = load_dataset(p); cat = data.catalog
train_parts, valid_raw, test_raw = leave_one_out(data.sequences)
full = TransitionRetriever(len(cat)).fit(train_parts)
folds = user_folds(len(train_parts), N_FOLDS, 0)
fr = [TransitionRetriever(len(cat)).fit([q for q, f in zip(train_parts, folds) if f != j]) for j in range(N_FOLDS)]
wide = dict(window=10, history_items=50, decay=0.9)
wf = TransitionRetriever(len(cat), **wide).fit(train_parts)
wfs = [TransitionRetriever(len(cat), **wide).fit([q for q, f in zip(train_parts, folds) if f != j]) for j in range(N_FOLDS)]
def collect(raw, split):
    out=[]
    for u,h,t in raw:
        r = fr[folds[u]] if split=="train" else full
        s = r.scores(h); c = r.top_k(h,10)
        if t in c:
            w = (wfs[folds[u]] if split=="train" else wf).scores(h)
            out.append(dict(u=u,h=h,t=t,c=c,tp=c.index(t),rs=s[c],co=np.maximum(w[c],0)))
    return out
D = {"train": collect(training_positions(train_parts,50),"train"), "valid": collect(valid_raw,"valid"), "test": collect(test_raw,"test")}
stats = TeacherStats.fit(cat, train_parts)
pickle.dump((D, stats), open("/tmp/w/headroom.pkl","wb"))
print({k:len(v) for k,v in D.items()})
import pickle, numpy as np, torch
from collections import Counter
from diffgr2_lite.config import get_profile
from diffgr2_lite.pipeline import load_dataset
D, st = pickle.load(open("/tmp/w/headroom.pkl","rb"))
cat = load_dataset(get_profile("full")).catalog
B = cat.brands
def feats(e):
    h, c = e["h"], e["c"]; last = h[-1]
    brands = Counter(B[x] for x in h if B[x]); leaves = Counter(st.leaf_of[x] for x in h)
    rs = np.log(np.maximum(e["rs"],1e-9)); 
    rows=[]
    for pos, x in enumerate(c):
        rows.append([pos==0, pos==1, pos==2, -np.log1p(pos), rs[pos]-rs[0], rs[pos],
            np.log1p(100*e["co"][pos]), float(B[x] is not None and B[x]==B[last]),
            brands.get(B[x],0)/len(h) if B[x] else 0, float(B[x] is None),
            leaves.get(st.leaf_of[x],0)/len(h), float(st.leaf_of[x]==st.leaf_of[last]),
            np.log(st.transition[st.leaf_of[last], st.leaf_of[x]]), st.log_popularity[x],
            float(len(h)), float(x in set()), ])
    return np.array(rows, float)
X = {k: np.stack([feats(e) for e in v]) for k,v in D.items()}
Y = {k: np.array([e["tp"] for e in v]) for k,v in D.items()}
for k in D: print(k, "floor R@1", (Y[k]==0).mean().round(4), "n", len(Y[k]))
# simple visible rules
for k in ("valid","test"):
    pick=[]
    for e in D[k]:
        last=e["h"][-1]; sb=[i for i,x in enumerate(e["c"]) if B[x] and B[x]==B[last]]
        pick.append(sb[0] if sb else 0)
    print(k,"rule same-brand-as-last first:", (np.array(pick)==Y[k]).mean().round(4))
mu = X["train"].reshape(-1,X["train"].shape[-1]).mean(0); sd = X["train"].reshape(-1,X["train"].shape[-1]).std(0)+1e-6
T = {k: torch.tensor((X[k]-mu)/sd, dtype=torch.float32) for k in X}
def fit(model, epochs=300, wd=1e-4):
    opt = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=wd)
    y = torch.tensor(Y["train"])
    best=(0,None)
    for ep in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(T["train"]).squeeze(-1), y)
        opt.zero_grad(); loss.backward(); opt.step()
        if ep%20==19:
            with torch.no_grad():
                v = (model(T["valid"]).squeeze(-1).argmax(1).numpy()==Y["valid"]).mean()
                if v>best[0]: best=(v,{k:(model(T[k]).squeeze(-1).argmax(1).numpy()==Y[k]).mean() for k in T})
    return best[1]
torch.manual_seed(0)
print("linear:", fit(torch.nn.Linear(T["train"].shape[-1],1)))
mlp = torch.nn.Sequential(torch.nn.Linear(T["train"].shape[-1],64), torch.nn.ReLU(), torch.nn.Linear(64,64), torch.nn.ReLU(), torch.nn.Linear(64,1))
print("mlp:", fit(mlp, 600))
# columns: 0-2 pos onehot,3 logpos,4 rs-rs0,5 rs,6 co,7 brand_last,8 brand_freq,9 nobrand,10 leaf_freq,11 leaf_last,12 trans,13 pop,14 len
def sub(cols, name, ep=600):
    global T
    T0 = T
    T = {k: v[..., cols] for k, v in T0.items()}
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(len(cols),64), torch.nn.ReLU(), torch.nn.Linear(64,64), torch.nn.ReLU(), torch.nn.Linear(64,1))
    print(name, fit(m, ep)); T = T0
sub([0,1,2,3,7,8,9,10,11,12,14], "visible (pos, brand, category, transition)")
sub([0,1,2,3,7,8,9,10,11,12,13,14], "visible + popularity")
sub([0,1,2,3,4,5,7,8,9,10,11,12,13,14], "no co-purchase")
sub([0,1,2,3,6,7,8,9,10,11,12,13,14], "no retriever scores")
