"""Plots, tables and the one widget the notebooks use (kept here so notebooks stay short)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

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
               "strict R@1": f"{ms['recall@1']:.4f}", "valid": f"{m['valid_rate']:.3f}"}
        if "tau" in rec:
            row["B / tau"] = f"{rec['block_size']} / {rec['tau']}"
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
    """One row per decoder: each completion position coloured by the forward pass that committed it."""
    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.1 * len(results) + 0.4), squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items()):
        if res is None:
            order = np.arange(length)
        else:
            steps = res.steps[0].tolist()
            cs = res.commit_step[0].tolist()
            offsets = np.concatenate([[0], np.cumsum(steps)])
            order = np.array([offsets[i // block_size] + cs[i] for i in range(min(length, len(cs)))])
        ax.imshow(order[None, :], cmap="viridis", aspect="auto")
        for i, o in enumerate(order):
            ax.text(i, 0, str(int(o) + 1), ha="center", va="center", fontsize=7, color="white")
        for b in range(0, length + 1, block_size):
            ax.axvline(b - 0.5, color="red", lw=1.5)
        ax.set_yticks([])
        ax.set_title(f"{name}: {int(order.max()) + 1} forwards for {length} tokens", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("completion position (red lines: block boundaries)")
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
    return widgets.VBox([slider, out])


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
