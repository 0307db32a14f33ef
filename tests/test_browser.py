"""The learner's path in a real browser: JupyterLab on 127.0.0.1, driven by headless Chromium over DevTools.

1. Committed notebooks open with their outputs (a figure is drawn) and opening them changes no byte: the kernel
   starts, Lab puts the running kernel's metadata into the notebook, autosaves it (every 3 s here), and the file on
   disk is still the committed one (the project kernelspec matches; the save hook of ``make lab`` drops the Python
   version Lab adds to language_info). Their tables fit the notebook pane.
2. Notebook 03, run in the smoke profile: the denoising scrubber renders, and dragging its slider changes the canvas.
3. Afterwards (autosave off, the tab closed without saving) the notebook file is still unmodified.

Chromium: Debian's ``chromium`` (``.ci/run`` installs it); without one the test skips and says how to get it.
Screenshots land in the test's temp folder. ``make browser`` runs it after nbval, so the smoke artifacts in ``runs/``
are already built; on its own it builds them first (a minute or two on a laptop CPU).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cdp import HOW_TO_GET_CHROMIUM, Browser, _stop_group, find_chromium
from diffgr2_lite import nbfiles
from diffgr2_lite.artifacts import REPO

pytestmark = pytest.mark.browser
NOTEBOOKS = REPO / "notebooks"
OPENED = ("00_overview.ipynb", "08_speedup.ipynb")
SCRUBBER = "03_block_diffusion.ipynb"
AUTOSAVE_S = 3
RUN_ALL_TIMEOUT_S = 900

# the open notebook panel of a path, and what the test reads from it
PANEL = ("Array.from(window.jupyterapp.shell.widgets('main'))"
         ".find(w => w.context && w.context.path === {path!r})")
STATE = """(() => {{ const w = {panel}; if (!w) return null;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  return {{dirty: w.context.model.dirty, kernel: k ? k.name : null, status: k ? k.status : null,
          busy: w.sessionContext.kernelDisplayStatus,
          figures: w.node.querySelectorAll('.jp-RenderedImage img').length,
          cells: w.content.widgets.length}} }})()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("DIFFGR2_REQUIRE_BROWSER"):       # CI (.ci/run) installed it: missing is a failure
            pytest.fail(HOW_TO_GET_CHROMIUM)
        pytest.skip(HOW_TO_GET_CHROMIUM)
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory, chromium):
    """JupyterLab as ``make lab`` starts it (nbfiles.lab_args), on copies of the committed notebooks, with its own
    Jupyter dirs, the project's kernelspec, a 3 s autosave and the app object exposed for the test."""
    root = tmp_path_factory.mktemp("lab")
    nbdir = root / "notebooks"
    nbdir.mkdir()
    for name in (*OPENED, SCRUBBER):
        shutil.copy2(NOTEBOOKS / name, nbdir / name)
    # Until the next GPU run is finalized, the committed 03 may still carry papermill's active `profile = "full"`;
    # finalize-notebooks comments it out, so the copy gets what the committed file will be (a no-op once it is).
    nbfiles.finalize_file(nbdir / SCRUBBER)
    dirs = {k: root / k for k in ("config", "data", "runtime", "settings", "workspaces", "app_settings")}
    for d in dirs.values():
        d.mkdir()
    kdir = dirs["data"] / "kernels" / nbfiles.KERNEL_NAME
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": nbfiles.KERNEL_DISPLAY_NAME, "language": "python", "metadata": {"debugger": True}}))
    (dirs["app_settings"] / "overrides.json").write_text(json.dumps({
        "@jupyterlab/docmanager-extension:plugin": {"autosave": True, "autosaveInterval": AUTOSAVE_S},
        "@jupyterlab/apputils-extension:notification": {"checkForUpdates": False, "fetchNews": "false"}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
               JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), DIFFGR2_PROFILE="smoke",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("DIFFGR2_PLAIN_PROGRESS", None)      # a person at the keyboard: live widgets
    env.pop("JUPYTER_PATH", None)
    env["JUPYTER_PREFER_ENV_PATH"] = "0"         # the kernelspec above, not an older one of the environment
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", *nbfiles.lab_args(nbdir), "--no-browser", "--ip=127.0.0.1",
           f"--port={port}", f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.app_settings_dir={dirs['app_settings']}"]
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (root / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "token": token, "dir": nbdir, "log": root / "lab.log"}
    finally:
        _stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def browser(lab, chromium, tmp_path_factory):
    with Browser(chromium, tmp_path_factory.mktemp("chromium"), log=None) as b:
        yield b


def _open(browser, lab, name: str):
    browser.goto(f"{lab['url']}/lab/tree/{name}?token={lab['token']}&reset")
    browser.wait_for("!!(window.jupyterapp && window.jupyterapp.shell)", 120, "JupyterLab to load")
    panel = PANEL.format(path=name)
    browser.wait_for(f"!!({panel})", 60, f"{name} to open")
    return panel


def _wait_idle(browser, panel: str, name: str, timeout: float = 120) -> dict:
    return browser.wait_for(f"(() => {{ const s = {STATE.format(panel=panel)}; "
                            f"return s && s.kernel && s.status === 'idle' ? s : null }})()", timeout,
                            f"the kernel of {name} to be idle")


def _assert_unchanged(path: Path, original: bytes, what: str):
    now = path.read_bytes()
    if now != original:
        import difflib

        diff = "\n".join(list(difflib.unified_diff(original.decode().splitlines(), now.decode().splitlines(),
                                                   lineterm="", n=1))[:40])
        pytest.fail(f"{what} modified {path.name}:\n{diff}")


def test_committed_notebooks_open_with_outputs_and_stay_unmodified(lab, browser, tmp_path):
    for name in OPENED:
        path = lab["dir"] / name
        original = (NOTEBOOKS / name).read_bytes()
        assert path.read_bytes() == original
        panel = _open(browser, lab, name)
        browser.wait_for(f"({panel}).node.querySelectorAll('.jp-RenderedImage img').length > 0", 60,
                         f"a figure in {name}")
        state = _wait_idle(browser, panel, name)
        assert state["kernel"] == nbfiles.KERNEL_NAME, state        # the committed kernelspec was found, no dialog
        # the kernel's metadata reached the model; give autosave (every 3 s) time to write whatever it would
        time.sleep(3 * AUTOSAVE_S)
        browser.wait_for(f"!({panel}).context.model.dirty", 30, f"{name} to be saved")
        # tables fit the pane (1400 px window, file browser open): none wider than its output area
        wide = browser.js(f"""Array.from(({panel}).node.querySelectorAll('.jp-OutputArea-output table'))
            .map(t => [t.closest('.jp-OutputArea-output').clientWidth, t.scrollWidth])
            .filter(([area, table]) => table > area)""")
        assert not wide, f"{name}: tables wider than their output area (area, table px): {wide}"
        browser.js(f"({panel}).node.querySelector('.jp-RenderedImage img').scrollIntoView({{block: 'center'}})")
        time.sleep(0.5)
        browser.screenshot(tmp_path / f"{Path(name).stem}.png")
        _assert_unchanged(path, original, "opening it in JupyterLab")
    print(f"screenshots: {tmp_path}")


# the scrubber's box (slider + canvas) in the output area of the open notebook
SCRUBBER_JS = """(() => {{ const w = {panel}; if (!w) return null;
  const box = Array.from(w.node.querySelectorAll('.widget-vbox')).find(b => b.querySelector('.widget-slider'));
  if (!box) return null;
  box.scrollIntoView({{block: 'center'}});
  const h = box.querySelector('.noUi-handle'), t = box.querySelector('.noUi-base') || box.querySelector('.slider');
  const hr = h.getBoundingClientRect(), tr = t.getBoundingClientRect();
  const spans = Array.from(box.querySelectorAll('span'));
  return {{text: box.innerText.split('\\n').filter(s => /^forward \\d+\\//.test(s))[0] || '',
          masked: spans.filter(s => s.textContent === '<mask>').length, cells: spans.length,
          handle: [hr.x + hr.width / 2, hr.y + hr.height / 2], track: [tr.x, tr.y + tr.height / 2, tr.width]}} }})()"""
ERRORS_JS = """(() => {{ const w = {panel}; return w ? Array.from(w.node.querySelectorAll(
  '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')).map(e => e.innerText.slice(-1500))
  .filter(t => /Error|Traceback/.test(t)) : [] }})()"""


def test_denoising_scrubber_runs_and_moves(lab, browser, tmp_path):
    path = lab["dir"] / SCRUBBER
    original = path.read_bytes()
    panel = _open(browser, lab, SCRUBBER)
    _wait_idle(browser, panel, SCRUBBER)
    time.sleep(3 * AUTOSAVE_S)
    browser.wait_for(f"!({panel}).context.model.dirty", 30, f"{SCRUBBER} to be saved")
    _assert_unchanged(path, original, "opening it in JupyterLab")

    # a learner's run is theirs to save: autosave off, so that running changes nothing on disk
    browser.js("(async () => { const c = window.jupyterapp.commands;"
               " if (c.isToggled('docmanager:toggle-autosave')) await c.execute('docmanager:toggle-autosave'); })()")
    assert browser.js("window.jupyterapp.commands.isToggled('docmanager:toggle-autosave')") is False
    browser.js(f"(({panel}).content.activeCellIndex = 0, window.jupyterapp.shell.activateById(({panel}).id))")
    browser.js("window.jupyterapp.commands.execute('notebook:run-all-cells')", await_promise=False)
    t0 = time.time()
    scrub = SCRUBBER_JS.format(panel=panel)
    while True:
        before = browser.js(scrub)
        if before:
            break
        errors = browser.js(ERRORS_JS.format(panel=panel))
        if errors:
            browser.screenshot(tmp_path / "03_error.png")
            pytest.fail("running notebook 03 failed:\n" + "\n---\n".join(errors))
        if time.time() - t0 > RUN_ALL_TIMEOUT_S:
            browser.screenshot(tmp_path / "03_timeout.png")
            pytest.fail(f"no scrubber after {RUN_ALL_TIMEOUT_S} s of Run All; screenshot in {tmp_path}")
        time.sleep(1)
    print(f"scrubber rendered {time.time() - t0:.0f} s after Run All")
    assert before["text"].startswith("forward 0/"), before
    assert before["masked"] == before["cells"] > 0, before          # before any forward: everything masked
    time.sleep(0.5)
    before = browser.js(scrub)                                      # positions after scrolling settled
    x0, y0 = before["handle"]
    tx, ty, tw = before["track"]
    browser.drag(x0, y0, tx + 0.6 * tw, ty)
    after = browser.wait_for(f"(() => {{ const s = {scrub}; return s && s.text !== {before['text']!r} ? s : null }})()",
                             30, "the canvas to follow the slider")
    browser.screenshot(tmp_path / "03_scrubber.png")
    step = int(after["text"].split()[1].split("/")[0])
    assert step > 0 and after["masked"] < before["masked"], (before, after)
    print(f"slider moved to {after['text']!r}: {before['masked']} -> {after['masked']} masked positions; "
          f"screenshots: {tmp_path}")

    # leave without saving: the file on disk is what was committed
    browser.js(f"(() => {{ const w = {panel}; w.context.model.dirty = false; w.close(); }})()")
    time.sleep(1)
    _assert_unchanged(path, original, "running it in JupyterLab")
