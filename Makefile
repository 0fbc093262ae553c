# qclip: the README's commands. Everything installs into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qclip-installed
MM_STAMP := $(VENV)/.qclip-mm-installed
RUNS ?= runs
# papermill parameters for `make pretrain`, e.g. make pretrain ARGS="-p steps 50"
ARGS ?=
# runs side by side in `make reproduce` (the cores are shared between them)
JOBS ?= 2
# extra JupyterLab options, e.g. make lab LAB_ARGS="--no-browser --port 8899"
LAB_ARGS ?=

.PHONY: help install mm pretrain reproduce test lab lab-test export readme clean-nbs nbtest pytest

help:
	@echo "make pretrain   CLIP pretraining on the built-in synth-datacompdr dataset (papermill nbs/10_pretrain.ipynb)"
	@echo "make reproduce  the paper's Table 1 at CPU scale: the gate, Table 1 and Fig. 3 (experiments/table1.yaml), then the results page under the analysis plan"
	@echo "make test       every test: notebooks in step with qclip/, nbdev_test, pytest"
	@echo "make mm         the OpenMMLab extra (mmcv 2.1.0 built once, ~22 min, cached in ~/.cache/qclip/wheels)"
	@echo "make lab        JupyterLab on nbs/ with the qclip kernel registered"
	@echo "make lab-test   nbs/10_pretrain.ipynb run from JupyterLab's UI in headless chromium, screenshots in $(RUNS)/screenshots"

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip 'setuptools<81' wheel
	$(BIN)/pip install -q -e '.[dev,reinforce,tracking]'
	touch $(STAMP)

install: $(STAMP)

# The dense-task extra: mmcv (built once from its patched sdist, wheel cached outside the repo), mmseg, mmdet
$(MM_STAMP): $(STAMP) tools/install_mm.sh
	tools/install_mm.sh $(BIN)/python
	touch $(MM_STAMP)

mm: $(MM_STAMP)

pretrain: $(STAMP)
	mkdir -p $(RUNS)/pretrain
	$(BIN)/papermill nbs/10_pretrain.ipynb $(RUNS)/pretrain/10_pretrain.ipynb -p out_dir $(abspath $(RUNS))/pretrain $(ARGS)

# Table 1 at CPU scale, as experiments/paper/analysis_plan.yaml fixes it: the positive control first (profile gate: the
# DataCompDR recipe against random init on seeds Table 1 never uses), then Table 1 (profile small: the three caption
# qualities and random init on the plan's seeds, each encoder fine-tuned in miniature on the four tasks and read out
# frozen), Fig. 3 on Table 1's encoders, and the results page, which applies the plan and says whether the runs followed
# it. Rerunning skips finished runs.
PLAN ?= experiments/paper/analysis_plan.yaml
reproduce: $(STAMP)
	$(BIN)/qclip run experiments/table1.yaml --profile gate --jobs $(JOBS)
	$(BIN)/qclip run experiments/table1.yaml --profile small --jobs $(JOBS)
	$(BIN)/qclip run experiments/fig3.yaml --profile small --only attention
	mkdir -p $(RUNS)/results
	$(BIN)/papermill nbs/50_results.ipynb $(RUNS)/results/50_results.ipynb -p runs_root $(abspath $(RUNS)) -p out_dir $(abspath $(RUNS))/results -p plan $(abspath $(PLAN))

# The notebooks are the source: exporting must leave qclip/ and README.md unchanged.
export: $(STAMP)
	$(BIN)/nbdev_export
	$(MAKE) --no-print-directory readme
	@git diff --quiet -- qclip README.md || { echo "qclip/ or README.md is out of step with nbs/: run make export and commit"; git --no-pager diff --stat -- qclip README.md; exit 1; }

# README.md is nbs/index.ipynb as markdown (nbdev_readme needs Quarto, which these machines cannot install), its
# images (nbs/images/) linked from the repository's root
readme: $(STAMP)
	$(BIN)/jupyter nbconvert --to markdown --stdout nbs/index.ipynb 2>/dev/null | sed 's#](images/#](nbs/images/#g' > README.md.tmp && mv README.md.tmp README.md

nbtest: $(MM_STAMP)
	$(BIN)/nbdev_test --n_workers 2 --flags mm

pytest: $(MM_STAMP)
	$(BIN)/python -m pytest -q -rs tests

test: export nbtest pytest

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

lab: $(STAMP)
	$(BIN)/python -m ipykernel install --sys-prefix --name qclip --display-name "qclip (.venv)"
	$(BIN)/jupyter lab --notebook-dir nbs $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# JupyterLab as a person tries it (needs Debian's chromium and chromium-driver; skipped without them, also in make pytest,
# unless QCLIP_REQUIRE_BROWSER=1, as .ci/run sets):
# tiny parameters typed below the parameters cell, Run > Run All Cells, widget progress bar and plot checked and screenshotted
lab-test: $(STAMP)
	QCLIP_SCREENSHOTS=$(abspath $(RUNS))/screenshots $(BIN)/python -m pytest -q -s -rs tests/test_lab_browser.py
