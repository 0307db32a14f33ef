"""The committed notebooks' form: finalize-notebooks, the Lab save hook, progress bars, the 00/08 helpers."""
from __future__ import annotations

import io
import re
import sys
import types

import nbformat
import pytest

from diffgr2_lite import nbfiles, progress
from diffgr2_lite.artifacts import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


# ----------------------------------------------------------------------------------------------- committed files
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_metadata_is_what_lab_keeps(path):
    """The project's kernel, version-free language_info, no widget state, nbformat's own layout: JupyterLab opens
    and autosaves these without changing a byte (the browser test checks that in Lab itself)."""
    nb = nbfiles.read(path)
    assert nbfiles.problems(nb) == [], f"run: python -m diffgr2_lite finalize-notebooks <executed dir> ({path.name})"
    assert path.read_text(encoding="utf-8") == nbfiles.dumps(nb), f"{path.name} is not in nbformat's layout"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_read_well_untrusted(path):
    assert nbfiles.output_problems(nbfiles.read(path)) == []


def test_parameters_cells_default_to_the_environment_profile():
    """Run as committed, every notebook's parameters resolve the default profile (no active injected cell)."""
    for path in NOTEBOOKS:
        nb = nbfiles.read(path)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, path.name
        ns = {}
        exec(params[0].source, ns)
        assert ns["profile"] is None, path.name


# ----------------------------------------------------------------------------------------------- finalize
def _executed_notebook():
    """A small stand-in for a papermill output: injected cell, widget outputs with state, split streams."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("profile = None\ndataset = None")
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell('# Parameters\nprofile = "full"\n', execution_count=2)
    injected.metadata["tags"] = ["injected-parameters", "nbval-skip"]
    view = "application/vnd.jupyter.widget-view+json"

    def widget_out(model_id, text):
        return nbformat.v4.new_output("display_data", data={
            "text/plain": text, view: {"model_id": model_id, "version_major": 2, "version_minor": 0}})

    work = nbformat.v4.new_code_cell("train()", execution_count=3, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="a\n"),
        nbformat.v4.new_output("stream", name="stdout", text="b 10%\rb 100%\n"),
        widget_out("bar", "Loading weights:   0%|          | 0/56 [00:00<?, ?it/s]"),
        widget_out("gone", "validating:   0%|          | 0/1 [00:00<?, ?it/s]"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBOR", "text/plain": "<Figure>"}),
    ])
    scrub = nbformat.v4.new_code_cell("denoise_widget(frames, 32)", execution_count=4, outputs=[
        nbformat.v4.new_output("execute_result", execution_count=4, data={
            "text/plain": "(interactive scrubber: run this cell in JupyterLab ...)",
            view: {"model_id": "box", "version_major": 2, "version_minor": 0}})])
    nb.cells = [params, injected, work, scrub]

    def m(name, **state):
        return {"model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0", "model_name": name,
                "state": state}

    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {**nbfiles.LANGUAGE_INFO, "version": "3.12.3"}
    nb.metadata["widgets"] = {nbfiles.WIDGET_STATE: {"version_major": 2, "version_minor": 0, "state": {
        "bar": m("HBoxModel", children=["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"], layout="IPY_MODEL_lay"),
        "l": m("HTMLModel", value="Loading\u2007weights:\u2007100%"),
        "p": m("FloatProgressModel", value=56.0, max=56.0),
        "r": m("HTMLModel", value="\u200756/56\u2007[00:00&lt;00:00,\u20074588.95it/s]"),
        "lay": {"model_name": "LayoutModel", "state": {"visibility": None}},
        "box": m("VBoxModel", children=[]),
    }}}
    nb.metadata["papermill"] = {"parameters": {"profile": "full"}}
    return nb


def test_finalize_comments_out_the_injected_cell_and_keeps_its_record():
    nb = nbfiles.finalize_notebook(_executed_notebook())
    inj = nb.cells[1]
    assert "injected-parameters" in inj.metadata["tags"]                    # papermill still finds and replaces it
    assert '# profile = "full"' in inj.source and inj.outputs == []
    ns = {}
    for cell in nb.cells[:2]:
        exec(cell.source, ns)
    assert ns["profile"] is None                                             # Run All: the default profile
    assert nbfiles.active_injected_cells(nb) == [] and nbfiles.active_injected_cells(_executed_notebook()) == [1]


def test_finalize_turns_widgets_into_text_and_keeps_the_rest():
    nb = nbfiles.finalize_notebook(_executed_notebook())
    outs = nb.cells[2].outputs
    assert [o.output_type for o in outs] == ["stream", "display_data"]      # streams merged, as Lab does on load
    assert outs[0].text == ("a\nb 100%\n"                                    # carriage return resolved
                            "Loading weights: 100%|██████████| 56/56 [00:00<00:00, 4588.95it/s]\n")
    assert outs[1].data == {"image/png": "iVBOR", "text/plain": "<Figure>"}  # kept as it was
    scrub = nb.cells[3].outputs[0]
    assert scrub.output_type == "execute_result" and list(scrub.data) == ["text/plain"]
    assert "widgets" not in nb.metadata and nb.metadata["papermill"] == {"parameters": {"profile": "full"}}
    assert nbfiles.problems(nb) == [] and nbfiles.output_problems(nb) == []
    nbformat.validate(nb)


def test_finalize_is_idempotent_and_the_cli_writes_into_notebooks(tmp_path, capsys):
    from diffgr2_lite.__main__ import main

    src, dst = tmp_path / "executed", tmp_path / "notebooks"
    src.mkdir()
    nbformat.write(_executed_notebook(), str(src / "03_x.ipynb"))
    assert main(["finalize-notebooks", str(src), "--into", str(dst)]) == 0
    first = (dst / "03_x.ipynb").read_text()
    assert main(["finalize-notebooks", str(dst), "--into", str(dst)]) == 0
    assert (dst / "03_x.ipynb").read_text() == first
    assert "unchanged" in capsys.readouterr().out
    assert main(["finalize-notebooks", str(tmp_path / "empty")]) == 2


def test_pre_save_hook_keeps_the_committed_metadata():
    li = {**nbfiles.LANGUAGE_INFO, "version": "3.11.7"}
    model = {"type": "notebook", "content": {"metadata": {
        "kernelspec": {"name": nbfiles.KERNEL_NAME, "display_name": "diffgr2-lite", "language": "python"},
        "language_info": dict(li)}}}
    nbfiles.pre_save_hook(model=model, path="x.ipynb", contents_manager=None)
    assert model["content"]["metadata"] == {"kernelspec": nbfiles.KERNELSPEC, "language_info": nbfiles.LANGUAGE_INFO}
    other = {"type": "notebook", "content": {"metadata": {"kernelspec": {"name": "python3"}, "language_info": li}}}
    nbfiles.pre_save_hook(model=other)
    assert other["content"]["metadata"]["language_info"]["version"] == "3.11.7"   # not ours: untouched
    nbfiles.pre_save_hook(model={"type": "file", "content": "text"})


def test_lab_args_install_the_hook_and_allow_root_only_as_root(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 0)
    args = nbfiles.lab_args()
    assert args[0].endswith("notebooks") and "--allow-root" in args
    assert "--ContentsManager.pre_save_hook=diffgr2_lite.nbfiles.pre_save_hook" in args
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "--allow-root" not in nbfiles.lab_args()


def test_makefile_registers_the_kernel_the_notebooks_name():
    mk = (REPO / "Makefile").read_text()
    assert f'--name {nbfiles.KERNEL_NAME} --display-name "{nbfiles.KERNEL_DISPLAY_NAME}"' in mk
    nbval = mk[mk.index("\nnbval:"):].split("\n\n")[0]
    assert "DIFFGR2_PLAIN_PROGRESS=1" in nbval and "DIFFGR2_PROFILE=smoke" in nbval
    assert "-m diffgr2_lite lab" in mk


def test_tutorial_runner_shows_cells_and_silences_the_kernel(monkeypatch, tmp_path):
    """``notebooks``: per-notebook cell progress, no kernel warnings, plain text bars, the overview last."""
    from diffgr2_lite import __main__ as cli

    calls = []
    fake = types.SimpleNamespace(execute_notebook=lambda src, dst, **kw: calls.append((src, dst, kw)),
                                 PapermillExecutionError=RuntimeError)
    monkeypatch.setitem(sys.modules, "papermill", fake)
    monkeypatch.delenv("DIFFGR2_PLAIN_PROGRESS", raising=False)
    cli.run_notebooks("smoke", ["00", "01", "08"], str(tmp_path))
    assert [c[0].rsplit("/", 1)[-1][:2] for c in calls] == ["01", "08", "00"]
    kw = calls[0][2]
    assert kw["progress_bar"]["unit"] == "cell" and "01_data" in kw["progress_bar"]["desc"]
    assert "--IPKernelApp.log_level=ERROR" in kw["extra_arguments"]
    import os

    assert os.environ["DIFFGR2_PLAIN_PROGRESS"] == "1"
    monkeypatch.delenv("DIFFGR2_PLAIN_PROGRESS")


# ----------------------------------------------------------------------------------------------- progress bars
def test_plain_bars_write_one_final_line(monkeypatch):
    monkeypatch.setenv(progress.PLAIN_ENV, "1")
    out = io.StringIO()
    bar = progress.tqdm(range(50), desc="train", file=out)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    assert re.match(r"train: 100%\|[█#]+\| 50/50 \[.*loss=49\.0\]\n$", out.getvalue()), out.getvalue()
    gone = io.StringIO()
    for _ in progress.tqdm(range(5), desc="x", leave=False, file=gone):
        pass
    one = io.StringIO()
    for _ in progress.tqdm(range(1), desc="one step", file=one):
        pass
    assert gone.getvalue() == "" and one.getvalue() == ""


def test_live_bars_are_tqdm_auto_and_skip_single_steps(monkeypatch):
    from tqdm.auto import tqdm as auto

    monkeypatch.delenv(progress.PLAIN_ENV, raising=False)
    bar = progress.tqdm(total=10, file=io.StringIO())
    assert isinstance(bar, auto) and not bar.disable
    bar.close()
    assert progress.tqdm(total=1, file=io.StringIO()).disable
    assert progress.tqdm([0], file=io.StringIO()).disable


# ----------------------------------------------------------------------------------------------- notebook helpers
def test_commit_order_figure_agrees_with_the_decoders():
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from diffgr2_lite.ar import ar_decode
    from diffgr2_lite.diffusion.sampler import diffusion_decode
    from diffgr2_lite.viz import draw_commit_order, tiny_random_model

    model = tiny_random_model(vocab=40, seed=0)
    prompt = torch.randint(5, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    ar = ar_decode(model, prompt, max_new=16, eos_id=-1)
    fast = diffusion_decode(model, prompt, max_blocks=2, block_size=8, mask_id=4, eos_id=-1, tau=0.0)
    fig = draw_commit_order({"AR": ar, "fast": fast}, length=16, block_size=8)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == [f"AR: {ar['forwards']} forwards after the prompt for 16 tokens",
                      f"fast: {fast.forwards} forwards after the prompt for 16 tokens"]
    assert ar["forwards"] == 15 and fast.forwards == 2
    labels = [int(t.get_text()) for t in fig.axes[0].texts]
    assert labels == list(range(16))


def test_findings_are_read_from_records():
    from diffgr2_lite.viz import run_findings, speed_findings

    assert "No measurements yet" in run_findings({}, "runs/smoke/")

    def rec(stage, r1, valid, **kw):
        m = {"recall@1": r1, "valid_rate": valid}
        return {"stage": stage, "profile": "full", "dataset": "d", "n_eval": 9, "device": "GPU", "created": "2026-01-02",
                "metrics": m, "metrics_strict": {"recall@1": r1 * valid}, **kw}

    rows = [{"decoder": "ar", "batch": 1, "block_size": 1, "tau": None, "tokens_per_s": 100.0, "ms_per_forward": 1.0,
             "tokens_per_forward": 1.0, "speedup_vs_ar": 1.0, "recall@1": 0.4, "valid_rate": 0.5},
            {"decoder": "diffusion", "batch": 1, "block_size": 32, "tau": 0.9, "tokens_per_s": 250.0,
             "ms_per_forward": 1.2, "tokens_per_forward": 3.0, "speedup_vs_ar": 2.5, "recall@1": 0.4,
             "valid_rate": 1.0}]
    text = run_findings({"retriever": rec("retriever", 0.3, 1.0), "ar": rec("ar", 0.375, 0.5),
                         "naive": rec("naive", 0.3, 0.0, tau=1.0), "speed": {"device": "GPU", "rows": rows}})
    assert "R@1 0.375" in text and "0.300" in text and "naive conversion 0.00%" in text
    assert "whole block: 2.50× at τ 0.9 (valid 100.00%)" in text and "**is met**" in text
    assert "Not measured yet: teacher" in text and "\n  * **Batch 1.**" in text      # speed: one sub-bullet per batch
    rows[1]["valid_rate"] = 0.9
    assert "**is not met**" in " ".join(speed_findings(rows))
    rows.append({**rows[1], "sub_block": 8, "valid_rate": 1.0, "speedup_vs_ar": 1.5})
    text = " ".join(speed_findings(rows))
    assert "whole block: 2.50× at τ 0.9 (valid 90.00%); sub-blocks of 8: 1.50× at τ 0.9 (valid 100.00%)" in text
    assert "**is met**" in text
    assert "1.50× at batch 1, τ 0.9, sub-blocks of 8." in text
    rows.append({**rows[1], "block_size": 8, "sub_block": None, "speedup_vs_ar": 1.2, "valid_rate": 0.5})
    text = " ".join(speed_findings(rows))
    assert "Block diffusion (B = 8, 32)" in text and "B = 8, whole block: 1.20× at τ 0.9 (valid 50.00%)" in text
    assert "B = 32, sub-blocks of 8: 1.50×" in text
    assert "**is met**" in " ".join(speed_findings(rows + [{**rows[1], "batch": 4}])) # no AR row at batch 4: no error
    rows.pop()
    from diffgr2_lite.viz import speed_table

    assert [r["sub-block"] for r in speed_table(rows)] == ["", "", 8]
    only_speed = run_findings({"speed": {"device": "GPU", "created": "2026-01-03", "rows": rows}})   # notebook 08 alone
    assert "measured 2026-01-03" in only_speed and "2.50× at τ 0.9" in only_speed and "test users" not in only_speed


def test_speed_findings_read_each_settings_accuracy_from_its_widest_row_and_apply_the_bar():
    from diffgr2_lite.viz import setting_accuracy, speed_findings

    def row(decoder, batch, tau, speedup, r1, valid, scored, sub_block=None):
        return {"decoder": decoder, "batch": batch, "block_size": 1 if decoder == "ar" else 32, "tau": tau,
                "sub_block": sub_block, "tokens_per_s": 100.0 * speedup, "ms_per_forward": 1.0,
                "tokens_per_forward": 1.0, "speedup_vs_ar": speedup, "recall@1": r1, "strict_recall@1": r1 * valid,
                "valid_rate": valid, "scored": scored}

    rows = [row("ar", 1, None, 1.0, 0.5, 1.0, 16), row("diffusion", 1, 1.0, 0.8, 0.5, 1.0, 16),
            row("diffusion", 1, 0.6, 5.0, 0.6, 1.0, 16), row("diffusion", 1, 1.0, 0.9, 0.5, 1.0, 16, sub_block=8),
            row("ar", 64, None, 1.0, 0.37, 0.987, 1741), row("diffusion", 64, 1.0, 0.6, 0.36, 0.992, 1741),
            row("diffusion", 64, 0.6, 4.0, 0.36, 0.95, 1741), row("diffusion", 64, 1.0, 0.5, 0.37, 0.993, 1741, 8)]
    acc = setting_accuracy(rows)
    assert acc[("diffusion", 32, 0.6, 0)] == {"recall@1": 0.36, "strict_recall@1": 0.36 * 0.95, "valid_rate": 0.95,
                                              "scored": 1741}                # batch 64's, not batch 1's 16 prompts
    text = " ".join(speed_findings(rows))
    assert "measured on the 1,741 prompts" in text and "the first 16 of them" in text
    # at batch 1 the 16 timed prompts are all valid at tau 0.6, but over every user it is 95%: below the bar
    assert "**Fastest setting with valid ≥ 99.0% at batch 1:** B = 32, τ 1.0, sub-blocks of 8, 0.90× AR's" in text
    assert ("valid 99.30% (95% interval 98.8%–99.6% over 1,741 prompts), R@1 0.370, strict 0.367, against AR's R@1 "
            "0.370 (valid 98.70%)") in text
    assert "at batch 64:** B = 32, τ 1.0, sub-blocks of 8" not in text             # the slower valid one
    assert "at batch 64:** B = 32, τ 1.0, 0.60× AR's tokens/s" in text            # the faster of the two valid ones
    assert "**is not met**" in text                                                # none valid enough is faster
    assert "**is not met**" in " ".join(speed_findings(rows, bar=0.95))            # tau 0.6: valid, but R@1 < AR's
    rows[6]["recall@1"] = 0.37
    assert "is met** by 1 setting(s); the fastest: 5.00× at batch 1, τ 0.6." in " ".join(speed_findings(rows, bar=0.95))
    # an older speed.json without "scored": each setting's accuracy is its largest batch's, not batch 1's
    old = [{k: v for k, v in r.items() if k != "scored"} for r in rows]
    assert setting_accuracy(old)[("diffusion", 32, 0.6, 0)]["valid_rate"] == 0.95
    assert not any(b.startswith("**Accuracy**") for b in speed_findings(old))
    only_serving = " ".join(speed_findings([r for r in rows if r["batch"] == 64]))
    assert "measured on the 1,741 prompts its serving-batch rows decode." in only_serving and "batch-1" not in only_serving
    assert "No diffusion setting reaches valid ≥ 99.5% at batch 64**; the most valid is τ 1.0, sub-blocks of 8 at " \
           "99.30% (95% interval" in " ".join(speed_findings(rows, bar=0.995))
    from diffgr2_lite.viz import speed_table

    # the table shows each setting's accuracy over every prompt, on its batch-1 row too (scored there: 16 prompts)
    table = {(r["batch"], r["τ"], r["sub-block"]): r for r in speed_table(rows)}
    assert table[(1, 0.6, "")]["valid"] == "0.950" and table[(1, 0.6, "")]["scored over"] == 1741
    assert table[(1, "", "")]["valid"] == "0.987" and table[(64, 1.0, 8)]["R@1"] == "0.370"
    assert speed_table(old)[2]["scored over"] == "–"                   # an older file without "scored"


def test_scrubber_reads_as_text_where_it_cannot_render():
    pytest.importorskip("ipywidgets")
    from diffgr2_lite.viz import denoise_widget

    w = denoise_widget([["<mask>", "<mask>"], ["a", "<mask>"], ["a", "b"]], block_size=2)
    bundle = w._repr_mimebundle_()
    assert bundle["text/plain"].startswith("(interactive scrubber") and len(bundle["text/plain"]) <= 110
    w.children[0].value = 2
    w.close()


def test_a_failed_run_is_never_finalized(tmp_path):
    """papermill writes a failed run's notebook too; finalizing it must refuse and leave every destination as it was."""
    import nbformat

    def executed(name, exception):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
        nb.metadata["papermill"] = {"exception": exception}
        nb.cells[0].metadata["papermill"] = {"status": "failed" if exception else "completed"}
        nbformat.write(nb, str(tmp_path / "run" / name))

    (tmp_path / "run").mkdir()
    (tmp_path / "dst").mkdir()
    executed("01_a.ipynb", False)
    executed("02_b.ipynb", True)
    for name in ("01_a.ipynb", "02_b.ipynb"):
        (tmp_path / "dst" / name).write_text("committed")
    with pytest.raises(ValueError, match="02_b.ipynb: this run failed"):
        nbfiles.finalize_dir(tmp_path / "run", tmp_path / "dst")
    assert [(tmp_path / "dst" / n).read_text() for n in ("01_a.ipynb", "02_b.ipynb")] == ["committed"] * 2
    with pytest.raises(ValueError, match="this run failed"):
        nbfiles.finalize_file(tmp_path / "run" / "02_b.ipynb", tmp_path / "dst" / "02_b.ipynb")


def test_a_failing_notebook_is_named_in_one_line(monkeypatch, tmp_path, capsys):
    """A notebook that raises ends ``notebooks`` with exit status 1 and one line naming it, the cell and the error."""
    from diffgr2_lite import __main__ as cli

    class ExecError(Exception):
        def __init__(self):
            super().__init__("long traceback")
            self.exec_count, self.ename, self.evalue = 4, "KeyError", "'metrics'"

    def execute(src, dst, **kw):
        raise ExecError()

    monkeypatch.setitem(sys.modules, "papermill", types.SimpleNamespace(execute_notebook=execute,
                                                                        PapermillExecutionError=ExecError))
    assert cli.main(["notebooks", "--profile", "smoke", "--only", "03", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "03_block_diffusion.ipynb failed in cell [4]: KeyError: 'metrics'" in err
    assert str(tmp_path / "03_block_diffusion.ipynb") in err and "long traceback" not in err
    monkeypatch.delenv("DIFFGR2_PLAIN_PROGRESS", raising=False)


def test_speed_frontier_plots_each_settings_widest_accuracy_against_its_speedup():
    import matplotlib

    matplotlib.use("Agg")
    from diffgr2_lite.viz import plot_speed_frontier

    def row(decoder, batch, tau, speedup, valid, scored, sub_block=None):
        return {"decoder": decoder, "batch": batch, "block_size": 1 if decoder == "ar" else 32, "tau": tau,
                "sub_block": sub_block, "speedup_vs_ar": speedup, "recall@1": 0.4, "strict_recall@1": 0.4 * valid,
                "valid_rate": valid, "scored": scored}

    rows = [row("ar", 1, None, 1.0, 1.0, 2), row("diffusion", 1, 0.9, 3.0, 1.0, 2),
            row("diffusion", 1, 0.9, 2.0, 1.0, 2, sub_block=8),
            row("ar", 8, None, 1.0, 0.99, 50), row("diffusion", 8, 0.9, 2.5, 0.9, 50),
            row("diffusion", 8, 0.9, 1.5, 0.98, 50, sub_block=8)]
    fig = plot_speed_frontier(rows)
    assert len(fig.axes) == 4                                         # valid and strict R@1, for batches 1 and 8
    top_b1 = fig.axes[0]
    lines = {ln.get_label(): ln for ln in top_b1.get_lines()}
    # batch 1's points carry the batch-8 rows' accuracy (50 prompts scored, not 2): 90% and 98%, at 3x and 2x
    assert list(lines["block diffusion, whole block"].get_ydata()) == [90.0]
    assert list(lines["block diffusion, whole block"].get_xdata()) == [3.0]
    assert list(lines["block diffusion, sub-blocks of 8"].get_ydata()) == [98.0]
    assert list(lines["AR"].get_ydata()) == [99.0, 99.0] and list(lines["99% valid"].get_ydata()) == [99.0, 99.0]
    matplotlib.pyplot.close(fig)
    fig = plot_speed_frontier(rows + [{**rows[1], "batch": 4}])      # a batch size without an AR row: no AR line
    assert len(fig.axes) == 6 and fig.axes[1].get_title() == "batch 4"
    assert "AR" not in {ln.get_label() for ln in fig.axes[1].get_lines()}
    matplotlib.pyplot.close(fig)
