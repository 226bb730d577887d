# difflens: `make demo` and `make test` do all the set-up on a fresh machine (venv, pinned deps, stubs).
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)
DEMO_MODEL ?= models/shapes
DEMO_PROMPT ?= a large red striped circle in the center
OUT ?= out

.PHONY: setup test demo lint bench clean train-shapes

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	rm -f .venv/.installed-*; touch $@

test: setup
	$(PY) -m pytest -q

lint: setup
	.venv/bin/ruff check service tests bench
	.venv/bin/mypy service

# The embedded default: the shipped model when it is there, else a tiny random-weights model built here.
demo: setup
	@if [ -f $(DEMO_MODEL)/model_index.json ]; then model=$(DEMO_MODEL); else \
	  model=$(OUT)/models/tiny; [ -f $$model/model_index.json ] || .venv/bin/difflens make-tiny-model $$model; fi; \
	.venv/bin/difflens explain $$model "$(DEMO_PROMPT)" --methods rise,cam,attn --masks 64 \
	  --explain-steps every:5 --out $(OUT)/demo

# Trains the shipped model from scratch (seeded, resumable from out/train/shapes; ~80 min on 2 CPU cores).
TRAIN_MINUTES ?= 85
TRAIN_STEPS ?= 6000
train-shapes: setup
	mkdir -p $(OUT)/train
	PYTHONPATH=service $(PY) -m difflens.training.shapes --out models/shapes --minutes $(TRAIN_MINUTES) \
	  --steps $(TRAIN_STEPS) --seed 0 --arch deep4 2>&1 | tee -a $(OUT)/train/shapes.log

bench: setup
	$(PY) -m bench.rise

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache .mypy_cache
