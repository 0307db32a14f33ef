"""The committed notebook files: executed outputs made to read well untrusted, metadata that JupyterLab leaves alone.

``python -m diffgr2_lite finalize-notebooks <executed dir>`` runs :func:`finalize_notebook` on each executed
notebook (e.g. the papermill outputs of a full GPU run) and writes the result into ``notebooks/``:

* **papermill's injected-parameters cell is commented out.** It records what the outputs were run with
  (``# profile = "full"``) but no longer sets anything, so Run All on a laptop uses the parameters cell's defaults
  (``$DIFFGR2_PROFILE``, else ``full`` on a GPU and ``smoke`` elsewhere). Papermill still finds the cell by its tag
  and replaces it on the next run.
* **No widgets in outputs.** A widget-view output needs the kernel (or saved widget state) to render; untrusted it
  shows as ``VBox(children=...)`` or a bar frozen at 0%. A tqdm widget becomes its final text line (rebuilt from
  the saved widget state), a widget that closed itself (``leave=False``) is dropped, and any other widget keeps only
  its text/png siblings. The widget state is removed from the notebook's metadata.
* **Stable metadata.** The kernelspec is the project's kernel (``make setup`` registers it) and ``language_info``
  carries no Python version. JupyterLab writes the running kernel's kernelspec and language_info into a notebook
  when a kernel starts, and autosaves it when they differ (no Lab setting turns that off). The kernelspec then
  matches; the version would differ on every other Python, so :func:`pre_save_hook`, which ``python -m
  diffgr2_lite lab`` (``make lab``) installs in the Jupyter server, takes it out again on save: opening a notebook
  leaves ``git status`` clean.
* Consecutive stream outputs are merged and carriage returns resolved, as JupyterLab does when it loads a notebook
  (otherwise its first save would rewrite them).

Everything else (sources, outputs, execution counts, papermill's cell metadata) is kept.
"""
from __future__ import annotations

import copy
import html
import re
from pathlib import Path

KERNEL_NAME = "diffgr2-lite"
KERNEL_DISPLAY_NAME = "Python 3 (diffgr2-lite)"
KERNELSPEC = {"display_name": KERNEL_DISPLAY_NAME, "language": "python", "name": KERNEL_NAME}
# what ipykernel reports, less the version of the Python that happened to run it
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
INJECTED_TAG = "injected-parameters"
INJECTED_HEADER = ("# Parameters of the run whose outputs you see (papermill injected them). Commented out: when you\n"
                   "# run the notebook, the defaults of the cell above apply ($DIFFGR2_PROFILE, else full on a GPU and\n"
                   "# smoke elsewhere); set profile there to choose.\n")


# ----------------------------------------------------------------------------------------------- pieces
def normalise_metadata(nb) -> bool:
    """Project kernelspec, version-free language_info, no widget state. Returns whether anything changed."""
    md = nb["metadata"]
    before = copy.deepcopy(dict(md))
    md["kernelspec"] = dict(KERNELSPEC)
    md["language_info"] = copy.deepcopy(LANGUAGE_INFO)
    md.pop("widgets", None)
    return dict(md) != before


def neutralise_injected(nb) -> bool:
    """Comment out papermill's injected-parameters cell (kept, tagged, without outputs). Returns whether it did."""
    changed = False
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] != "code" or INJECTED_TAG not in tags:
            continue
        src = _text(cell["source"])
        if src.startswith(INJECTED_HEADER):
            continue
        body = [ln for ln in src.splitlines() if ln.strip() and ln.strip() != "# Parameters"]
        cell["source"] = INJECTED_HEADER + "\n".join(ln if ln.startswith("#") else f"# {ln}" for ln in body)
        cell["outputs"] = []
        if "nbval-skip" not in tags:
            cell["metadata"]["tags"] = [*tags, "nbval-skip"]
        changed = True
    return changed


def active_injected_cells(nb) -> list[int]:
    """Indices of injected-parameters cells that still set something (i.e. that :func:`neutralise_injected` missed)."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code" and INJECTED_TAG in cell.get("metadata", {}).get("tags", []):
            if any(ln.strip() and not ln.lstrip().startswith("#") for ln in _text(cell["source"]).splitlines()):
                out.append(i)
    return out


def _code_cells(nb):
    return (cell for cell in nb["cells"] if cell["cell_type"] == "code")


def strip_widgets(nb) -> bool:
    """Replace widget-view outputs (see the module doc) and drop the widget state. Returns whether it changed."""
    state = nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    changed = False
    for cell in _code_cells(nb):
        outs = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW not in data:
                outs.append(out)
                continue
            changed = True
            model_id = data[WIDGET_VIEW].get("model_id")
            bar = tqdm_line(state, model_id)
            if bar is not None:
                if bar:
                    outs.append(_stream("stdout", bar + "\n"))
                continue
            if model_id not in state and _looks_like_bar(data):
                continue                                   # a bar that closed itself (leave=False)
            rest = {k: v for k, v in data.items() if k != WIDGET_VIEW}
            if rest:
                outs.append(_node({**out, "data": rest}))
        cell["outputs"] = outs
    if "widgets" in nb["metadata"]:
        nb["metadata"].pop("widgets")
        changed = True
    return changed


def tqdm_line(state: dict, model_id: str | None) -> str | None:
    """The final text of a tqdm notebook bar from saved widget state ("" for a hidden bar); None if not a bar."""
    model = state.get(model_id or "")
    if not model or model.get("model_name") != "HBoxModel":
        return None
    kids = [state.get(str(c).replace("IPY_MODEL_", ""), {}) for c in model.get("state", {}).get("children", [])]
    names = [k.get("model_name") for k in kids]
    if len(kids) != 3 or names[0] != "HTMLModel" or names[1] not in ("FloatProgressModel", "IntProgressModel") \
            or names[2] != "HTMLModel":
        return None
    layout = state.get(str(model["state"].get("layout", "")).replace("IPY_MODEL_", ""), {}).get("state", {})
    if layout.get("visibility") == "hidden" or layout.get("display") == "none":
        return ""

    def text(k):
        return html.unescape(str(k["state"].get("value", ""))).replace("\u2007", " ").replace("\xa0", " ")

    prog = kids[1]["state"]
    value, top = float(prog.get("value") or 0), float(prog.get("max") or 0)
    frac = min(1.0, value / top) if top > 0 else 0.0
    full, part = divmod(int(frac * 10 * 8), 8)
    bar = "█" * full + (" ▏▎▍▌▋▊▉"[part] if full < 10 else "")
    return f"{text(kids[0])}|{bar:<10}|{text(kids[2])}".rstrip()


def _looks_like_bar(data: dict) -> bool:
    return bool(re.search(r"\d+%\|.*\|\s*\d+/\d+", _text(data.get("text/plain", ""))))


def merge_streams(nb) -> bool:
    """Merge consecutive stream outputs of one name and resolve carriage returns, as JupyterLab does on load."""
    changed = False
    for cell in _code_cells(nb):
        outs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and outs and outs[-1].get("output_type") == "stream" \
                    and outs[-1].get("name") == out.get("name"):
                outs[-1] = _stream(out["name"], _text(outs[-1]["text"]) + _text(out["text"]))
                changed = True
            else:
                outs.append(out)
        for i, out in enumerate(outs):
            if out.get("output_type") == "stream":
                text = _resolve_cr(_text(out["text"]))
                if text != _text(out["text"]):
                    outs[i] = _stream(out["name"], text)
                    changed = True
        cell["outputs"] = outs
    return changed


def _resolve_cr(text: str) -> str:
    """What a terminal shows: on each line, text before a carriage return is overwritten (a trailing one is dropped)."""
    if "\r" not in text:
        return text
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(ln.rstrip("\r").split("\r")[-1] for ln in lines)


def _node(d: dict):
    import nbformat

    return nbformat.from_dict(d)


def _stream(name: str, text: str) -> dict:
    import nbformat

    return nbformat.v4.new_output("stream", name=name, text=text)


def _text(s) -> str:
    return "".join(s) if isinstance(s, list) else str(s)


# ----------------------------------------------------------------------------------------------- whole notebooks
def finalize_notebook(nb):
    """All of the above, in place; returns ``nb``."""
    strip_widgets(nb)
    neutralise_injected(nb)
    merge_streams(nb)
    normalise_metadata(nb)
    return nb


def problems(nb) -> list[str]:
    """Why a committed notebook is not in its finalized form (empty: it is)."""
    out = []
    md = nb["metadata"]
    if md.get("kernelspec") != KERNELSPEC:
        out.append(f"kernelspec {md.get('kernelspec')} is not {KERNELSPEC}")
    if md.get("language_info") != LANGUAGE_INFO:
        out.append(f"language_info {md.get('language_info')} is not {LANGUAGE_INFO}")
    if "widgets" in md:
        out.append("widget state in the metadata")
    return out


def output_problems(nb) -> list[str]:
    """Outputs that read badly untrusted: widget views, active injected parameters."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []):
            if WIDGET_VIEW in o.get("data", {}):
                out.append(f"cell {i}: widget output {_text(o['data'].get('text/plain', ''))[:60]!r}")
    out += [f"cell {i}: injected parameters still set something" for i in active_injected_cells(nb)]
    return out


def read(path):
    import nbformat

    return nbformat.read(str(path), as_version=4)


def dumps(nb) -> str:
    """The bytes Jupyter writes for ``nb`` (nbformat's layout, trailing newline), so a Lab save changes nothing."""
    import nbformat

    s = nbformat.writes(nbformat.from_dict(nb))
    return s if s.endswith("\n") else s + "\n"


def run_failed(nb) -> bool:
    """Whether papermill recorded a failed run in ``nb``: a cell raised, or the run stopped before a cell."""
    if nb.get("metadata", {}).get("papermill", {}).get("exception"):
        return True
    return any(c.get("metadata", {}).get("papermill", {}).get("status", "completed") != "completed"
               for c in nb["cells"])


def _executed(path: Path):
    """The notebook at ``path``, refused (ValueError) when its run failed: a failed run never replaces a notebook."""
    nb = read(path)
    if run_failed(nb):
        raise ValueError(f"{path}: this run failed (papermill recorded an error); run it again before finalizing. "
                         "Nothing was written")
    return nb


def _write_finalized(nb, dst: Path) -> bool:
    import nbformat

    from .artifacts import atomic_write_text

    nb = finalize_notebook(nb)
    nbformat.validate(nb)
    text = dumps(nb)
    if dst.exists() and dst.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(dst, text)
    return True


def finalize_file(src: str | Path, dst: str | Path | None = None) -> bool:
    """Finalize one notebook file into ``dst`` (default: in place). Returns whether ``dst`` changed."""
    return _write_finalized(_executed(Path(src)), Path(dst or src))


def finalize_dir(src_dir: str | Path, dst_dir: str | Path) -> list[Path]:
    """Finalize every ``NN_*.ipynb`` of ``src_dir`` into ``dst_dir`` (e.g. a papermill output dir into notebooks/).

    Every notebook is read and checked first, so one failed run leaves all of ``dst_dir`` as it was."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    files = sorted(src_dir.glob("[0-9][0-9]_*.ipynb"))
    if not files:
        raise FileNotFoundError(f"no executed notebooks (NN_*.ipynb) in {src_dir}")
    notebooks = [(_executed(f), dst_dir / f.name) for f in files]
    written = []
    for nb, dst in notebooks:
        changed = _write_finalized(nb, dst)
        if changed:
            written.append(dst)
        print(f"{'finalized' if changed else 'unchanged'}: {dst}")
    return written


def pre_save_hook(model, path=None, contents_manager=None, **kwargs):
    """Jupyter server pre-save hook: a notebook on the project's kernel is saved with the version-free
    ``language_info`` and the project's kernelspec display name (see the module doc). Installed by
    ``python -m diffgr2_lite lab``; other notebooks are left as they are."""
    if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
        return
    md = model["content"].get("metadata", {})
    ks = md.get("kernelspec") or {}
    if ks.get("name") != KERNEL_NAME:
        return
    md["kernelspec"] = {**ks, **KERNELSPEC}
    li = md.get("language_info")
    if isinstance(li, dict) and li.get("name") == "python":
        md["language_info"] = {k: v for k, v in li.items() if k != "version"}


def lab_args(notebook_dir: str | Path | None = None) -> list[str]:
    """``jupyter lab`` arguments of ``make lab``: the notebooks, the pre-save hook, ``--allow-root`` as root."""
    import os

    from .artifacts import REPO

    args = [str(notebook_dir or REPO / "notebooks"), f"--ContentsManager.pre_save_hook={__name__}.pre_save_hook"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")          # containers and cloud notebooks run as root; Jupyter refuses without it
    return args
