# diffgr2-lite: the README's commands. Each target sets up .venv on its own, so one command works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# profile: smoke on a CPU-only machine, full when a GPU is present; PROFILE=... overrides
PROFILE ?= $(shell $(PYTHON) -c "import shutil,subprocess; print('full' if shutil.which('nvidia-smi') and subprocess.run(['nvidia-smi','-L'],capture_output=True).returncode==0 else 'smoke')" 2>/dev/null || echo smoke)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: setup tutorial test unit nbval browser lab results bench clean

$(VENV)/.installed: pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# no GPU: take the CPU build of torch first (an unpinned install pulls a multi-GB CUDA build)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install -q -e ".[dev]"
	@# the notebooks name this kernel (nbfiles.KERNELSPEC): Lab finds it and leaves their metadata as committed
	$(PY) -m ipykernel install --sys-prefix --name diffgr2-lite --display-name "Python 3 (diffgr2-lite)" >/dev/null
	@touch $@

setup: $(VENV)/.installed

## make tutorial: run the whole notebook series headlessly (papermill) into runs/<profile>/notebooks/
tutorial: setup
	$(PY) -m diffgr2_lite notebooks --profile $(PROFILE)

## make test: unit tests, every notebook under nbval in the smoke profile, then JupyterLab in headless Chromium
test: setup unit nbval browser

unit: setup
	$(PY) -m pytest tests -m "not browser"

nbval: setup
	DIFFGR2_PROFILE=smoke DIFFGR2_RUNS=$(CURDIR)/runs DIFFGR2_PLAIN_PROGRESS=1 $(PY) -m pytest --nbval-lax \
		--nbval-sanitize-with notebooks/sanitize.cfg --nbval-kernel-name python3 -p no:cacheprovider notebooks

## make browser: a learner's path in JupyterLab, driven in headless Chromium (skips without Chromium); after nbval
## it reuses the smoke artifacts in runs/
browser: setup
	DIFFGR2_RUNS=$(CURDIR)/runs $(PY) -m pytest tests -m browser -p no:cacheprovider -rs

## make lab: JupyterLab on notebooks/ (as root too), with the save hook that keeps the notebooks' metadata as committed
lab: setup
	$(PY) -m diffgr2_lite lab

## make results: copy runs/full/*/metrics.json into results/full/ and regenerate the README table
results: setup
	$(PY) -m diffgr2_lite results --profile full

bench: setup
	$(PY) -m diffgr2_lite bench --profile $(PROFILE)

clean:
	rm -rf runs
