# Every stage: `make <stage> ARGS="key=value ..."` runs `python -m src.<pkg>.<stage> key=value ...`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup test lint demo benchmark preprocess check split convert demo-data train export bench infer \
        check_errors test_batching ov_int8 demo-ui clean-venv

setup: $(STAMP)

# torch first (the CPU wheel on disk here, the CUDA build on a GPU machine), then the rest, so nothing
# pulls a second torch.
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

lint: setup
	$(PY) -m ruff check src tests benchmarks

benchmark: setup
	$(PY) -m benchmarks.run $(ARGS)

# The main job on the embedded default: synthetic demo data -> split -> train -> export -> bench -> infer.
demo: setup
	$(PY) -m src.etl.make_demo_data $(ARGS)
	$(PY) -m src.etl.split $(ARGS)

preprocess: setup
	$(PY) -m src.etl.preprocess $(ARGS)
check: setup
	$(PY) -m src.etl.check $(ARGS)
split: setup
	$(PY) -m src.etl.split $(ARGS)
convert: setup
	$(PY) -m src.etl.convert $(ARGS)
demo-data: setup
	$(PY) -m src.etl.make_demo_data $(ARGS)
