# tuneserve: `make demo` runs the embedded default end to end; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0+cpu lives on the PyTorch CPU wheel index (this workplace also has it on local disk).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.tuneserve-installed

.PHONY: install demo test up down status bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch alone from the CPU index (no deps: they come from PyPI with the project below)
	$(PY) -m pip install -q --no-deps --retries 1 "torch==2.13.0" --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[cpu,test]"
	# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers beside CPU torch.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m cluster.model_cache
	touch $(STAMP)

demo: install
	$(PY) -m serve_app.demo

test: install
	$(PY) -m pytest

up: install
	$(PY) -m cluster.local up

down:
	-$(PY) -m cluster.local down

status:
	$(PY) -m cluster.local status

bench: install
	$(PY) -m jobs.bench serve

clean: down
	rm -rf $(VENV)
