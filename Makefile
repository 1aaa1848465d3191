# Every target creates (or reuses) the virtual environment .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
INSTALLED := $(VENV)/.installed
# The exact versions the course is tested with (pyproject.toml holds only ranges).
LOCK := requirements.txt
# Jupyter kernels started from here must use the course's Python.
export PATH := $(BIN):$(PATH)

.PHONY: lab test check progress exercises solutions env clean chromium

$(INSTALLED): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -r $(LOCK) -e '.[course,dev]'
	touch $(INSTALLED)

# JupyterLab refuses to run as root (containers) unless told to.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

# COURSE_LANG=zh: the Chinese notebooks (notebooks_zh/), hints and verdicts (NSA_TUTORIAL_LANG);
# English (notebooks/) otherwise.
COURSE_LANG ?= en
LAB_FOLDER := $(if $(filter zh,$(COURSE_LANG)),notebooks_zh,notebooks)

## make lab: open the course in JupyterLab, on notebook 00 (LAB_ARGS="--port=..." to add
## options; COURSE_LANG=zh for the Chinese edition)
lab: $(INSTALLED)
	NSA_TUTORIAL_LANG=$(COURSE_LANG) $(BIN)/jupyter lab \
		--LabApp.default_url=/lab/tree/$(LAB_FOLDER)/00_welcome.ipynb $(ROOT_FLAG) $(LAB_ARGS)

## make test: the whole suite (lint, unit tests, exercise checks, nbval over solutions/,
## the explorer in headless Chromium, installed with apt-get when missing)
test: $(INSTALLED) chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest --nbval --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg tests solutions

# Debian's chromium for the browser test (a browser download by a test tool fails offline),
# with CJK and emoji fonts: without them it draws the Chinese notebooks as empty boxes.
chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	@(fc-list :lang=zh | grep -q . && fc-list | grep -qi "color emoji") || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		fonts-noto-cjk fonts-noto-color-emoji)

## make check NB=01: check the exercises of your notebooks/01_*.ipynb
## (a report, not a failure: the status is 0 whatever the verdicts; add STRICT=1 to get 1
## unless every exercise passes)
check: $(INSTALLED)
	@test -n "$(NB)" || (echo "usage: make check NB=01" && exit 2)
	@NSA_TUTORIAL_LANG=$(COURSE_LANG) $(BIN)/python -m nsa_tutorial.course check $(NB) \
		$(if $(STRICT),--strict)

## make progress: every exercise of your notebooks/ in one table (STRICT=1 as for check)
progress: $(INSTALLED)
	@NSA_TUTORIAL_LANG=$(COURSE_LANG) $(BIN)/python -m nsa_tutorial.course progress \
		$(if $(STRICT),--strict)

## make exercises: regenerate notebooks/ (and notebooks_zh/) from solutions/
exercises: $(INSTALLED)
	$(BIN)/python -m nsa_tutorial.course exercises

## make solutions: re-execute solutions/ (or NB=01), save outputs, regenerate notebooks/
solutions: $(INSTALLED)
	$(BIN)/python -m nsa_tutorial.course execute $(if $(NB),solutions/$(NB)_*.ipynb,solutions/*.ipynb)
	$(BIN)/python -m nsa_tutorial.course exercises

## make env: check this machine for the course
env: $(INSTALLED)
	$(BIN)/python -m nsa_tutorial.course env

clean:
	rm -rf $(VENV)
