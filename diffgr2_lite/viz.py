"""Plots, tables and the one widget the notebooks use (kept here so notebooks stay short)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .bench import VALID_BAR
from .metrics import wilson_interval

METRICS = ("recall@1", "recall@3", "ndcg@3", "ndcg@10")


def show_table(rows: list[dict]) -> None:
    """Render a list of dicts as a table (HTML in Jupyter, text elsewhere)."""
    if not rows:
        print("(empty)")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    try:
        from IPython.display import HTML, display

        head = "".join(f"<th>{c}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{r.get(c, '')}</td>" for c in cols) + "</tr>" for r in rows)
        display(HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"))
    except ImportError:  # pragma: no cover
        print(" | ".join(cols))
        for r in rows:
            print(" | ".join(str(r.get(c, "")) for c in cols))


def results_rows(systems: dict) -> list[dict]:
    """One table row per evaluated system ({name: {"record": ...}}): metrics, strict R@1, validity, interval vs AR."""
    rows = []
    for name, res in systems.items():
        rec = res["record"]
        m, ms = rec["metrics"], rec["metrics_strict"]
        row = {"system": name, "n": rec["n_eval"], **{k: f"{m[k]:.4f}" for k in METRICS},
               "strict R@1": f"{ms['recall@1']:.4f}", "valid": f"{m['valid_rate']:.4f}"}
        if "tau" in rec:
            row["B / tau"] = f"{rec['block_size']} / {rec['tau']}" + (f" / sub {rec['sub_block']}"
                                                                         if rec.get("sub_block") else "")
            row["tok/fwd"] = f"{rec['tokens_per_forward']:.2f}"
        ci = rec.get("ci95", {}).get("recall@1")
        if ci:
            row["ΔR@1 vs AR [95%]"] = f"{ci['diff']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
        rows.append(row)
    return rows


def plot_training(histories: dict, val_label: str = "validation"):
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.2))
    for name, h in histories.items():
        if not h or not h.get("loss"):
            continue
        loss = np.asarray(h["loss"])
        steps = np.asarray(h.get("step") or np.arange(1, len(loss) + 1))     # losses are logged every few steps
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax[0].plot(steps[k - 1:], smooth, label=name)
        if h.get("val"):
            ax[1].plot(h["val_step"], h["val"], marker="o", label=name)
    ax[0].set(xlabel="step", ylabel="training loss", title="training loss")
    ax[1].set(xlabel="step", ylabel=val_label, title=val_label)
    ax[0].legend()
    ax[1].legend()
    fig.tight_layout()
    return fig


def validity_bars(records: dict):
    """Grouped bars of valid / duplicate / dropped / out-of-set / malformed rates."""
    keys = ("valid_rate", "duplicate_rate", "dropped_rate", "out_of_set_rate", "malformed_rate")
    fig, ax = plt.subplots(figsize=(9, 3))
    w = 0.8 / max(1, len(records))
    for i, (name, rec) in enumerate(records.items()):
        ax.bar(np.arange(len(keys)) + i * w, [rec["metrics"][k] for k in keys], width=w, label=name)
    ax.set_xticks(np.arange(len(keys)) + w * (len(records) - 1) / 2)
    ax.set_xticklabels([k.replace("_rate", "") for k in keys])
    ax.set(ylabel="share of test users", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def show_examples(ex, scored: dict, n: int = 2, split: str = "test") -> None:
    """Print a few outputs next to the target: one the model got right (if any) and one it got wrong."""
    rows = ex.splits[split]
    hits = [i for i, p in enumerate(scored["parses"]) if p.valid and p.ranking[0] == rows[i]["target_pos"]]
    misses = [i for i, p in enumerate(scored["parses"]) if not (p.valid and p.ranking[0] == rows[i]["target_pos"])]
    for label, idx in (("RIGHT (target ranked first)", hits[: n // 2 or 1]), ("WRONG", misses[: n // 2 or 1])):
        for i in idx:
            r, p = rows[i], scored["parses"][i]
            print(f"--- {label}: user {r['user']}, target at retriever position {r['target_pos']}, "
                  f"valid={p.valid}, model ranking={p.model_ranking}")
            print(scored["outputs"][i][:1200], "\n")


def tiny_random_model(vocab: int = 40, hidden: int = 32, layers: int = 2, heads: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, intermediate_size=2 * hidden, max_position_embeddings=256,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def draw_commit_order(results: dict, length: int, block_size: int):
    """One row per real decode: each completion position coloured and numbered by the forward that committed it.

    ``results`` maps a name to the output of :func:`ar.ar_decode` (a dict: token k comes from the k-th forward
    after the prompt, the first from the prompt's own forward, 0) or of :func:`diffusion.sampler.diffusion_decode`
    (forwards numbered from 1, the prompt's forward not counted). Titles give each decoder's own ``forwards`` count.
    """
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.1 * len(results) + 0.5), squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items()):
        if isinstance(res, dict):                                       # AR: one token per forward
            n = min(length, int(res["tokens"].shape[1]))
            order, forwards = np.arange(n), int(res["forwards"])
        else:
            steps = res.steps[0].tolist()
            cs = res.commit_step[0].tolist()
            offsets = np.concatenate([[0], np.cumsum(steps)])
            order = np.array([offsets[i // block_size] + cs[i] + 1 for i in range(min(length, len(cs)))])
            forwards = int(res.forwards)
        ax.imshow(order[None, :], cmap="viridis", aspect="auto", extent=(-0.5, len(order) - 0.5, 0.5, -0.5))
        lo, hi = int(order.min()), max(int(order.max()), int(order.min()) + 1)
        for i, o in enumerate(order):                                   # dark text on the bright end of viridis
            ax.text(i, 0, str(int(o)), ha="center", va="center", fontsize=7,
                    color="black" if (o - lo) / (hi - lo) > 0.6 else "white")
        for b in range(0, length + 1, block_size):
            ax.axvline(b - 0.5, color="red", lw=1.5)
        ax.set_xlim(-0.5, length - 0.5)
        ax.set_yticks([])
        ax.set_title(f"{name}: {forwards} forwards after the prompt for {len(order)} tokens", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("completion position (number: the forward that committed it, 0 = the prompt's own; "
                           "red lines: block boundaries)")
    fig.tight_layout()
    return fig


def plot_mask(mask: torch.Tensor, title: str, ax=None, boundaries=()):
    ax = ax or plt.gca()
    ax.imshow(mask.numpy(), cmap="Blues", interpolation="nearest")
    for b in boundaries:
        ax.axhline(b - 0.5, color="red", lw=1)
        ax.axvline(b - 0.5, color="red", lw=1)
    ax.set(title=title, xlabel="key position", ylabel="query position")
    return ax


def denoising_frames(tokens: list[str], commit_step: list[int], steps: list[int], block_size: int,
                     mask: str = "<mask>") -> list[list[str]]:
    """The canvas after each forward pass: tokens committed so far, ``mask`` elsewhere (for the scrubber)."""
    offsets = np.concatenate([[0], np.cumsum(steps)])
    when = [offsets[i // block_size] + commit_step[i] for i in range(len(tokens))]
    total = int(offsets[-1])
    return [[t if w < f else mask for t, w in zip(tokens, when)] for f in range(total + 1)]


def denoise_widget(frames: list[list[str]], block_size: int):
    """An ipywidgets slider over the denoising frames (JupyterLab; a static figure stands beside it)."""
    import ipywidgets as widgets
    from IPython.display import HTML, display

    out = widgets.Output()

    def render(i):
        out.clear_output(wait=True)
        cells = []
        for j, t in enumerate(frames[i]):
            colour = "#eee" if t == "<mask>" else "#cde"
            sep = "border-left:2px solid red;" if j % block_size == 0 else ""
            cells.append(f"<span style='background:{colour};{sep}padding:1px 3px;margin:1px;font-family:monospace;"
                         f"font-size:11px;display:inline-block'>{t.replace('<', '&lt;')}</span>")
        with out:
            display(HTML(f"<div>forward {i}/{len(frames) - 1}</div><div>{''.join(cells)}</div>"))

    slider = widgets.IntSlider(0, 0, len(frames) - 1, description="forward")
    slider.observe(lambda ch: render(ch["new"]), names="value")
    render(0)
    class Scrubber(widgets.VBox):
        def __repr__(self):   # the text a saved notebook shows where the widget cannot render
            return "(interactive scrubber: run this cell in JupyterLab to step through the forwards)"

    return Scrubber([slider, out])


def plot_denoising_static(frames: list[list[str]], block_size: int, n_rows: int = 6):
    """A static picture of the scrubber: a few frames, masked cells grey."""
    idx = np.linspace(0, len(frames) - 1, min(n_rows, len(frames))).astype(int)
    grid = np.array([[0.0 if t == "<mask>" else 1.0 for t in frames[i]] for i in idx])
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(idx) + 0.8))
    ax.imshow(grid, cmap="Greens", aspect="auto", vmin=-0.3, vmax=1)
    for b in range(0, grid.shape[1] + 1, block_size):
        ax.axvline(b - 0.5, color="red", lw=1)
    ax.set_yticks(range(len(idx)))
    ax.set_yticklabels([f"after forward {i}" for i in idx])
    ax.set(xlabel="completion position", title="denoising of one example (green = committed)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- "What this run found"
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _valid(x: float) -> str:
    """A valid rate, to a hundredth of a point: near the 99% bar one decimal would print 98.97% and 99.02% alike."""
    return f"{100 * x:.2f}%"


def _valid_with_interval(acc: dict) -> str:
    """A setting's valid rate with its 95% Wilson interval over the prompts it was scored on (none: the rate alone)."""
    if not acc.get("scored"):
        return _valid(acc["valid_rate"])
    lo, hi = wilson_interval(acc["valid_rate"], acc["scored"])
    return f"{_valid(acc['valid_rate'])} (95% interval {_pct(lo)}–{_pct(hi)} over {acc['scored']:,} prompts)"


def sampler_label(sub_block: int | None) -> str:
    """Which commit order a speed row used, in words: the whole block, or left-to-right sub-blocks of that size."""
    return f"sub-blocks of {sub_block}" if sub_block else "whole block"


def setting_label(r: dict) -> str:
    """A diffusion speed row's sampler setting in words: its threshold, and its sub-blocks when it has them."""
    return f"τ {r['tau']}" + (f", {sampler_label(r['sub_block'])}" if r.get("sub_block") else "")


def setting_key(r: dict) -> tuple:
    """A speed row's decoding setting, whatever its batch size: decoder, block size, tau, sub-block (0: none)."""
    return r["decoder"], r["block_size"], r["tau"], r.get("sub_block") or 0


def setting_accuracy(rows: list[dict]) -> dict[tuple, dict]:
    """Each setting's accuracy (``recall@1``, ``strict_recall@1``, ``valid_rate``, ``scored``), read from its row
    that scored the most prompts (on a tie, or in an older file without ``scored``, the largest batch's). A setting
    decodes with the same rule at every batch size (bf16 arithmetic can differ slightly with the batch shape, so the
    batch-1 accuracy read from the serving batch is a close estimate); the serving batch scores every prompt given,
    the batch-1 rows only the few they time."""
    best = {}
    for r in rows:
        k = setting_key(r)
        if k not in best or ((r.get("scored") or 0), r["batch"]) > ((best[k].get("scored") or 0), best[k]["batch"]):
            best[k] = r
    return {k: {m: r.get(m) for m in ("recall@1", "strict_recall@1", "valid_rate", "scored")}
            for k, r in best.items()}


def speed_findings(rows: list[dict], vs_len: list[dict] | None = None, bar: float = VALID_BAR) -> list[str]:
    """Markdown bullets about the speed benchmark, read from its rows (``bench.benchmark`` / speed.json): one per
    batch size (the diffusion settings grouped by sampler: whole block, then each sub-block size), then, per batch
    size, the fastest setting whose valid rate reaches ``bar``, and whether any setting is faster than AR at that
    validity and AR's R@1. Accuracy is each setting's over the most prompts it was scored on."""
    acc = setting_accuracy(rows)
    out = []
    serving = [r["scored"] for r in rows if r.get("scored") and r["batch"] > 1]
    single = [r["scored"] for r in rows if r.get("scored") and r["batch"] == 1]
    if serving:
        out.append(f"**Accuracy** (R@1, valid) of each setting is measured on the {max(serving):,} prompts its "
                   "serving-batch rows decode" + (f"; the batch-1 rows time the first {max(single)} of them one at "
                                                  "a time." if single else "."))
    ar_of = {r["batch"]: r for r in rows if r["decoder"] == "ar"}
    for b in sorted({r["batch"] for r in rows}):
        ar = ar_of.get(b)
        dif = sorted((r for r in rows if r["batch"] == b and r["decoder"] != "ar"),
                     key=lambda r: (r["block_size"], r.get("sub_block") or 0, -r["tau"]))
        if ar is None or not dif:
            continue
        sizes = sorted({r["block_size"] for r in dif})
        groups = []
        for size, sub in dict.fromkeys((r["block_size"], r.get("sub_block") or 0) for r in dif):
            name = (f"B = {size}, " if len(sizes) > 1 else "") + sampler_label(sub)
            each = ", ".join(f"{r['speedup_vs_ar']:.2f}× at τ {r['tau']} "
                             f"(valid {_valid(acc[setting_key(r)]['valid_rate'])})"
                             for r in dif if (r["block_size"], r.get("sub_block") or 0) == (size, sub))
            groups.append(f"{name}: {each}")
        which = f"B = {sizes[0]}" if len(sizes) == 1 else "B = " + ", ".join(map(str, sizes))
        out.append(f"**Batch {b}.** AR: {ar['tokens_per_s']:,.0f} tokens/s, {ar['ms_per_forward']:.2f} ms per forward, "
                   f"valid {_valid(acc[setting_key(ar)]['valid_rate'])}. Block diffusion ({which}) against AR's "
                   f"tokens/s, {'; '.join(groups)}. It commits {min(r['tokens_per_forward'] for r in dif):.2f}–"
                   f"{max(r['tokens_per_forward'] for r in dif):.2f} tokens per forward at "
                   f"{min(r['ms_per_forward'] for r in dif):.2f}–{max(r['ms_per_forward'] for r in dif):.2f} ms per "
                   "forward.")
    for b in sorted(ar_of):
        ar_acc = acc[setting_key(ar_of[b])]
        dif = [r for r in rows if r["batch"] == b and r["decoder"] != "ar"]
        if not dif:
            continue
        ok = [r for r in dif if acc[setting_key(r)]["valid_rate"] >= bar]
        if ok:
            best = max(ok, key=lambda r: r["speedup_vs_ar"])
            a = acc[setting_key(best)]
            strict = "" if a["strict_recall@1"] is None else f", strict {a['strict_recall@1']:.3f}"
            out.append(f"**Fastest setting with valid ≥ {_pct(bar)} at batch {b}:** B = {best['block_size']}, "
                       f"{setting_label(best)}, "
                       f"{best['speedup_vs_ar']:.2f}× AR's tokens/s, valid {_valid_with_interval(a)}, R@1 "
                       f"{a['recall@1']:.3f}{strict}, against AR's R@1 {ar_acc['recall@1']:.3f} "
                       f"(valid {_valid(ar_acc['valid_rate'])}).")
        else:
            most = max(dif, key=lambda r: acc[setting_key(r)]["valid_rate"])
            out.append(f"**No diffusion setting reaches valid ≥ {_pct(bar)} at batch {b}**; the most valid is "
                       f"{setting_label(most)} at {_valid_with_interval(acc[setting_key(most)])} "
                       f"({most['speedup_vs_ar']:.2f}× AR's tokens/s).")
    goal = f"faster than AR with valid ≥ {_pct(bar)} and at least AR's R@1"
    met = [r for r in rows if r["decoder"] != "ar" and r["batch"] in ar_of and r["speedup_vs_ar"] > 1
           and acc[setting_key(r)]["valid_rate"] >= bar
           and acc[setting_key(r)]["recall@1"] >= acc[setting_key(ar_of[r["batch"]])]["recall@1"]]
    if met:
        best = max(met, key=lambda r: r["speedup_vs_ar"])
        settings = len({setting_key(r) for r in met})
        out.append(f"**The goal** ({goal}) **is met** by {settings} setting(s); the fastest: "
                   f"{best['speedup_vs_ar']:.2f}× at batch {best['batch']}, {setting_label(best)}.")
    else:
        out.append(f"**The goal** ({goal}) **is not met**: no diffusion setting here is faster than AR at that "
                   "validity and AR's R@1.")
    if vs_len:
        out.append(f"**Against output length** (τ {vs_len[0]['tau']}, batch {vs_len[0]['batch']}, no early stop): "
                   + ", ".join(f"{r['speedup']:.2f}× at {r['tokens']} tokens" for r in vs_len) + ".")
    return out


def run_findings(records: dict, source: str = "") -> str:
    """The closing "What this run found" of notebook 00, as markdown, from the stages' saved metrics records
    (``pipeline.load_stage_records``): every number is read, none typed."""
    if not any("metrics" in r or "rows" in r for r in records.values()):
        return (f"No measurements yet{' in `' + source + '`' if source else ''}: this cell reads the metrics that "
                "notebooks 01–08 save. Run them (or `make tutorial`), then run this cell again.")
    first = next((r for r in records.values() if "metrics" in r), {})      # none when only the speed was measured
    dates = sorted(r["created"][:10] for r in records.values() if r.get("created")) or ["(undated)"]
    devices = sorted({r["device"] for r in records.values() if r.get("device")})
    users = f"profile `{first.get('profile')}`, {first.get('dataset')}, {first.get('n_eval')} test users; " if first \
        else ""
    head = (f"*({users}{', '.join(devices)}; measured {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else "")
            + (f"; read from `{source}`" if source else "") + ".)*")
    if first.get("profile") == "smoke":
        head += "\n\n*Smoke profile: a tiny model on a small synthetic set. These numbers only show the plumbing works.*"

    def r1(stage):
        return records[stage]["metrics"]["recall@1"] if stage in records and "metrics" in records[stage] else None

    def valid(stage):
        return records[stage]["metrics"]["valid_rate"]

    bullets = []
    if r1("ar") is not None:
        parts = [f"AR GR2 scores R@1 {r1('ar'):.3f} with free decoding (valid {_valid(valid('ar'))})"]
        if r1("ar_constrained") is not None:
            parts.append(f"{r1('ar_constrained'):.3f} with constrained decoding")
        base = [f"{name} {r1(s):.3f}" for s, name in (("retriever", "the retriever's order"), ("teacher", "the teacher"),
                                                      ("ar_direct", "AR without reasoning")) if r1(s) is not None]
        bullets.append("**Re-ranking.** " + ", ".join(parts) + (f"; against {', '.join(base)}." if base else "."))
    chain = [(s, name) for s, name in (("naive", "naive conversion"), ("cft", "CFT"), ("opd", "OPD"), ("rl", "RL"))
             if r1(s) is not None]
    if chain:
        bullets.append("**Conversion.** Rankings written valid by the block-diffusion model: "
                       + ", then ".join(f"{name} {_valid(valid(s))}" for s, name in chain)
                       + f" (τ {records[chain[0][0]].get('tau')}). R@1 (an invalid answer falls back to the retriever's "
                       "order): " + ", ".join(f"{r1(s):.3f}" for s, _ in chain) + "; strict R@1 (invalid = miss): "
                       + ", ".join(f"{records[s]['metrics_strict']['recall@1']:.3f}" for s, _ in chain) + ".")
    if "speed" in records and records["speed"].get("rows"):
        bullets.append("**Speed** (" + str(records["speed"].get("device")) + ", notebook 08):\n"
                       + "\n".join(f"  * {line}" for line in speed_findings(records["speed"]["rows"])))
    missing = [s for s in ("retriever", "teacher", "ar", "ar_constrained", "naive", "cft", "opd", "rl", "speed")
               if s not in records]
    if missing:
        bullets.append("Not measured yet: " + ", ".join(missing) + ".")
    return head + "\n\n" + "\n".join(f"* {b}" for b in bullets)


# ----------------------------------------------------------------------------------------------- speed (notebook 08)
def speed_table(rows: list[dict]) -> list[dict]:
    """The speed rows with the columns a reader compares, short headers (the full rows are in speed.json).

    Accuracy (R@1, strict R@1, valid) is the setting's, read from its row that scored the most prompts
    (:func:`setting_accuracy`), so a batch-1 row, which times only a few prompts, shows the same accuracy as its
    serving batch; "scored over" says on how many prompts."""
    acc = setting_accuracy(rows)
    out = []
    for r in rows:
        a = acc[setting_key(r)]
        s = a["strict_recall@1"]
        out.append({"decoder": r["decoder"], "batch": r["batch"], "B": r["block_size"],
                    "τ": "" if r["tau"] is None else r["tau"], "sub-block": r.get("sub_block") or "",
                    "tokens/s": f"{r['tokens_per_s']:,.0f}",
                    "ms/forward": f"{r['ms_per_forward']:.2f}", "tokens/forward": f"{r['tokens_per_forward']:.2f}",
                    "speedup": f"{r['speedup_vs_ar']:.2f}×", "R@1": f"{a['recall@1']:.3f}",
                    "strict R@1": "–" if s is None else f"{s:.3f}", "valid": f"{a['valid_rate']:.3f}",
                    "scored over": a["scored"] or "–"})
    return out


def length_table(rows: list[dict]) -> list[dict]:
    """``bench.speedup_vs_length`` rows, the columns a reader compares."""
    return [{"blocks": r["blocks"], "tokens": r["tokens"], "AR ms": f"{r['ar_ms']:.1f}",
             "diffusion ms": f"{r['diffusion_ms']:.1f}", "diffusion forwards": r["diffusion_forwards"],
             "tokens/forward": f"{r['tokens_per_forward']:.2f}", "speedup": f"{r['speedup']:.2f}×"} for r in rows]


def plot_speed_frontier(rows: list[dict], bar: float = VALID_BAR):
    """Speed against accuracy, one column per batch size: each diffusion setting's speedup over AR (log scale)
    against its valid rate (top, with the ``bar`` dotted) and its strict R@1 (bottom), one line per sampler
    (whole block, sub-blocks), each point labelled with its tau; AR dashed. Accuracy is the setting's over the most
    prompts it was scored on (:func:`setting_accuracy`)."""
    acc = setting_accuracy(rows)
    rows = [{**r, **acc[setting_key(r)]} for r in rows]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5.4 * len(batches), 5.6), squeeze=False, sharex="col",
                             sharey="row")
    panels = (("valid_rate", 100.0, "valid rankings (%)"), ("strict_recall@1", 1.0, "strict R@1 (invalid = miss)"))
    for col, b in enumerate(batches):
        pts = sorted((r for r in rows if r["batch"] == b and r["decoder"] != "ar"), key=lambda r: r["speedup_vs_ar"])
        ar = next((r for r in rows if r["batch"] == b and r["decoder"] == "ar"), None)    # None: no AR line
        for row, (key, scale, label) in enumerate(panels):
            ax = axes[row, col]
            for k, sub_block in enumerate(sorted({r.get("sub_block") or 0 for r in pts})):   # one line per sampler
                fam = [r for r in pts if (r.get("sub_block") or 0) == sub_block]
                ys = [scale * (r.get(key) or 0.0) for r in fam]
                ax.plot([r["speedup_vs_ar"] for r in fam], ys, marker="s" if sub_block else "o", lw=1,
                        color=f"C{k}", label="block diffusion" + (f", {sampler_label(sub_block)}" if sub_block else
                                                                  ", whole block"))
                if row == 0:                     # tau labels once: whole block above its points, sub-blocks right
                    for r, y in zip(fam, ys):
                        ax.annotate(f"τ {r['tau']}", (r["speedup_vs_ar"], y), fontsize=7,
                                    ha="left" if sub_block else "center", va="center" if sub_block else "bottom",
                                    textcoords="offset points", xytext=(6, 0) if sub_block else (0, 6),
                                    color=f"C{k}")
            if ar is not None:
                ax.axhline(scale * (ar.get(key) or 0.0), color="k", ls="--", lw=1, label="AR")
            if row == 0:
                ax.axhline(100 * bar, color="grey", ls=":", lw=1, label=f"{bar:.0%} valid")
                ax.set_title(f"batch {b}")
            ax.axvline(1, color="grey", lw=0.8)
            ax.set_xscale("log")
            if col == 0:
                ax.set_ylabel(label)
        axes[1, col].set_xlabel("speedup over AR (tokens/s, log scale)")
        xs = [r["speedup_vs_ar"] for r in pts] + [1.0]
        axes[1, col].set_xlim(min(xs) / 1.25, max(xs) * 1.25)
    for ax in axes[1]:
        lo, hi = ax.get_xlim()
        ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32) if lo <= t <= hi]
        ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
        ax.minorticks_off()
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.suptitle("speed against accuracy, same setting, same run (accuracy over every prompt scored)", fontsize=10)
    fig.tight_layout()
    return fig
